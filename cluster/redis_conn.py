"""Connections to Redis shared by the Redis Store and Broker: one seam for both modes.

A :class:`Topology` hides whether the backend is a Redis Cluster (``redis_cluster`` =
``"host:port,host:port"`` startup nodes) or one plain Redis (``redis_url``): it gives
the command client (``RedisCluster`` or ``Redis``, same command surface), the master
that owns a key, a plain client per master (for pipelines and pub/sub connections),
and a way to refresh the slot map after a failover.

Every call is bounded in time (socket timeouts of a few seconds, and :func:`guarded`
puts a deadline over the library's own retries) and every Redis or socket error comes
out as :class:`~cluster.base.BackendUnavailable`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlparse

import hiredis
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from cluster.base import BackendUnavailable

T = TypeVar("T")
Addr = tuple[str, int]

LUA_DIR = Path(__file__).with_name("lua")


@dataclass(frozen=True, slots=True)
class RedisConfig:
    """Where Redis is and how long any one call may take (seconds)."""

    cluster: str = ""
    url: str = ""
    socket_timeout: float = 2.0
    connect_timeout: float = 2.0
    op_timeout: float = 5.0
    """Deadline of one Store/Broker call, retries included."""
    ping_timeout: float = 1.0
    """Deadline of one health check ping."""
    username: str = ""
    password: str = field(default="", repr=False)
    """Credentials every connection to every node sends first (``AUTH``); for ``url``
    they may be in the URL instead (``redis://user:password@host``). Empty: none."""

    def __post_init__(self) -> None:
        if bool(self.cluster) == bool(self.url):
            raise ValueError("exactly one of cluster and url must be set")

    def credentials(self) -> tuple[str, str]:
        """``(username, password)``: the configured ones, else the URL's; empty if none."""
        if self.password or not self.url:
            return self.username, self.password
        u = urlparse(self.url)
        return unquote(u.username or ""), unquote(u.password or "")

    def auth_command(self) -> tuple[str, ...]:
        """The ``AUTH`` command a connection of our own sends first, or ``()``."""
        user, password = self.credentials()
        if not password:
            return ()
        return ("AUTH", user, password) if user else ("AUTH", password)


def parse_nodes(spec: str) -> list[Addr]:
    """``"h1:p1,h2:p2"`` -> ``[("h1", p1), ("h2", p2)]``; raises ValueError if malformed."""
    out: list[Addr] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        host, sep, port = part.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"bad Redis node {part!r}: expected host:port")
        out.append((host, int(port)))
    if not out:
        raise ValueError("no Redis Cluster startup node given")
    return out


async def guarded(aw: Awaitable[T], timeout: float | None) -> T:
    """Await ``aw`` with a deadline (none for an awaitable that bounds itself: a timer
    per call is not free); Redis, socket and timeout errors become
    :class:`BackendUnavailable`. (redis-py's ``RedisClusterException``, raised when no
    startup node answers, is not a ``RedisError``: it is one of these all the same.)"""
    try:
        if timeout is None:
            return await aw
        async with asyncio.timeout(timeout):
            return await aw
    except BackendUnavailable:
        raise
    except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:
        raise BackendUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc


def execute(client: Any, *args: Any) -> Awaitable[Any]:
    """``client.execute_command(*args)`` for either client type (typed loosely on
    purpose: redis-py types the two classes' methods differently)."""
    aw: Awaitable[Any] = client.execute_command(*args)
    return aw


