"""Small helpers for the URLs that choose logs, backplanes and presence stores."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = ["pop_option", "redact_password"]


def pop_option(url: str, name: str) -> tuple[str, str | None]:
    """Take eventcast's own query option ``name`` off a URL.

    Returns the URL without it (the other query parameters kept, for the
    driver) and its value (the last one if repeated; ``None`` if absent).
    """
    parts = urlsplit(url)
    value: str | None = None
    rest: list[tuple[str, str]] = []
    for key, item in parse_qsl(parts.query, keep_blank_values=True):
        if key == name:
            value = item
        else:
            rest.append((key, item))
    return urlunsplit(parts._replace(query=urlencode(rest))), value


def redact_password(url: str, mask: str = "***") -> str:
    """The URL with its password masked, for messages and logs."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return url
    if not password:
        return url
    userinfo, _, host = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{userinfo.partition(':')[0]}:{mask}@{host}"))
