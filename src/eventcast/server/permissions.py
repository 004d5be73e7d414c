"""Who may do what on which channel: one module for every entry point.

The WebSocket commands, the SSE endpoint and the HTTP API ask the same
questions here and get the same :class:`~eventcast.server.errors.CommandError`
for the same refusal, so a rule cannot differ between entry points.

The options are Centrifugo's, per namespace (see
:class:`~eventcast.server.config.NamespaceConfig`): ``allow_subscribe_for_client``,
``allow_publish_for_subscriber``, user-limited ``#`` channels, and so on. The
HTTP API is trusted: it only needs a channel that is valid and in a configured
namespace.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol

from .._caches import remember, topic_limit
from ..exceptions import AuthError, InvalidTopicError, TokenExpiredError
from ..protocol import codes
from ..topics import is_pattern, validate_pattern, validate_topic
from .errors import CommandError

if TYPE_CHECKING:
    from .access import Access
    from .auth import SubscriptionClaims, TokenVerifier
    from .config import NamespaceConfig, Settings

__all__ = ["Client", "Permissions"]


class Client(Protocol):
    """What permissions know of a client: who it is and what it is subscribed to.

    A :class:`~eventcast.server.connection.Connection` is one.
    """

    user: str
    anonymous: bool

    @property
    def channels(self) -> Mapping[str, object]:
        """The channels the client is subscribed to."""
        ...


class Permissions:
    """The hub's permission checks, by namespace options and tokens.

    Args:
        settings: the hub's settings (namespaces and their options).
        verifier: checks subscription tokens.
        access: blocked users and revoked tokens (none: nothing is revoked).
        in_use: how many channels have subscribers now (it sizes the cache of
            checked names: :func:`~eventcast._caches.topic_limit`).
    """

    def __init__(
        self,
        settings: Settings,
        verifier: TokenVerifier,
        access: Access | None = None,
        in_use: Callable[[], int] = lambda: 0,
    ) -> None:
        self._settings = settings
        self._verifier = verifier
        self._access = access
        self._in_use = in_use
        # The namespace of each name already checked: names, then patterns
        # (emptied when full, at topic_limit(in_use()): a check is cheap to redo).
        self._checked: tuple[dict[str, NamespaceConfig], dict[str, NamespaceConfig]] = ({}, {})

    def namespace(self, channel: str) -> NamespaceConfig:
        """Return a channel's namespace options.

        Raises:
            CommandError: 102, the channel's namespace is not configured.
        """
        ns = self._settings.namespace(channel)
        if ns is None:
            raise CommandError(codes.ERROR_UNKNOWN_CHANNEL)
        return ns

    def channel(self, channel: str, *, allow_pattern: bool = False) -> NamespaceConfig:
        """Check a channel name (or pattern) and return its namespace options.

        The answers for valid names are cached (the settings do not change):
        one lookup per publication on a known channel.

        Raises:
            CommandError: 107 for a missing or malformed name, 102 for an
                unknown namespace.
        """
        if isinstance(channel, str):
            known = self._checked[allow_pattern]
            found = known.get(channel)
            if found is not None:
                return found
            if channel:
                limit = topic_limit(self._in_use())
                return remember(known, channel, self._check(channel, allow_pattern), limit)
        raise CommandError(codes.ERROR_BAD_REQUEST.with_message("channel required"))

    def _check(self, channel: str, allow_pattern: bool) -> NamespaceConfig:
        try:
            if allow_pattern:
                validate_pattern(channel)
            else:
                validate_topic(channel)
        except InvalidTopicError as exc:
            raise CommandError(codes.ERROR_BAD_REQUEST.with_message(str(exc))) from None
        return self.namespace(channel)

    @staticmethod
    def user_limited(channel: str, user: str) -> bool:
        """Centrifugo's ``#`` channels: ``dialog#42,43`` admits users 42 and 43."""
        _, sep, users = channel.rpartition("#")
        return bool(sep) and bool(user) and user in users.split(",")

    @staticmethod
    def hook_decides(channel: str, *, token: str, server_side: bool) -> bool:
        """Whether a subscribe hook decides this subscription (if one is configured).

        Not for a subscription token, a ``#`` user-limited channel or a
        server-side subscription: those decide on their own (as with
        Centrifugo's subscribe proxy).
        """
        return not server_side and not token and "#" not in channel

    def subscribe(
        self,
        client: Client,
        channel: str,
        *,
        token: str = "",
        server_side: bool = False,
        hooked: bool = False,
    ) -> tuple[NamespaceConfig, SubscriptionClaims | None]:
        """Check that ``client`` may subscribe; return the namespace and the token's claims.

        A server-side subscription (from the token, the API or a hook) is
        already authorized: only the name and the namespace are checked. The
        claims are those of the subscription token, when one granted it. With
        ``hooked`` (see :meth:`hook_decides`) the application's subscribe hook
        decides instead of the namespace's ``allow_*`` options.

        Raises:
            CommandError: 103 permission denied (a revoked token too), 109
                token expired, 107/102 as for :meth:`channel`.
        """
        ns = self.channel(channel, allow_pattern=True)
        if is_pattern(channel) and not ns.allow_patterns:
            raise CommandError(
                codes.ERROR_PERMISSION_DENIED.with_message("pattern subscriptions not allowed")
            )
        if server_side:
            return ns, None
        if token:
            try:
                claims = self._verifier.verify_subscription(
                    token, user=client.user, channel=channel
                )
            except TokenExpiredError:
                raise CommandError(codes.ERROR_TOKEN_EXPIRED) from None
            except AuthError:
                raise CommandError(codes.ERROR_PERMISSION_DENIED) from None
            access = self._access
            if access is not None and access.refuses(
                client.user, claims.token_id, claims.issued_at, channel
            ):
                raise CommandError(codes.ERROR_PERMISSION_DENIED.with_message("token revoked"))
            return ns, claims
        if "#" in channel:
            if ns.allow_user_limited_channels and self.user_limited(channel, client.user):
                return ns, None
            raise CommandError(codes.ERROR_PERMISSION_DENIED)
        if hooked:
            return ns, None
        if client.anonymous and not ns.allow_subscribe_for_anonymous:
            raise CommandError(codes.ERROR_PERMISSION_DENIED)
        if not ns.allow_subscribe_for_client:
            raise CommandError(codes.ERROR_PERMISSION_DENIED)
        return ns, None

    @staticmethod
    def _may(client: Client, channel: str, for_client: bool, for_subscriber: bool) -> bool:
        return for_client or (for_subscriber and channel in client.channels)

    def publish(self, client: Client, channel: str, *, hooked: bool = False) -> NamespaceConfig:
        """Check that ``client`` may publish into ``channel``.

        With ``hooked`` the application's publish hook decides instead of the
        namespace's ``allow_publish_*`` options: only the name is checked.

        Raises:
            CommandError: 103 permission denied, 107/102 as for :meth:`channel`.
        """
        ns = self.channel(channel)
        if hooked:
            return ns
        if client.anonymous and not ns.allow_publish_for_anonymous:
            raise CommandError(codes.ERROR_PERMISSION_DENIED)
        if not self._may(
            client, channel, ns.allow_publish_for_client, ns.allow_publish_for_subscriber
        ):
            raise CommandError(codes.ERROR_PERMISSION_DENIED)
        return ns

    def history(self, client: Client, channel: str) -> NamespaceConfig:
        """Check that ``client`` may read ``channel``'s history, and that it keeps one.

        Raises:
            CommandError: 103 permission denied, 108 no history kept, 107/102.
        """
        ns = self.channel(channel)
        if not self._may(
            client, channel, ns.allow_history_for_client, ns.allow_history_for_subscriber
        ):
            raise CommandError(codes.ERROR_PERMISSION_DENIED)
        if ns.history_size <= 0:
            raise CommandError(codes.ERROR_NOT_AVAILABLE)
        return ns

    def presence(self, client: Client, channel: str) -> NamespaceConfig:
        """Check that ``client`` may read ``channel``'s presence, and that it is tracked.

        Raises:
            CommandError: 108 presence off, 103 permission denied, 107/102.
        """
        ns = self.channel(channel)
        if not ns.presence:
            raise CommandError(codes.ERROR_NOT_AVAILABLE)
        if not self._may(
            client, channel, ns.allow_presence_for_client, ns.allow_presence_for_subscriber
        ):
            raise CommandError(codes.ERROR_PERMISSION_DENIED)
        return ns