async def open_transport(addr: Addr, protocol: asyncio.Protocol,
                         timeout: float | None) -> asyncio.Transport:
    """A TCP connection to ``addr`` driven by ``protocol``, with keepalive on, for the
    connections of our own (raises ``OSError`` or ``TimeoutError`` after ``timeout``)."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        transport, _ = await loop.create_connection(lambda: protocol, *addr)
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    return transport


def pack(args: Sequence[Any]) -> bytes:
    """One command in RESP, packed by hiredis (for the connections of our own)."""
    # hiredis' stub types the argument as a one-element tuple; it takes any length.
    command: Any = tuple(args)
    packed: bytes = hiredis.pack_command(command)
    return packed


def text(value: Any) -> str:
    """A Redis reply (bytes, or str when decoded) as ``str``."""
    return value.decode() if isinstance(value, bytes) else str(value)


def load_script(name: str) -> str:
    """The text of ``cluster/lua/<name>.lua``."""
    return (LUA_DIR / f"{name}.lua").read_text()


@dataclass(frozen=True, slots=True)
class Script:
    """One Lua script of ``cluster/lua``, run by SHA (``EVALSHA``).

    A node that does not know the script (restarted, promoted, flushed) answers
    ``NOSCRIPT``; the caller then sends it once with ``EVAL`` (:func:`as_eval`), which
    also caches it on that node.
    """

    name: str
    text: str
    sha: str

    def call(self, keys: Sequence[str], args: Sequence[Any]) -> tuple[Any, ...]:
        """The ``EVALSHA`` command running this script (all ``keys`` in one slot)."""
        return ("EVALSHA", self.sha, len(keys), *keys, *args)


_SCRIPTS: dict[str, Script] = {}
"""Every script loaded, by SHA (for the ``NOSCRIPT`` fallback)."""


def script(name: str) -> Script:
    """The script ``cluster/lua/<name>.lua``, read and registered once per process."""
    for known in _SCRIPTS.values():
        if known.name == name:
            return known
    body = load_script(name)
    loaded = Script(name, body, hashlib.sha1(body.encode()).hexdigest())
    _SCRIPTS[loaded.sha] = loaded
    return loaded


def as_eval(args: Sequence[Any]) -> tuple[Any, ...] | None:
    """The ``EVAL`` equivalent of an ``EVALSHA`` command of a known script, else None."""
    if len(args) < 2 or args[0] != "EVALSHA":
        return None
    known = _SCRIPTS.get(text(args[1]))
    return None if known is None else ("EVAL", known.text, *args[2:])


def _retry() -> Retry:
    # One quick retry at most: callers get BackendUnavailable fast and decide themselves.
    return Retry(ExponentialBackoff(cap=0.2, base=0.02), 1)


COMMANDS_IN_FLIGHT = 64
"""Commands through the command client at once, per process (see Topology)."""


class Topology:
    """The Redis deployment behind the backend (cluster or single), see module doc."""

    def __init__(self, config: RedisConfig) -> None:
        self.config = config
        self._node_clients: dict[Addr, Redis] = {}
        self._refreshing: asyncio.Task[None] | None = None
        # Commands of the command client in flight at once: past its pool's bound (100
        # connections per node) redis-py's async cluster client raises
        # MaxConnectionsError instead of waiting, and a reconnect storm's snapshot
        # reads were answered "overloaded". Beyond this many, a command waits (within
        # its deadline).
        self._in_flight = asyncio.Semaphore(COMMANDS_IN_FLIGHT)
        self.client: Redis | RedisCluster
        self.cluster: RedisCluster | None = None
        self._single: Addr | None = None
        common: dict[str, Any] = {
            "socket_timeout": config.socket_timeout,
            "socket_connect_timeout": config.connect_timeout,
            "socket_keepalive": True,
            "health_check_interval": 10,
            "retry": _retry(),
            **self._auth_kwargs(),
        }
        if config.cluster:
            nodes = [ClusterNode(h, p) for h, p in parse_nodes(config.cluster)]
            self.cluster = RedisCluster(startup_nodes=nodes, **common)
            self.client = self.cluster
        else:
            u = urlparse(config.url)
            self._single = (u.hostname or "127.0.0.1", u.port or 6379)
            self.client = Redis.from_url(config.url, **common)
            self._node_clients[self._single] = self.client

    @property
    def is_cluster(self) -> bool:
        return self.cluster is not None

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for a plain client to one node (timeouts, keepalive,
        credentials)."""
        return {
            "socket_timeout": self.config.socket_timeout,
            "socket_connect_timeout": self.config.connect_timeout,
            "socket_keepalive": True,
            "retry": _retry(),
            **self._auth_kwargs(),
        }

    def _auth_kwargs(self) -> dict[str, str]:
        # Only the configured ones: a URL's credentials reach Redis.from_url by the URL.
        if not self.config.password:
            return {}
        kw = {"password": self.config.password}
        if self.config.username:
            kw["username"] = self.config.username
        return kw

    async def start(self) -> None:
        if self.cluster is not None:
            await guarded(self.cluster.initialize(), self.config.op_timeout)
        else:
            await self.command("PING")

    async def close(self) -> None:
        if self._refreshing is not None and not self._refreshing.done():
            self._refreshing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refreshing
        clients = list(self._node_clients.values())
        if self.cluster is not None:
            clients.append(self.client)  # type: ignore[arg-type]
        self._node_clients.clear()
        for c in clients:
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                await asyncio.wait_for(c.aclose(), self.config.op_timeout)

    def owner(self, key: str) -> Addr:
        """The master that owns ``key``'s slot, by the current map (may be stale)."""
        if self.cluster is None:
            assert self._single is not None
            return self._single
        try:
            node = self.cluster.get_node_from_key(key)
        except RedisError as exc:
            raise BackendUnavailable(f"redis: no owner for {key!r}: {exc}") from exc
        if node is None:
            raise BackendUnavailable(f"redis: no owner for {key!r}")
        return (node.host, int(node.port))

    def masters(self) -> list[Addr]:
        if self.cluster is None:
            assert self._single is not None
            return [self._single]
        return sorted({(n.host, int(n.port)) for n in self.cluster.get_primaries()})

    def node_client(self, addr: Addr) -> Redis:
        """A plain client (with its own pool) to one master."""
        c = self._node_clients.get(addr)
        if c is None:
            c = Redis(host=addr[0], port=addr[1], **self.client_kwargs())
            self._node_clients[addr] = c
        return c

    async def refresh(self) -> None:
        """Re-read the slot map (cluster; a no-op for a single Redis) and close the
        plain clients of nodes that are no longer masters (a dead or demoted node:
        nothing should keep talking to it)."""
        if self.cluster is None:
            return
        await guarded(self.cluster.nodes_manager.initialize(), self.config.op_timeout)
        current = set(self.masters())
        stale = [a for a in self._node_clients if a not in current]
        for addr in stale:
            client = self._node_clients.pop(addr)
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                await asyncio.wait_for(client.aclose(), self.config.ping_timeout)

    def refresh_soon(self) -> None:
        """Re-read the slot map in the background (one refresh at a time; failures are
        ignored: the next failed write asks again)."""
        if self.cluster is None:
            return
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.create_task(self._refresh_quietly())

    async def _refresh_quietly(self) -> None:
        with contextlib.suppress(BackendUnavailable):
            await self.refresh()

    async def healthy(self) -> bool:
        """True when reads and writes of every slot work now.

        That is: every master of the current slot map answers PING and (cluster)
        reports ``cluster_state:ok``, within ``ping_timeout``. When one does not, the
        slot map is re-read once and the masters of the new map are asked: after a
        failover the dead master is no longer in it (its replica is), so health
        follows the cluster instead of probing a dead node forever. Before the
        promotion the dead master still owns its slots, and health is rightly False.
        """
        if await self._masters_answer():
            return True
        if self.cluster is None:
            return False
        try:
            await self.refresh()
        except BackendUnavailable:
            return False
        return await self._masters_answer()

    async def _masters_answer(self) -> bool:
        async def one(addr: Addr) -> bool:
            c = self.node_client(addr)
            try:
                await guarded(execute(c, "PING"), self.config.ping_timeout)
                if self.cluster is not None:
                    info = await guarded(
                        execute(c, "CLUSTER INFO"), self.config.ping_timeout
                    )
                    if isinstance(info, dict):  # parsed by redis-py's callback
                        state = info.get("cluster_state", info.get(b"cluster_state"))
                        return state in ("ok", b"ok")
                    return "cluster_state:ok" in text(info)
            except BackendUnavailable:
                return False
            return True

        results = await asyncio.gather(*(one(a) for a in self.masters()))
        return all(results)

    async def command(self, *args: Any) -> Any:
        """One command through the command client (routed by key in a cluster); an
        ``EVALSHA`` the node does not know is sent again as ``EVAL``."""
        try:
            return await guarded(self._command(args), self.config.op_timeout)
        except BackendUnavailable:
            self.refresh_soon()  # a failover may have moved the slot
            raise

    async def _command(self, args: tuple[Any, ...]) -> Any:
        async with self._in_flight:
            try:
                return await execute(self.client, *args)
            except NoScriptError:
                fallback = as_eval(args)
                if fallback is None:
                    raise
                return await execute(self.client, *fallback)

    async def eval(self, lua: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run a Lua script (all ``keys`` in one slot) by SHA with the command client."""
        return await self.command(*lua.call(keys, args))

    def pipeline(self) -> Any:
        """A non-transactional pipeline of the command client (split per master in a
        cluster and sent concurrently)."""
        return self.client.pipeline(transaction=False)

    async def run(self, pipe: Any) -> list[Any]:
        """Execute ``pipe`` within the deadline; any failed command raises."""
        try:
            result: list[Any] = await guarded(pipe.execute(), self.config.op_timeout)
        except BackendUnavailable:
            self.refresh_soon()
            raise
        return result


__all__ = [
    "Addr",
    "BackendUnavailable",
    "RedisConfig",
    "Script",
    "Topology",
    "as_eval",
    "execute",
    "guarded",
    "load_script",
    "parse_nodes",
    "script",
    "text",
]
