"""The ``presence`` command as a real process: serve, token, SIGTERM drain."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time

import jwt

from gateway.client import PresenceClient

PRESENCE = [sys.executable, "-m", "gateway.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_token_command_signs_with_configured_secret() -> None:
    secret = secrets.token_urlsafe(32)
    out = subprocess.run(
        [*PRESENCE, "token", "--user", "u7", "--channels", "team:*,org:acme:*", "--role", "csm",
         "--tier", "paid", "--ttl", "600"],
        env={**os.environ, "PRESENCE_JWT_SECRET": secret}, capture_output=True, text=True,
        timeout=30, check=True,
    ).stdout.strip()
    claims = jwt.decode(out, secret, algorithms=["HS256"])
    assert claims["sub"] == "u7" and claims["channels"] == ["team:*", "org:acme:*"]
    assert claims["role"] == "csm" and claims["tier"] == "paid"
    assert 590 <= claims["exp"] - time.time() <= 601


def test_token_command_without_secret_says_what_to_set() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRESENCE_")}
    res = subprocess.run([*PRESENCE, "token", "--user", "u"], env=env, capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 2 and "PRESENCE_JWT_SECRET" in res.stderr


def test_bad_setting_is_named() -> None:
    env = {**os.environ, "PRESENCE_MAX_FRAME": "lots"}
    res = subprocess.run([*PRESENCE, "serve"], env=env, capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 2 and "max_frame" in res.stderr


async def _read_until(stream: asyncio.StreamReader, pattern: str, timeout: float) -> str:
    seen = ""
    async with asyncio.timeout(timeout):
        while not re.search(pattern, seen):
            line = await stream.readline()
            if not line:
                raise AssertionError(f"process ended before {pattern!r}:\n{seen}")
            seen += line.decode()
    return seen


async def test_serve_with_dev_secret_then_sigterm_drains() -> None:
    port, admin = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRESENCE_")}
    env["PRESENCE_DRAIN_TIMEOUT"] = "3"
    proc = await asyncio.create_subprocess_exec(
        *PRESENCE, "serve", "--port", str(port), "--admin-port", str(admin),
        env=env, stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
    )
    assert proc.stderr is not None
    try:
        banner = await _read_until(proc.stderr, r"presence: serving ws://", 20)
        token = re.search(r"dev token[^\n]*\n\s*(\S+)", banner)
        assert token is not None, banner
        # The secret is printed once for the developer, never in a JSON log line.
        secret = re.search(r"PRESENCE_JWT_SECRET=(\S+)", banner)
        assert secret is not None
        logs = [ln for ln in banner.splitlines() if ln.startswith("{")]
        assert all(secret.group(1) not in ln and token.group(1) not in ln for ln in logs)
        url = f"ws://127.0.0.1:{port}/ws"
        a = await PresenceClient.connect(url, token.group(1))
        b = await PresenceClient.connect(url, token.group(1))
        await a.join("team:w1")
        await b.join("team:w1")
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code, reason = await a.wait_closed(10)
        assert code == 1012 and "reconnect in" in reason
        assert (await b.wait_closed(10))[0] == 1012
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        assert time.monotonic() - started < 5
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_tune_gc_freezes_what_lives_and_sets_the_thresholds() -> None:
    import gc

    from gateway.cli import tune_gc

    before = gc.get_threshold()
    try:
        frozen = tune_gc((12_345, 7, 3))
        assert gc.get_threshold() == (12_345, 7, 3)
        assert frozen == gc.get_freeze_count() > 0
        # A cycle made after the freeze is still collected.
        a: list[object] = []
        a.append(a)
        del a
        assert gc.collect() >= 1
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
