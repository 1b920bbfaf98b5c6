"""Profiles of a gateway process with py-spy, taken when a bench target is missed.

:class:`PySpy` is the probe the measurements accept: ``begin(pid, label)`` starts
``py-spy record --pid <pid> --format raw --function`` (collapsed stacks, one line
``frame;frame;frame count`` per stack, frames ``function (file:first line)``),
``end()`` stops it with SIGINT (py-spy then writes its file; it also stops by itself
when the process exits). A measurement may open several windows (one per fan-out
size); :meth:`PySpy.summary` adds them up and ranks the functions by own samples (the
innermost frame) and by total samples (anywhere in the stack, once per stack).

py-spy needs ptrace permission on the gateway (root, or ``kernel.yama.ptrace_scope``
0, or CAP_SYS_PTRACE). When it cannot run or attach, the reason is recorded and the
bench carries on. Raw files go to ``loadtest/results/profile-*.txt.tmp`` (git-ignored).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol


class Probe(Protocol):
    """What a measurement calls around the window it wants recorded."""

    def begin(self, pid: int, label: str) -> None: ...

    def end(self) -> None: ...


# -- collapsed stacks ------------------------------------------------------------------
def parse_collapsed(text: str) -> Counter[tuple[str, ...]]:
    """``frame;frame;frame count`` lines to a counter of stacks (outermost first)."""
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in text.splitlines():
        stack, sep, count = line.rstrip().rpartition(" ")
        if not sep or not stack or not count.isdigit():
            continue
        stacks[tuple(stack.split(";"))] += int(count)
    return stacks


_SITE = re.compile(r"^.*?/(?:site|dist)-packages/")
_STDLIB = re.compile(r"^/usr/(?:local/)?lib/python3\.\d+/")


def short_frame(frame: str) -> str:
    """A frame with its file path shortened (site-packages and stdlib prefixes dropped)."""
    m = re.match(r"^(.*) \((.*)\)$", frame)
    if not m:
        return frame
    func, where = m.groups()
    where = _STDLIB.sub("", _SITE.sub("", where))
    return f"{func} ({where})"


def top_functions(stacks: Mapping[tuple[str, ...], int], n: int = 10) -> dict[str, Any]:
    """The ``n`` functions with the most own samples and with the most total samples.

    Frames found in every sample (the trunk: the module, ``main``, the event loop's
    ``run``) are left out of the total ranking and listed as ``trunk``.
    """
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for stack, count in stacks.items():
        if not stack:
            continue
        samples += count
        own[short_frame(stack[-1])] += count
        for frame in {short_frame(f) for f in stack}:
            total[frame] += count
    trunk = sorted(f for f, c in total.items() if c == samples)
    for f in trunk:
        del total[f]

    def ranked(c: Counter[str]) -> list[tuple[str, int]]:
        return sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[:n]

    return {"samples": samples, "own": ranked(own), "total": ranked(total), "trunk": trunk}


def format_top(top: Mapping[str, Any], indent: str = "  ") -> list[str]:
    """Both rankings as text lines (share of the samples, samples, function)."""
    samples = top.get("samples") or 0
    lines: list[str] = []
    for key, title in (("own", "by own samples"), ("total", "by total samples")):
        note = " below the frames in every sample" if key == "total" and top.get("trunk") \
            else ""
        lines.append(f"{indent}top {len(top.get(key, []))} functions {title}{note} "
                     f"(of {samples:,} samples):")
        for frame, count in top.get(key, []):
            share = count / samples * 100 if samples else 0.0
            lines.append(f"{indent}  {share:5.1f} %  {count:>7,}  {frame}")
    return lines


# -- the probe -----------------------------------------------------------------------------
def find_py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


class PySpy:
    """Records a gateway with ``py-spy record`` over the windows a measurement opens."""

    def __init__(self, name: str, outdir: Path, max_duration: float = 900.0) -> None:
        self.name = name
        self.outdir = outdir
        self.max_duration = max_duration
        self.windows: list[dict[str, Any]] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._current: dict[str, Any] | None = None
        self._log: Any = None

    def begin(self, pid: int, label: str) -> None:
        if self._proc is not None:
            self.end()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        base = self.outdir / f"profile-{self.name}-{label}-{stamp}"
        window: dict[str, Any] = {"label": label, "pid": pid, "file": f"{base}.txt.tmp"}
        self.windows.append(window)
        exe = find_py_spy()
        if exe is None:
            window["error"] = "py-spy not found (it is in the load extra: pip install py-spy)"
            return
        self.outdir.mkdir(exist_ok=True)
        log = open(f"{base}.log.tmp", "wb")  # noqa: SIM115 - closed in end()
        window["log"] = log.name
        cmd = [exe, "record", "--pid", str(pid), "--duration", str(int(self.max_duration)),
               "--format", "raw", "--function", "-o", window["file"]]
        try:
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        except OSError as exc:
            log.close()
            window["error"] = f"py-spy did not start: {exc}"
            return
        self._current = window
        self._log = log
        window["started"] = time.monotonic()
        time.sleep(0.2)  # let it attach before the window's work starts
        if self._proc.poll() is not None:
            self.end()

    def end(self) -> None:
        proc, window = self._proc, self._current
        if proc is None or window is None:
            return
        self._proc = self._current = None
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self._log.close()
        window["seconds"] = round(time.monotonic() - window.pop("started"), 1)
        path = Path(window["file"])
        if proc.returncode != 0 or not path.exists():
            lines = [ln.strip() for ln in Path(window["log"]).read_text(errors="replace")
                     .splitlines() if ln.strip()]
            why = next((ln for ln in lines if "rror" in ln or "ermission" in ln),
                       lines[-1] if lines else "nothing written (stopped while attaching?)")
            window["error"] = f"py-spy exited with {proc.returncode}: {why[:200]}"

    def summary(self, n: int = 10) -> dict[str, Any]:
        """Every window's file added up, ranked; errors of windows that recorded nothing."""
        stacks: Counter[tuple[str, ...]] = Counter()
        for w in self.windows:
            path = Path(w["file"])
            if "error" not in w and path.exists():
                stacks.update(parse_collapsed(path.read_text(errors="replace")))
        return {"windows": self.windows, **top_functions(stacks, n)}


def children(pid: int | None = None) -> Iterable[tuple[int, list[str]]]:
    """(pid, argv) of the direct children of ``pid`` (default: this process)."""
    parent = os.getpid() if pid is None else pid
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            if ppid != parent:
                continue
            argv = (d / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except (OSError, ValueError):
            continue
        yield int(d.name), argv


def is_gateway(argv: list[str]) -> bool:
    return "serve" in argv and any("presence" in a or "gateway.cli" in a for a in argv)


def watch_child(probe: Probe, label: str, match: Callable[[list[str]], bool] = is_gateway,
                timeout: float = 60.0) -> Callable[[], None]:
    """Begin ``probe`` on the first child process ``match`` accepts, from a thread.

    For measurements that start their gateway where no probe can be passed (the
    acceptance run). Returns the function that stops watching and ends the probe.
    """
    import threading

    done = threading.Event()

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while not done.is_set() and time.monotonic() < deadline:
            for pid, argv in children():
                if match(argv):
                    probe.begin(pid, label)
                    return
            done.wait(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()

    def stop() -> None:
        done.set()
        thread.join(5)
        probe.end()

    return stop
