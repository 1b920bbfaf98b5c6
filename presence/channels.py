"""Channel names and the authorisation rules that depend only on names and claims."""

from __future__ import annotations

import re
from fnmatch import fnmatchcase

from presence.errors import BadRequest

# fullmatch, not match + "$": "$" also matches before a trailing newline.
CHANNEL_RE = re.compile(r"[a-z0-9][a-z0-9_.:-]{0,127}")
CHURN_PREFIX = "churn:"


def validate_channel(name: object, field: str = "ch") -> str:
    """Return ``name`` if it is a valid channel name, else raise :class:`BadRequest`."""
    if not isinstance(name, str):
        raise BadRequest(f"{field} must be a string", field=field)
    if not CHANNEL_RE.fullmatch(name):
        raise BadRequest(
            f"{field} must match ^[a-z0-9][a-z0-9_.:-]{{0,127}}$", field=field
        )
    return name


def is_churn(channel: str) -> bool:
    """True for a churn-risk channel (``churn:<org>``)."""
    return channel.startswith(CHURN_PREFIX)


def churn_org(channel: str) -> str:
    """The org of a churn channel name."""
    return channel[len(CHURN_PREFIX) :]


def channel_allowed(channel: str, patterns: tuple[str, ...]) -> bool:
    """True when one of the token's glob ``patterns`` matches ``channel`` (case-sensitive)."""
    return any(fnmatchcase(channel, p) for p in patterns)
