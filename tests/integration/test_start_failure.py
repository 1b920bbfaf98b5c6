"""A gateway that cannot start (its port is taken) exits, with the reason, on the
cluster backend too: its node and autoscaler had started, and the loop's teardown
waited for good on a task whose cancel had been swallowed (found when two ports of
one test gateway came out equal)."""

from __future__ import annotations

import asyncio
import os
import socket
import sys

import pytest

from tests.fixtures.processes import CLUSTER_ENV, new_secret

pytestmark = pytest.mark.redis


async def test_a_gateway_whose_port_is_taken_exits_and_says_why(redis_cluster: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PRESENCE_")}
        env.update(CLUSTER_ENV, PRESENCE_JWT_SECRET=new_secret())
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.cli", "serve", "--node-id", "taken",
            "--port", str(port), "--admin-port", "0", "--redis-cluster", redis_cluster,
            env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        try:
            _out, err = await asyncio.wait_for(proc.communicate(), 30)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert proc.returncode == 1, err.decode()[-2000:]
    assert b"address already in use" in err
