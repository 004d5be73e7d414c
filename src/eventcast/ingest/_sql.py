"""The outbox table's SQL, shared by the consumer and the application-side helpers (pure)."""

from __future__ import annotations

import functools
import re
from typing import Final

from ..exceptions import ConfigurationError

__all__ = [
    "check_table_name",
    "insert_sql",
    "lock_params",
    "lock_sql",
    "notification_channel",
    "quote_table",
]

_IDENTIFIER: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


def check_table_name(value: str) -> str:
    """Check an outbox table name: ``name`` or ``schema.name``, letters, digits and ``_``.

    Raises:
        ConfigurationError: it is not.
    """
    parts = value.split(".")
    if len(parts) > 2 or not all(_IDENTIFIER.fullmatch(p) for p in parts):
        raise ConfigurationError(
            f"invalid outbox table name {value!r}: use name or schema.name (letters, digits and _)"
        )
    return value


def check_identifier(value: str, what: str) -> str:
    """Check a bare SQL identifier (a NOTIFY channel).

    Raises:
        ConfigurationError: it is not one.
    """
    if not _IDENTIFIER.fullmatch(value):
        raise ConfigurationError(f"invalid {what} {value!r}: use letters, digits and _")
    return value


def quote_table(table: str) -> str:
    """The table name (``name`` or ``schema.name``) checked and quoted for SQL."""
    check_table_name(table)
    return ".".join(f'"{part}"' for part in table.split("."))


def notification_channel(table: str) -> str:
    """The NOTIFY channel of a table: its name without the schema."""
    return table.rsplit(".", 1)[-1]


def lock_sql(*, named: bool = False) -> str:
    """The lock a writer takes before inserting: one per (table, partition), until commit.

    Writers of one partition thus insert in commit order, so ids follow commits.
    """
    if named:
        return "SELECT pg_advisory_xact_lock(hashtext(:lock_name), :lock_partition)"
    return "SELECT pg_advisory_xact_lock(hashtext(%s), %s)"


def lock_params(table: str, partition: int) -> tuple[str, int]:
    """The arguments of :func:`lock_sql` for a table's partition."""
    if isinstance(partition, bool) or not isinstance(partition, int) or partition < 0:
        raise ValueError(f"partition must be an int >= 0, not {partition!r}")
    return f"eventcast_outbox:{table}", partition


@functools.lru_cache(maxsize=64)
def insert_sql(table: str, *, named: bool = False) -> str:
    """The INSERT of one outbox row, returning its id."""
    values = "(:method, :payload, :partition)" if named else "(%s, %s, %s)"
    return (
        f"INSERT INTO {quote_table(table)} (method, payload, partition) "
        f"VALUES {values} RETURNING id"
    )
