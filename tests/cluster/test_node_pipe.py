"""The write path's own connection per master (cluster/node_pipe.py), on the real cluster:
a connection the server dropped between batches is opened again and the batch lands
once; a batch cut off by its deadline leaves no reply behind for the next one; a frozen
master fails a batch within the socket timeout, not the call's whole deadline, and the
batch is not written a second time."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
import redis

from cluster.base import BackendUnavailable
from cluster.redis_conn import RedisConfig
from cluster.redis_link import RedisLink
from tests.cluster.conftest import flush
from tests.fixtures.redis_cluster import ClusterControl

pytestmark = pytest.mark.redis

KEY = "{pipe}value"
COUNTER = "{pipe}counter"


async def open_link(config: RedisConfig) -> AsyncIterator[RedisLink]:
    flush(config)
    link = RedisLink(config)
    holder = object()
    await link.attach(holder)
    try:
        yield link
    finally:
        await link.detach(holder)


@pytest.fixture
async def link(redis_cluster: str) -> AsyncIterator[RedisLink]:
    async for opened in open_link(RedisConfig(cluster=redis_cluster)):
        yield opened


@pytest.fixture
async def short_link(redis_cluster: str) -> AsyncIterator[RedisLink]:
    async for opened in open_link(RedisConfig(cluster=redis_cluster, op_timeout=0.3)):
        yield opened


def owner(link: RedisLink, key: str) -> redis.Redis:
    host, port = link.topology.owner(key)
    return redis.Redis(host, port, socket_timeout=5, socket_connect_timeout=2)


async def test_a_connection_the_server_dropped_is_opened_again_and_the_batch_lands_once(
    link: RedisLink,
) -> None:
    assert await link.batch.run([(KEY, ("SET", KEY, "a"))]) == [True]
    with owner(link, KEY) as node:
        # What a restart or the server's idle-client timeout does to our connection.
        killed = node.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        assert int(killed) >= 1
        assert await link.batch.run([(COUNTER, ("INCR", COUNTER))]) == [1]
        assert node.get(COUNTER) == b"1"


async def test_a_batch_past_its_deadline_leaves_no_reply_for_the_next_one(
    short_link: RedisLink,
) -> None:
    link = short_link
    assert await link.batch.run([(KEY, ("SET", KEY, "before"))]) == [True]
    with owner(link, KEY) as node:
        # Writes held for longer than the 0.3 s deadline: the SET's reply comes late.
        node.execute_command("CLIENT", "PAUSE", 600, "WRITE")
        try:
            with pytest.raises(BackendUnavailable):
                await link.batch.run([(KEY, ("SET", KEY, "late"))])
        finally:
            node.execute_command("CLIENT", "UNPAUSE")
        # On a connection left out of step, this GET would read the SET's "OK".
        (value,) = await link.batch.run([(KEY, ("GET", KEY))])
        assert value in (b"before", b"late")


async def test_a_frozen_master_fails_the_batch_within_the_socket_timeout_once(
    redis_cluster: str, redis_cluster_control: ClusterControl,
) -> None:
    """SIGSTOP on the master of the key, shorter than the cluster's node timeout (no
    failover). One batch is in flight at a time for the whole process, so it must give
    up within the socket timeout (0.5 s here), not the call's deadline (5 s): a batch
    that waited out a longer freeze would be answered by a master about to be demoted,
    and its writes lost with the demotion. And it is not written again: the master may
    run what sits in its socket buffer when it wakes."""
    config = RedisConfig(cluster=redis_cluster, socket_timeout=0.5, op_timeout=5.0)
    async for link in open_link(config):
        assert await link.batch.run([(COUNTER, ("SET", COUNTER, 0))]) == [True]
        port = link.topology.owner(COUNTER)[1]
        redis_cluster_control.pause(port)
        try:
            started = time.monotonic()
            with pytest.raises(BackendUnavailable):
                await link.batch.run([(COUNTER, ("INCR", COUNTER))])
            assert time.monotonic() - started < 2.0
        finally:
            redis_cluster_control.resume(port)
        (value,) = await link.batch.run([(COUNTER, ("GET", COUNTER))])
        assert value in (b"0", b"1")  # run late at most once, never twice


async def test_a_connection_opened_to_a_frozen_master_carries_no_batch(
    redis_cluster: str, redis_cluster_control: ClusterControl,
) -> None:
    """A frozen master's kernel still completes TCP connects. A batch written on such a
    new connection waits in the master's socket buffer and runs when it wakes, in any
    order against the batches buffered on the other connections (the chaos run's
    ``stop_master``: a leave overtaken by an earlier join's retry, a member left in
    the Store for good). So a new connection proves the master answers before a batch
    is written: of the three INCRs sent during the freeze, only the first (written on
    the connection that was open) may run."""
    config = RedisConfig(cluster=redis_cluster, socket_timeout=0.3, op_timeout=5.0)
    async for link in open_link(config):
        assert await link.batch.run([(COUNTER, ("SET", COUNTER, 0))]) == [True]
        port = link.topology.owner(COUNTER)[1]
        redis_cluster_control.pause(port)
        try:
            for _ in range(3):
                with pytest.raises(BackendUnavailable):
                    await link.batch.run([(COUNTER, ("INCR", COUNTER))])
        finally:
            redis_cluster_control.resume(port)
        (value,) = await link.batch.run([(COUNTER, ("GET", COUNTER))])
        assert value in (b"0", b"1")
