"""JWT verification and minting (PROTOCOL.md, "Tokens").

:meth:`Authenticator.verify` returns :class:`Claims` or raises
:class:`presence.errors.Unauthorized` with a reason that never contains the token.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jwt
from jwt.types import Options

from presence.errors import BadRequest, Unauthorized
from presence.settings import Settings
from presence.text import check_identifier, is_encodable

ROLES = ("member", "csm", "admin", "service")
TIERS = ("free", "paid")
CHURN_ROLES = frozenset({"csm", "admin", "service"})
QUERY_ROLES = CHURN_ROLES
INGEST_ROLES = frozenset({"service", "admin"})


@dataclass(frozen=True, slots=True)
class Claims:
    user: str
    channels: tuple[str, ...]
    role: str
    tier: str
    exp: int

    @property
    def may_read_churn(self) -> bool:
        return self.role in CHURN_ROLES


class Authenticator:
    """Verifies tokens with the configured key, algorithm, issuer and audience."""

    def __init__(self, settings: Settings) -> None:
        self.algorithm = settings.auth.jwt_algorithm
        auth = settings.auth
        self.key = auth.jwt_public_key if self.algorithm != "HS256" else auth.jwt_secret
        if not self.key:
            raise ValueError("no JWT key configured")
        self.issuer = settings.auth.jwt_issuer or None
        self.audience = settings.auth.jwt_audience or None
        self.leeway = settings.lifetime.token_leeway  # on exp, nbf and iat

    def verify(self, token: str | None) -> Claims:
        if not token:
            raise Unauthorized("missing token")
        if not is_encodable(token):  # PyJWT would raise UnicodeEncodeError, not a JWT error
            raise Unauthorized("invalid token: not valid text")
        options: Options = {"require": ["exp", "sub"], "verify_aud": self.audience is not None}
        try:
            payload = jwt.decode(
                token,
                self.key,
                algorithms=[self.algorithm],
                issuer=self.issuer,
                audience=self.audience,
                options=options,
                leeway=self.leeway,
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("token expired") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthorized(f"token lacks the {exc.claim} claim") from None
        except jwt.InvalidTokenError as exc:
            raise Unauthorized(f"invalid token: {type(exc).__name__}") from None
        return claims_from_payload(payload)


def claims_from_payload(payload: dict[str, Any]) -> Claims:
    """The claims of a verified payload; :class:`Unauthorized` for any unusable claim.

    ``sub`` becomes the user id everywhere (snapshots, logs, the Store), so it is
    checked as an identifier: encodable text without control characters.
    """
    sub = payload.get("sub")
    if not isinstance(sub, str) or not sub or len(sub) > 128:
        raise Unauthorized("sub must be a non-empty string of at most 128 characters")
    try:
        check_identifier(sub, "sub")
    except BadRequest as exc:
        raise Unauthorized(exc.message) from None
    channels = payload.get("channels", [])
    if not isinstance(channels, list) or not all(isinstance(c, str) for c in channels):
        raise Unauthorized("channels must be a list of strings")
    role = payload.get("role", "member")
    if role not in ROLES:
        raise Unauthorized("role must be one of member, csm, admin, service")
    tier = payload.get("tier", "free")
    if tier not in TIERS:
        raise Unauthorized("tier must be free or paid")
    return Claims(sub, tuple(channels), role, tier, int(payload["exp"]))


def mint_token(
    secret: str,
    user: str,
    channels: Sequence[str] = (),
    role: str = "member",
    tier: str = "free",
    ttl: float = 3600.0,
    algorithm: str = "HS256",
    extra: dict[str, Any] | None = None,
) -> str:
    """A signed token (for the CLI, tests and load tests)."""
    now = int(time.time())
    payload: dict[str, Any] = {
        "sub": user,
        "channels": list(channels),
        "role": role,
        "tier": tier,
        "iat": now,
        "exp": now + int(ttl),
    }
    payload.update(extra or {})
    return jwt.encode(payload, secret, algorithm=algorithm)


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <JWT>`` header value, else None."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()
