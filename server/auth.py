"""Bearer-token check of the ModelAdmin service (`authorization: Bearer TOKEN` metadata)."""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from server.errors import PermissionDenied, Unauthenticated

AUTHORIZATION_KEY = "authorization"
_SCHEME = "Bearer "


def check_admin_token(
    metadata: Iterable[tuple[str, str | bytes]] | None, token: str | None
) -> None:
    """Accept the call only if it carries the server's admin token.

    Args:
        metadata: The call's invocation metadata.
        token: The server's admin token; None means the admin service is disabled.

    Raises:
        PermissionDenied: the admin service is disabled, or the token does not match.
        Unauthenticated: no well-formed `authorization: Bearer TOKEN` metadata.
    """
    if token is None:
        raise PermissionDenied(
            "the admin service is disabled on this server; start it with --admin-token-file "
            "or FLOWSERVE_ADMIN_TOKEN"
        )
    values = [value for key, value in metadata or () if key == AUTHORIZATION_KEY]
    if len(values) != 1 or not isinstance(values[0], str) or not values[0].startswith(_SCHEME):
        raise Unauthenticated("send the admin token as metadata 'authorization: Bearer TOKEN'")
    # Constant-time comparison: the time taken must not reveal how much of the token matched.
    if not hmac.compare_digest(values[0][len(_SCHEME) :].encode(), token.encode()):
        raise PermissionDenied("the admin token is not accepted")
