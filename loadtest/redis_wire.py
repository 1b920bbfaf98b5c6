"""CPU per Redis round trip and per pub/sub message: the cluster path's own connections
against the redis-py ways they replaced.

``python -m loadtest.redis_wire [--runs 3] [--trips 5000] [--messages 20000]`` starts
one throw-away redis-server on loopback and measures, in this process (uvloop), the CPU
time (``time.process_time``) of:

- the write path: one ``SPUBLISH`` round trip at a time through
  :class:`cluster.node_pipe.NodePipe`, through a redis-py ``Connection`` used directly
  (``send_packed_command`` + ``parse_response``, the design before it) and through a
  redis-py ``Pipeline`` (the design before that);
- the receive path: messages that the server itself publishes in a burst (one ``EVAL``
  of a loop of ``SPUBLISH``), read by :class:`cluster.redis_subscriber.NodeSubscriber`
  and by a redis-py ``PubSub.get_message()`` loop.

Each figure is the median (min-max) over the runs. Every loop is bounded in count and
in time (a missing reply or message fails the run after ``--timeout`` seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis
import uvloop
from redis.asyncio import Redis

from cluster.node_pipe import NodePipe
from cluster.redis_subscriber import NodeSubscriber
from loadtest.procs import start_redis

CHANNEL = "{wire}topic"
PAYLOAD = b"x" * 120  # about one presence update on the wire
BURST = "for i = 1, tonumber(ARGV[2]) do redis.call('SPUBLISH', KEYS[1], ARGV[1]) end"


async def _cpu_per(count: int, body: Callable[[], Awaitable[None]], timeout: float) -> float:
    """CPU microseconds per item of ``count`` items that ``body`` handles."""
    start = time.process_time()
    await asyncio.wait_for(body(), timeout)
    return (time.process_time() - start) / count * 1e6


async def trips_node_pipe(port: int, trips: int, timeout: float) -> float:
    client = Redis(host="127.0.0.1", port=port)
    pipe = NodePipe(client, timeout)
    command = ("SPUBLISH", CHANNEL, PAYLOAD)
    await pipe.execute([command])  # connected before the clock starts

    async def body() -> None:
        for _ in range(trips):
            await pipe.execute([command])

    try:
        return await _cpu_per(trips, body, timeout)
    finally:
        await pipe.close()
        await client.aclose()


async def trips_redis_py_connection(port: int, trips: int, timeout: float) -> float:
    client = Redis(host="127.0.0.1", port=port)
    pool: Any = client.connection_pool
    conn: Any = pool.connection_class(**pool.connection_kwargs)
    await conn.connect()
    command = ("SPUBLISH", CHANNEL, PAYLOAD)

    async def body() -> None:
        for _ in range(trips):
            await conn.send_packed_command(conn.pack_commands([command]), check_health=False)
            await client.parse_response(conn, command[0])

    try:
        return await _cpu_per(trips, body, timeout)
    finally:
        await conn.disconnect()
        await client.aclose()


async def trips_redis_py_pipeline(port: int, trips: int, timeout: float) -> float:
    client = Redis(host="127.0.0.1", port=port)

    async def body() -> None:
        for _ in range(trips):
            pipe = client.pipeline(transaction=False)
            pipe.execute_command("SPUBLISH", CHANNEL, PAYLOAD)
            await pipe.execute()

    try:
        await client.ping()
        return await _cpu_per(trips, body, timeout)
    finally:
        await client.aclose()


def _burst(port: int, messages: int) -> None:
    with redis.Redis("127.0.0.1", port, socket_timeout=30) as c:
        c.eval(BURST, 1, CHANNEL, PAYLOAD, messages)


async def messages_node_subscriber(port: int, messages: int, timeout: float) -> float:
    got = 0
    all_in = asyncio.Event()

    def on_message(_channel: str, _data: bytes) -> None:
        nonlocal got
        got += 1
        if got == messages:
            all_in.set()

    def on_lost(_sub: NodeSubscriber, channels: frozenset[str]) -> None:
        if channels:
            raise RuntimeError(f"subscriber lost {sorted(channels)}")

    sub = NodeSubscriber(("127.0.0.1", port), on_message, on_lost, timeout, timeout)
    await sub.subscribe([CHANNEL])
    loop = asyncio.get_running_loop()

    async def body() -> None:
        burst = loop.run_in_executor(None, _burst, port, messages)
        await all_in.wait()
        await burst

    try:
        return await _cpu_per(messages, body, timeout)
    finally:
        await sub.close()


async def messages_redis_py_pubsub(port: int, messages: int, timeout: float) -> float:
    client = Redis(host="127.0.0.1", port=port, health_check_interval=0)
    pubsub: Any = client.pubsub(ignore_subscribe_messages=True)
    await pubsub.ssubscribe(CHANNEL)  # its ack is read (and skipped) before the burst
    loop = asyncio.get_running_loop()

    async def body() -> None:
        burst = loop.run_in_executor(None, _burst, port, messages)
        got = 0
        while got < messages:
            msg = await pubsub.get_message(timeout=1.0)
            if msg is not None and msg["type"] == "smessage":
                got += 1
        await burst

    try:
        return await _cpu_per(messages, body, timeout)
    finally:
        await pubsub.aclose()
        await client.aclose()


def _figure(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f}) us"


async def run(args: argparse.Namespace) -> None:
    server = start_redis()
    try:
        rows: dict[str, list[float]] = {}
        for _ in range(args.runs):
            port, t = server.port, args.timeout
            for name, measure, count in (
                ("round trip, NodePipe", trips_node_pipe, args.trips),
                ("round trip, redis-py Connection", trips_redis_py_connection, args.trips),
                ("round trip, redis-py Pipeline", trips_redis_py_pipeline, args.trips),
                ("message, NodeSubscriber", messages_node_subscriber, args.messages),
                ("message, redis-py PubSub.get_message", messages_redis_py_pubsub,
                 args.messages),
            ):
                rows.setdefault(name, []).append(await measure(port, count, t))
        print(f"CPU of this process, {args.runs} run(s): median (min-max)")
        for name, values in rows.items():
            print(f"  {name:<40} {_figure(values)}")
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--trips", type=int, default=5000)
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="seconds any one measurement may take")
    uvloop.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
