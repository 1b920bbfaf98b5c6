"""Processes a benchmark starts and stops: gateways, a bare websockets server, redis-server.

Everything here is synchronous (subprocess, sockets, urllib) so both the asyncio bench
driver and the acceptance command can use it. Every wait is bounded; every process
started is stopped by the handle's ``stop()`` (the callers use ``try/finally``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
CLUSTER_SCRIPT = ROOT / "config" / "redis-cluster" / "cluster.sh"


def tune_client_gc() -> None:
    """Give a client worker process the gateway's garbage-collector settings (frozen
    start-up objects, ``gc_thresholds``' default): a worker holding thousands of
    connections otherwise spent more CPU per connect in full collections than on the
    connect, on the cores the gateway shares (docs/benchmarks.md "Method notes")."""
    from gateway.cli import tune_gc
    from presence.settings import Settings

    tune_gc(Settings().gc_thresholds)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Return once 127.0.0.1:port accepts a TCP connection; raise after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def rss_kb(pid: int) -> int:
    """VmRSS of a process in KiB (from /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (from /proc/<pid>/stat)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def http_get(url: str, timeout: float = 5.0, token: str | None = None) -> str:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return str(resp.read().decode())


def _sample_sum(text: str, metric: str) -> float | None:
    """The sum of every sample of ``metric`` in a /metrics text, or None if absent."""
    total, seen = 0.0, False
    for line in text.splitlines():
        if line.startswith(metric) and line[len(metric) : len(metric) + 1] in (" ", "{"):
            total += float(line.rsplit(" ", 1)[1])
            seen = True
    return total if seen else None


def scrape(admin_url: str, metric: str) -> float | None:
    """The sum of every sample of ``metric`` in the gateway's /metrics, or None."""
    try:
        text = http_get(f"{admin_url}/metrics", timeout=3.0)
    except OSError:
        return None
    return _sample_sum(text, metric)


def scrape_all(admin_url: str, metrics: tuple[str, ...]) -> dict[str, float] | None:
    """The sums of the samples of each of ``metrics`` from one read of the gateway's
    /metrics (0.0 for one it does not have), or None when it cannot be read."""
    try:
        text = http_get(f"{admin_url}/metrics", timeout=3.0)
    except OSError:
        return None
    return {metric: _sample_sum(text, metric) or 0.0 for metric in metrics}


def histogram_quantiles(admin_url: str, metric: str,
                        qs: tuple[float, ...] = (0.5, 0.95, 0.99)) -> dict[float, float | None]:
    """Upper bucket bounds (seconds) holding the ``qs`` quantiles of a histogram."""
    try:
        text = http_get(f"{admin_url}/metrics", timeout=3.0)
    except OSError:
        return {}
    buckets: list[tuple[float, float]] = []
    prefix = f"{metric}_bucket{{"
    for line in text.splitlines():
        if line.startswith(prefix) and 'le="' in line:
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float(le), float(line.rsplit(" ", 1)[1])))
    buckets.sort()
    total = buckets[-1][1] if buckets else 0.0
    out: dict[float, float | None] = {}
    for q in qs:
        out[q] = next((le for le, cum in buckets if total and cum >= q * total), None)
    return out


def _presence_cmd() -> list[str]:
    """The gateway command; ``LOADTEST_GATEWAY_CMD`` replaces it (e.g. to run the
    gateway under ``py-spy record -o profile.svg --`` or a patched build)."""
    custom = os.environ.get("LOADTEST_GATEWAY_CMD")
    if custom:
        return shlex.split(custom)
    script = Path(sys.executable).parent / "presence"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c",
            "import sys; from gateway.cli import main; sys.argv[0] = 'presence'; "
            "sys.exit(main())"]


