"""The chaos test's short schedule: every fault class once (``loadtest/chaos.py``).

It runs ``python -m loadtest.chaos`` as a process of its own: 3 gateways on a 6-node
Redis Cluster of its own (one fault class restarts the cluster empty, so it cannot be
the session's shared one), on ``PRESENCE_TEST_CHAOS_PORT`` (default 7500) .. +5: not
the shared fixture's 7100 nor the benchmarks' 7300. The command's own bounds (every
fault's convergence, the whole run) fail it before the pytest timeout does; its output
is shown when it fails. The seed is fixed so that a failure can be replayed with the
same command line.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.redis

ROOT = Path(__file__).resolve().parents[2]
SEED = 1
RUN_BOUND = 300.0
"""Seconds the whole command may take (it takes about 100 on the 2-core CI machine)."""


@pytest.mark.timeout(RUN_BOUND + 30)
def test_every_fault_class_once_converges() -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed: apt-get install redis-server")
    port = os.environ.get("PRESENCE_TEST_CHAOS_PORT", "7500")
    cmd = [sys.executable, "-m", "loadtest.chaos", "--seed", str(SEED), "--faults", "6",
           "--base-port", port, "--max-seconds", str(RUN_BOUND - 60)]
    try:
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                             timeout=RUN_BOUND, check=False)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else str(exc.stdout)
        pytest.fail(f"chaos run exceeded {RUN_BOUND} s:\n{out[-6000:]}")
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{out[-8000:]}"
    assert "PASS" in res.stdout
    for cls in ("kill_busy_master", "kill_idle_master", "stop_master", "stop_gateway",
                "kill_gateway", "restart_cluster"):
        assert f"\n{cls} " in res.stdout, f"{cls} missing from the summary:\n{out[-4000:]}"
