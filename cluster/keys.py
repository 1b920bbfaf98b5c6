"""The Redis key layout, in one place and free of I/O.

Every key starts with ``presence:`` and carries a hash tag (``{...}``) so that all keys
of one entity live in one Redis Cluster slot, which lets a Lua script touch them
atomically:

======================================  ==============================================
key                                     holds
======================================  ==============================================
``presence:ch:{<ch>}:metas``            hash ``user\\0conn`` -> msgpack [user, node, meta]
``presence:ch:{<ch>}:bus``              the sharded pub/sub channel of topic ``<ch>``
``presence:user:{<u>}:conns``           hash conn -> node (the user's live connections)
``presence:user:{<u>}:index``           hash conn -> msgpack meta (last meta put per conn)
``presence:user:{<u>}:seen``            last-seen ms, expires after ``last_seen_days``
``presence:user:{<u>}:resume``          hash conn -> sha256 of its resume token
``presence:user:{<u>}:chans:<conn>``    set of the channels ``conn`` joined
``presence:user:{<u>}:online:<day>``    engagement: bitmap, bit m = online in minute m
``presence:user:{<u>}:sessions:<day>``  engagement: connections opened that day
``presence:user:{<u>}:devices``         engagement: hash device -> last used ms
``presence:node:{<n>}:lease``           lease expiry ms (PX ttl)
``presence:node:{<n>}:metas``           set of msgpack [ch, user, conn] the node owns
``presence:node:{<n>}:conns``           set of msgpack [user, conn] the node owns
``presence:node:{<n>}:sweep:metas``     the metas set, renamed there by a sweeper's claim
``presence:node:{<n>}:sweep:conns``     the conns set, likewise
``presence:node:{<n>}:sweep:lock``      the claiming sweeper's token (PX)
``presence:nodes``                      zset node -> lease expiry ms (the registry)
``presence:{nodes}:refreshed``          hash node -> time of its last lease refresh
``presence:churn:{<org>}:records``      hash supplier -> msgpack record
``presence:churn:{<org>}:scores``       zset supplier -> score
======================================  ==============================================

Tag contents are escaped (``%`` -> ``%25``, ``{`` -> ``%7B``, ``}`` -> ``%7D``) so that
a name containing braces can neither end its tag early nor leave it empty, and names
that differ give different keys.
"""

from __future__ import annotations

import binascii

PREFIX = "presence:"
REGISTRY = PREFIX + "nodes"
"""The node registry: the one key not tied to an entity (its own slot)."""

LOADS = PREFIX + "{nodes}:loads"
"""Hash node -> connection count reported with each lease refresh."""

REFRESHED = PREFIX + "{nodes}:refreshed"
"""Hash node -> ms of its last lease refresh (a dead node's connections count as lost
from then: the last-seen of what a sweep removes)."""
SLOTS = 16384


def escape(name: str) -> str:
    """``name`` made safe inside a hash tag (reversible, never empty)."""
    out = name.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")
    return out or "%"


def _tag(kind: str, name: str) -> str:
    return f"{PREFIX}{kind}:{{{escape(name)}}}"


def channel_metas(ch: str) -> str:
    return _tag("ch", ch) + ":metas"


def topic(ch: str) -> str:
    """The sharded pub/sub channel of broker topic ``ch`` (in the channel's slot)."""
    return _tag("ch", ch) + ":bus"


def topic_name(channel: str) -> str | None:
    """Inverse of :func:`topic`: the broker topic of a pub/sub channel, or None."""
    head = PREFIX + "ch:{"
    if not (channel.startswith(head) and channel.endswith("}:bus")):
        return None
    inner = channel[len(head) : -len("}:bus")]
    if "{" in inner or "}" in inner:
        return None
    return "" if inner == "%" else (
        inner.replace("%7D", "}").replace("%7B", "{").replace("%25", "%")
    )


def user_conns(user: str) -> str:
    return _tag("user", user) + ":conns"


def user_index(user: str) -> str:
    return _tag("user", user) + ":index"


def user_seen(user: str) -> str:
    return _tag("user", user) + ":seen"


def user_resume(user: str) -> str:
    """Hash conn -> sha256 hex of the connection's current resume token."""
    return _tag("user", user) + ":resume"


def user_channels(user: str, conn: str) -> str:
    """Set of the channels ``conn`` of ``user`` joined (presence and churn), for a
    resume; in the user's slot (the tag comes first)."""
    return _tag("user", user) + ":chans:" + escape(conn)


def user_online(user: str, day: str) -> str:
    """Engagement bitmap of ``user`` for UTC ``day`` (YYYY-MM-DD): 1440 bits, one per
    minute (see :mod:`presence.engagement`)."""
    return _tag("user", user) + f":online:{day}"


def user_sessions(user: str, day: str) -> str:
    """Engagement counter: connections ``user`` opened on UTC ``day``."""
    return _tag("user", user) + f":sessions:{day}"


def user_devices(user: str) -> str:
    """Engagement hash: device name -> last used ms (at most 20 fields)."""
    return _tag("user", user) + ":devices"


def node_lease(node: str) -> str:
    return _tag("node", node) + ":lease"


def node_metas(node: str) -> str:
    return _tag("node", node) + ":metas"


def node_conns(node: str) -> str:
    return _tag("node", node) + ":conns"


def node_sweep_metas(node: str) -> str:
    return _tag("node", node) + ":sweep:metas"


def node_sweep_conns(node: str) -> str:
    return _tag("node", node) + ":sweep:conns"


def node_sweep_lock(node: str) -> str:
    return _tag("node", node) + ":sweep:lock"


def churn_records(org: str) -> str:
    return _tag("churn", org) + ":records"


def churn_scores(org: str) -> str:
    return _tag("churn", org) + ":scores"


def meta_field(user: str, conn: str) -> str:
    """The field of a channel's metas hash (NUL cannot occur in ids on the wire)."""
    return f"{user}\0{conn}"


def hash_tag(key: str) -> str:
    """The part of ``key`` Redis Cluster hashes (the rule of CLUSTER KEYSLOT)."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


def slot(key: str) -> int:
    """The cluster slot of ``key``: CRC16-XMODEM of its hash tag, mod 16384."""
    return binascii.crc_hqx(hash_tag(key).encode(), 0) % SLOTS
