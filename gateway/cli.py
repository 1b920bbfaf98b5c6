"""The ``presence`` command: ``presence serve`` and ``presence token``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import resource
import secrets
import signal
import sys
from collections.abc import Sequence

import structlog
import uvloop

from cluster.tasks import cancel_until_done
from gateway.auth import ROLES, TIERS, mint_token
from gateway.config import load_settings
from gateway.logs import configure_logging
from presence.settings import Settings, SettingsError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="presence", description="Real-time presence server")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run a gateway process")
    s.add_argument("--config", help="TOML settings file")
    s.add_argument("--host", help="public bind address (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="public WebSocket port (default 8765)")
    s.add_argument("--admin-host", help="admin bind address (default 127.0.0.1)")
    s.add_argument("--admin-port", type=int, help="admin HTTP port (default 9090)")
    s.add_argument("--node-id", help="node id (default: random)")
    s.add_argument("--redis-cluster", help="Redis Cluster startup nodes host:port,host:port")
    s.add_argument("--redis-url", help="plain Redis URL redis://host:port/0")
    s.add_argument("--log-level", help="debug, info, warning, error")
    s.add_argument("--demo", action="store_true", default=None,
                   help="drive simulated teams and churn scores through the server")

    t = sub.add_parser("token", help="print a token signed with the configured secret")
    t.add_argument("--config", help="TOML settings file")
    t.add_argument("--user", required=True)
    t.add_argument("--channels", default="", help="comma-separated glob patterns")
    t.add_argument("--role", choices=ROLES, default="member")
    t.add_argument("--tier", choices=TIERS, default="free")
    t.add_argument("--ttl", type=float, default=3600.0, help="seconds until expiry")
    return p


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {
        k: getattr(args, k, None)
        for k in ("host", "port", "admin_host", "admin_port", "node_id", "redis_cluster",
                  "redis_url", "log_level", "demo")
    }
    return load_settings(args.config, overrides=overrides)


def _token(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if not settings.auth.jwt_secret:
        print("presence token: set PRESENCE_JWT_SECRET (or jwt_secret in --config) to the "
              "server's secret", file=sys.stderr)
        return 2
    channels = [c.strip() for c in args.channels.split(",") if c.strip()]
    print(mint_token(settings.auth.jwt_secret, args.user, channels, args.role, args.tier, args.ttl))
    return 0


async def _serve(settings: Settings) -> None:
    from gateway.server import Gateway

    gateway = Gateway(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Starting may wait for the backend; a signal meanwhile must still stop the process.
    starting = asyncio.ensure_future(gateway.start())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        await gateway.stop()
        await _end_leftovers()
        return
    stopping.cancel()
    try:
        starting.result()
    except BaseException:
        # A start that failed half-way (a port already taken, say) has started the node's
        # duties and the autoscaler: stop them here, or the loop's teardown, which cancels
        # what is left, waited on them for good and the process never exited.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(gateway.stop(), 10)
        await _end_leftovers()
        raise
    demo_task = None
    if settings.demo:
        from gateway.demo import run_demo

        demo_task = asyncio.ensure_future(run_demo(
            f"ws://{settings.transport.host}:{gateway.port}/ws",
            f"http://{settings.transport.admin_host}:{gateway.admin_port}",
            settings.auth.jwt_secret, stop,
        ))
    print(f"presence: serving ws://{settings.transport.host}:{gateway.port}/ws "
          f"(admin http://{settings.transport.admin_host}:{gateway.admin_port}, "
          f"dashboard http://{settings.transport.host}:{gateway.port}/dashboard)", file=sys.stderr,
          flush=True)
    await stop.wait()
    if demo_task is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(demo_task, 5)
    await gateway.stop()
    await _end_leftovers()


async def _end_leftovers() -> None:
    """End the tasks still running once the gateway has stopped, or exit without them.

    The loop's teardown cancels what is left once and then waits for it without a
    bound: a task whose cancel was swallowed kept the process alive for good (a start
    that failed on a taken port, on the cluster backend). Each is cancelled until it
    ends, for about 2 s; those that do not are logged (``tasks_left_at_exit``) and the
    process exits at once with status 1.
    """
    current = asyncio.current_task()
    left = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
    ended = await asyncio.gather(*(cancel_until_done(t) for t in left))
    stuck = [t for t, done in zip(left, ended, strict=True) if not done]
    if stuck:
        structlog.get_logger("presence.cli").warning(
            "tasks_left_at_exit", count=len(stuck),
            tasks=[f"{t.get_name()}: {t.get_coro()!r}" for t in stuck[:10]])
        sys.stderr.flush()
        os._exit(1)


def raise_fd_limit() -> tuple[int, int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; ``(soft before, soft after,
    hard)``. A process holding ``max_connections`` sockets needs more descriptors than
    the usual default soft limit; the hard limit is what the operator granted. Never
    raises: when the kernel refuses, the soft limit stays as it was."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard or soft == resource.RLIM_INFINITY:
        return soft, soft, hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        return soft, soft, hard
    return soft, resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard


def tune_gc(thresholds: tuple[int, int, int]) -> int:
    """Collect once, freeze what survives (the modules, classes and settings a process
    keeps for its whole life: no collection scans them again), then set the cyclic
    collector's ``thresholds``; returns the number of objects frozen. Called once,
    before serving: anything still alive at this point lives as long as the process."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*thresholds)
    return gc.get_freeze_count()


def _dev_secret(settings: Settings) -> Settings:
    """With no secret configured, make one up and print a token to try the server."""
    if settings.auth.jwt_secret or settings.auth.jwt_algorithm != "HS256":
        return settings
    secret = secrets.token_urlsafe(32)
    settings = settings.with_overrides(jwt_secret=secret)
    token = mint_token(secret, "demo", ["*"], role="admin", ttl=86400)
    print(
        "presence: no PRESENCE_JWT_SECRET set; generated a development secret for this run.\n"
        f"  export PRESENCE_JWT_SECRET={secret}\n"
        f"  dev token (user demo, role admin, all channels, 24 h):\n  {token}\n"
        f"  dashboard: http://{settings.transport.host}:{settings.transport.port}/dashboard#token={token}"
        f"&admin=http://{settings.transport.admin_host}:{settings.transport.admin_port}"
        + ("&team=team:w1&org=acme" if settings.demo else ""),
        file=sys.stderr, flush=True,
    )
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "token":
            return _token(args)
        settings = _dev_secret(_settings(args))
    except SettingsError as exc:
        print(f"presence: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    before, after, hard = raise_fd_limit()
    # The server lowers its connection cap below max_connections when even this limit
    # cannot hold them (gateway/server.py, connection_cap), and logs that too.
    log = structlog.get_logger("presence.cli")
    log.info("fd_limit", soft_before=before, soft=after, hard=hard,
             max_connections=settings.transport.max_connections)
    log.info("gc_tuned", frozen=tune_gc(settings.gc_thresholds),
             thresholds=list(settings.gc_thresholds))
    uvloop.run(_serve(settings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