def _terminate(proc: subprocess.Popen[bytes], grace: float) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@dataclass
class Gateway:
    """A ``presence serve`` process on free ports, memory backend unless told otherwise."""

    port: int
    admin_port: int
    secret: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM (the gateway drains), then SIGKILL after ``grace`` seconds.

        The log is removed after a clean exit (unless ``LOADTEST_KEEP_LOGS`` is set) and
        kept (``loadtest/results/gateway-<port>.log.tmp``) otherwise.
        """
        _terminate(self.proc, grace)
        if self.proc.returncode == 0 and not os.environ.get("LOADTEST_KEEP_LOGS"):
            with contextlib.suppress(OSError):
                self.log_path.unlink()

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def start_gateway(
    secret: str | None = None,
    env: dict[str, str] | None = None,
    redis_cluster: str | None = None,
    node_id: str | None = None,
    timeout: float = 20.0,
    port: int | None = None,
    admin_port: int | None = None,
    log_path: Path | None = None,
) -> Gateway:
    """Start a gateway and wait until its public port accepts connections.

    ``env`` adds ``PRESENCE_*`` settings (e.g. ``{"PRESENCE_COALESCE_MS": "0"}``). Ports
    are free ones unless given (a restarted gateway keeps its ports). The process log
    goes to ``log_path`` when given (appended to, so a restart keeps the earlier
    lines), else to a fresh ``loadtest/results/gateway-<port>.log.tmp``.
    """
    secret = secret or secrets.token_hex(32)
    port = port or free_port()
    admin_port = admin_port or free_port()
    cmd = [*_presence_cmd(), "serve", "--host", "127.0.0.1", "--port", str(port),
           "--admin-port", str(admin_port)]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PRESENCE_")}
    full_env.update({"PRESENCE_JWT_SECRET": secret, "PRESENCE_LOG_LEVEL": "warning",
                     "PRESENCE_AUTOSCALE_ENABLED": "false"})
    if redis_cluster:
        cmd += ["--redis-cluster", redis_cluster]
        full_env["PRESENCE_BACKEND"] = "redis"
        full_env["PRESENCE_REDIS_CLUSTER"] = redis_cluster
    else:
        full_env["PRESENCE_BACKEND"] = "memory"
    if node_id:
        cmd += ["--node-id", node_id]
    full_env.update(env or {})
    RESULTS.mkdir(exist_ok=True)
    mode = "ab" if log_path else "wb"
    log_path = log_path or RESULTS / f"gateway-{port}.log.tmp"
    with open(log_path, mode) as log:
        proc = subprocess.Popen(cmd, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                cwd=ROOT)
    gw = Gateway(port, admin_port, secret, proc, log_path)
    try:
        wait_port(port, timeout, proc)
    except Exception:
        gw.stop(2)
        raise RuntimeError(f"gateway did not start:\n{gw.log_tail()}") from None
    return gw


@dataclass
class PyServer:
    """A Python server module of this package run as ``python -m`` on a free port."""

    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        """SIGTERM, SIGKILL after 5 s; the log is removed unless the exit was unclean."""
        _terminate(self.proc, 5)
        clean = self.proc.returncode in (0, -signal.SIGTERM)
        if clean and self.log_path is not None and not os.environ.get("LOADTEST_KEEP_LOGS"):
            with contextlib.suppress(OSError):
                self.log_path.unlink()


def start_module(module: str, args: list[str], timeout: float = 20.0) -> PyServer:
    """Run ``python -m <module> --port N <args>`` and wait for it to listen."""
    port = free_port()
    RESULTS.mkdir(exist_ok=True)
    log_path = RESULTS / f"{module.rsplit('.', 1)[-1]}-{port}.log.tmp"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", module, "--port", str(port), *args],
                                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    server = PyServer(port, proc, log_path)
    try:
        wait_port(port, timeout, proc)
    except Exception:
        server.stop()
        raise RuntimeError(f"{module} did not start: {log_path.read_text()[-2000:]}") from None
    return server


@dataclass
class RedisServer:
    """A throw-away single redis-server (daemonized, nothing saved)."""

    port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(["redis-cli", "-p", str(self.port), "shutdown", "nosave"],
                           capture_output=True, timeout=10)


def start_redis() -> RedisServer:
    if shutil.which("redis-server") is None:
        raise RuntimeError("redis-server not found (apt-get install redis-server)")
    port = free_port()
    subprocess.run(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                    "--save", "", "--appendonly", "no", "--daemonize", "yes"],
                   check=True, capture_output=True, timeout=10)
    wait_port(port, 10)
    return RedisServer(port)


def cluster_script_exists() -> bool:
    return CLUSTER_SCRIPT.exists()


def cluster(action: str, base_port: int) -> None:
    """``config/redis-cluster/cluster.sh <action> <base_port>`` (start or stop)."""
    subprocess.run(["bash", str(CLUSTER_SCRIPT), action, str(base_port)], check=True,
                   timeout=120, capture_output=True)


def histogram_quantiles_merged(admin_urls: list[str], metric: str,
                               qs: tuple[float, ...] = (0.5, 0.95, 0.99)
                               ) -> dict[float, float | None]:
    """``histogram_quantiles`` of the buckets of several gateways added together (a
    gateway that does not answer is left out; ``{}`` when none answers)."""
    counts: dict[float, float] = {}
    prefix = f"{metric}_bucket{{"
    answered = False
    for admin_url in admin_urls:
        try:
            text = http_get(f"{admin_url}/metrics", timeout=3.0)
        except OSError:
            continue
        answered = True
        for line in text.splitlines():
            if line.startswith(prefix) and 'le="' in line:
                le = float(line.split('le="', 1)[1].split('"', 1)[0])
                counts[le] = counts.get(le, 0.0) + float(line.rsplit(" ", 1)[1])
    if not answered:
        return {}
    buckets = sorted(counts.items())
    total = buckets[-1][1] if buckets else 0.0
    return {q: next((le for le, cum in buckets if total and cum >= q * total), None)
            for q in qs}


def ports_in_use(ports: list[int]) -> list[int]:
    """The ports of ``ports`` on which something accepts TCP connections on 127.0.0.1."""
    busy = []
    for port in ports:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            busy.append(port)
    return busy
