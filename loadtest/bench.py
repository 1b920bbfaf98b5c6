"""Benchmark driver: one gateway process measured by several asyncio client processes.

Usage (from the repository root, in the load venv)::

    python -m loadtest.bench [all|idle|propagation|fanout|cluster|peer|acceptance ...]
                             [--runs N] [--acceptance-runs N] [--quick]
                             [--profile | --no-profile] [--write-docs [FILE]]
                             [--procs N] [--connections N] [--duration S] [--no-plots]

Measurements (DESIGN.md, "Targets"):

- ``idle``: connections held and server RSS per idle connection (VmRSS before/after),
  and the connect rate (hello + join, concurrent);
- ``propagation``: propagation p50/p95/p99 at 1,000 updates/s into 20-member channels,
  delivered against expected deliveries, server CPU per delivered update;
- ``fanout``: frames/s of one channel of 250, 500 and 1,000 members against bare
  ``websockets.broadcast()`` of the same payload size to the same number of clients;
- ``cluster``: the propagation measurement through Redis Cluster across two gateways,
  each run with the single-process figures of the same run (p99 added, CPU ratio);
  skipped with a message when ``config/redis-cluster/cluster.sh`` is missing;
- ``peer``: the same room workload on python-socketio with its Redis manager;
- ``acceptance``: the Locust acceptance run (``loadtest.acceptance``, 2,000 users,
  60 s); ``all`` includes it except with ``--quick`` (the smoke runs it on its own).

Every measurement but ``acceptance`` runs ``--runs`` times (default 3, 1 with
``--quick``); ``acceptance`` runs ``--acceptance-runs`` times (default 1). The table
gives each figure as ``median (min-max)`` over the runs, the runs it comes from, the
target and a verdict (``met`` or ``missed by X %``; ``loadtest/verdicts.py``). Ratios
(gateway/bare, cluster/one process, ours/python-socketio) are taken within each run,
then their median and spread over the runs.

``--profile`` (the default for ``all`` without ``--quick``): for each measurement with
a target missed, one more run with the gateway recorded by py-spy
(``loadtest/profiling.py``); the top 10 functions by own and by total samples are
printed, the raw profile is kept in ``loadtest/results/profile-*.txt.tmp``. The
profiled run's figures are not counted.

Writes ``loadtest/results/bench.json`` (every run's figures, their median/min/max, the
rows, and the command and time that measured them; merged with the results of
measurements not run this time) and PNG plots to ``loadtest/results/``. With
``LOADTEST_GATEWAY_CMD`` set (the gateway of another checkout, for comparisons) they
go to ``bench-other.json.tmp`` and ``*.png.tmp`` instead, and ``--write-docs`` is
refused: the committed record holds this checkout's figures only. ``--write-docs``
rewrites the generated section of ``docs/benchmarks.md`` (between
``<!-- bench:begin -->`` and ``<!-- bench:end -->``) with this invocation's table,
command line, machine and time. ``--quick`` shrinks every size for a CI smoke run (its
files end in ``.tmp``). Exit status 1 when a run failed or produced no latency samples;
targets missed only print.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loadtest import acceptance, measures, plots, profiling, verdicts
from loadtest.procs import RESULTS, ROOT
from loadtest.profiling import Probe

ALL = ("idle", "propagation", "fanout", "cluster", "peer", "acceptance")
DOCS = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def _acceptance(sz: measures.Sizes, probe: Probe | None = None) -> dict[str, Any]:
    # loadtest.acceptance starts its own gateway: the probe finds it among our children.
    stop = profiling.watch_child(probe, "gateway") if probe is not None else None
    try:
        return acceptance.measure(sz.acceptance_users, sz.acceptance_duration)
    finally:
        if stop is not None:
            stop()


RUNNERS: dict[str, Callable[[measures.Sizes, Probe | None], dict[str, Any]]] = {
    "acceptance": _acceptance,
    "idle": measures.measure_idle,
    "propagation": measures.measure_propagation,
    "fanout": measures.measure_fanout,
    "cluster": measures.measure_cluster,
    "peer": measures.measure_peer,
}


def machine() -> dict[str, Any]:
    model, mem_kb = "", None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
                break
    except (OSError, ValueError):
        pass
    return {"nproc": os.cpu_count(), "cpu": model, "python": platform.python_version(),
            "platform": platform.platform(),
            "memory_gib": round(mem_kb / 2**20, 1) if mem_kb else None}


def machine_text(m: dict[str, Any]) -> str:
    return (f"{m.get('nproc')} CPUs ({m.get('cpu') or 'model unknown'}), "
            f"{m.get('memory_gib')} GiB, Python {m.get('python')}, {m.get('platform')}")


def strip_samples(obj: Any, keep: Callable[[Any], bool] = lambda _: False) -> Any:
    """The result without raw latency samples (kept only for the plots); ``keep`` spares
    the dicts it accepts (the run whose samples are plotted)."""
    if isinstance(obj, dict):
        if keep(obj):
            return obj
        return {k: strip_samples(v, keep) for k, v in obj.items() if k != "samples"}
    if isinstance(obj, list):
        return [strip_samples(v, keep) for v in obj]
    return obj


def check(name: str, r: dict[str, Any]) -> str | None:
    """Why a run counts as broken (not as a missed target), or None."""
    if "error" in r:
        return f"{name}: {r['error'].strip().splitlines()[-1]}"
    if "skipped" in r:
        return None
    if name in ("propagation", "cluster") and not r["latency_ms"]["n"]:
        return f"{name}: no latency samples"
    if name == "cluster" and not r["single"]["latency_ms"]["n"]:
        return "cluster: no latency samples from the single process"
    if name == "acceptance" and not r.get("propagation_samples"):
        return "acceptance: no propagation samples"
    if name == "idle" and not r["connected"]:
        return "idle: no connection held"
    if name == "fanout" and not all(p["gateway_frames_per_s"] for p in r["points"]):
        return "fanout: the gateway delivered no frames"
    if name == "peer" and not (r["ours"]["steps"][0]["latency_ms"]["n"]
                               and r["peer"]["steps"][0]["latency_ms"]["n"]):
        return "peer: no latency samples"
    return None


# -- runs ----------------------------------------------------------------------------------
def one_run(name: str, sz: measures.Sizes, probe: Probe | None = None) -> dict[str, Any]:
    t0 = time.monotonic()
    try:
        run = RUNNERS[name](sz, probe)
    except Exception:
        run = {"error": traceback.format_exc()}
        print(run["error"], file=sys.stderr)
    run["elapsed_s"] = round(time.monotonic() - t0, 1)
    run["figures"] = verdicts.figures(name, run)
    return run


def finish(name: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A measurement's entry: its runs, the spread of every figure, the table rows."""
    per_run = [r["figures"] for r in runs]
    entry: dict[str, Any] = {"runs": runs, "summary": verdicts.summarize(per_run),
                             "plot_run": verdicts.representative(name, per_run)}
    entry["rows"] = [dataclasses.asdict(row) for row in verdicts.rows(name, entry)]
    return entry


def repeat(name: str, sz: measures.Sizes, n: int) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    for i in range(n):
        print(f"== {name} (run {i + 1} of {n}) ...", flush=True)
        runs.append(one_run(name, sz))
        print(f"   done in {runs[-1]['elapsed_s']} s", flush=True)
        if "skipped" in runs[-1]:
            break
    return finish(name, runs)


def profiled(name: str, sz: measures.Sizes) -> dict[str, Any]:
    """One more run with the gateway recorded by py-spy; its figures are not counted."""
    print(f"== {name} (one more run, gateway profiled with py-spy) ...", flush=True)
    probe = profiling.PySpy(name, RESULTS)
    run = one_run(name, sz, probe)
    probe.end()
    print(f"   done in {run['elapsed_s']} s", flush=True)
    out = {"figures": run["figures"], **probe.summary()}
    if "error" in run:
        out["run_error"] = run["error"].strip().splitlines()[-1]
    return out


def profile_text(name: str, prof: dict[str, Any]) -> list[str]:
    files = [w["file"] for w in prof.get("windows", []) if "error" not in w]
    errors = sorted({w["error"] for w in prof.get("windows", []) if "error" in w})
    head = f"profile of {name}'s gateway"
    if not prof.get("samples"):
        why = "; ".join(errors) or prof.get("run_error") or "no samples recorded"
        return [f"{head}: not taken: {why}"]
    pids = sorted({w["pid"] for w in prof["windows"]})
    lines = [f"{head} (pid {', '.join(map(str, pids))}, {len(files)} window(s) of the "
             f"profiled run; raw: {', '.join(os.path.relpath(f, ROOT) for f in files)})"]
    lines += [f"  window not recorded: {e}" for e in errors]
    return lines + profiling.format_top(prof)


# -- output ---------------------------------------------------------------------------------
HEADER = ("measure", "figure: median (min-max)", "runs", "target", "verdict")


def table_rows(results: dict[str, Any]) -> list[tuple[str, ...]]:
    return [(r["measure"], r["figure"], r["runs"], r["target"], r["verdict"])
            for name in ALL if name in results for r in results[name]["rows"]]


def print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max([len(HEADER[i]), *(len(r[i]) for r in rows)]) for i in range(len(HEADER) - 1)]
    for line in (HEADER, tuple("-" * len(h) for h in HEADER), *rows):
        print("  ".join(f"{c:<{w}}" for c, w in zip(line, widths, strict=False))
              + "  " + line[-1])


def docs_section(rows: list[tuple[str, ...]], doc: dict[str, Any],
                 profiles: dict[str, dict[str, Any]]) -> str:
    """The generated part of docs/benchmarks.md, markers included."""
    def cell(text: str) -> str:
        indent = len(text) - len(text.lstrip(" "))
        return "&emsp;" * (indent // 2) + text.strip().replace("|", "\\|") or " "

    runs = doc["runs"]
    lines = [BEGIN, "",
             f"`{doc['command']}` at {doc['generated_at']} (`generated_at` of `bench.json`), "
             f"on {machine_text(doc['machine'])}."
             + (" Quick sizes (CI smoke): not the targets' sizes." if doc["quick"] else ""),
             f"{runs} run(s) of each measurement (acceptance: {doc['acceptance_runs']}); "
             "every figure is the median (min-max) over the runs, ratios are taken within "
             "each run; verdicts on the median, deliveries on every run.", "",
             "| " + " | ".join(HEADER) + " |", "|" + " --- |" * len(HEADER)]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    for name, prof in profiles.items():
        lines += ["", "```", *profile_text(name, prof), "```"]
    return "\n".join([*lines, "", END])


def write_docs(path: Path, section: str) -> None:
    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{path}: no {BEGIN} ... {END} section to rewrite")
    i, j = text.index(BEGIN), text.index(END) + len(END)
    path.write_text(text[:i] + section + text[j:])


def save(args: argparse.Namespace, doc: dict[str, Any], results: dict[str, Any]) -> None:
    """bench.json (merged with earlier results), the samples side file, the plots."""
    RESULTS.mkdir(exist_ok=True)
    previous: dict[str, Any] = {}
    if args.output.exists() and not args.quick:
        try:
            previous = json.loads(args.output.read_text()).get("results", {})
        except (OSError, ValueError):
            previous = {}
    # Each measurement says which invocation measured it: a merged file holds several.
    stamped = {name: {**entry, "command": doc["command"], "generated_at": doc["generated_at"]}
               for name, entry in strip_samples(results).items()}
    merged = {**previous, **stamped}
    args.output.write_text(json.dumps({**doc, "results": merged}, indent=2) + "\n")
    # Raw latency samples stay out of bench.json; a side file (ignored by git) keeps
    # those of the run nearest the median so that the plots can show measurements of
    # earlier invocations too.
    plotted = {id(e["runs"][e["plot_run"]]) for e in results.values()
               if e.get("plot_run") is not None}
    with_samples = strip_samples(results, keep=lambda d: id(d) in plotted)
    samples_path = args.output.with_name(args.output.name + ".samples.tmp")
    if not args.quick:
        old: dict[str, Any] = {}
        if samples_path.exists():
            try:
                old = json.loads(samples_path.read_text())
            except (OSError, ValueError):
                old = {}
        with_samples = {**merged, **old, **with_samples}
        samples_path.write_text(json.dumps(with_samples))
    if not args.no_plots:
        scratch = args.output.name.endswith(".tmp")
        for path in plots.draw(with_samples, RESULTS,
                               suffix=".png.tmp" if scratch else ".png"):
            print(f"plot: {path}")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench",
                                     description="Gateway benchmarks (see docs/benchmarks.md)")
    parser.add_argument("what", nargs="*", choices=[*ALL, "all"], default=["all"])
    parser.add_argument("--quick", action="store_true", help="small sizes, for CI smoke")
    parser.add_argument("--runs", type=int, help="runs of each measurement but acceptance "
                        "(default 3, 1 with --quick)")
    parser.add_argument("--acceptance-runs", type=int, default=1)
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction,
                        help="profile the gateway with py-spy in one more run of each "
                        "measurement with a target missed (default: with all, not --quick)")
    parser.add_argument("--write-docs", nargs="?", type=Path, const=DOCS, metavar="FILE",
                        help=f"rewrite the generated section of {DOCS.relative_to(ROOT)}")
    parser.add_argument("--procs", type=int, help="client processes (default 2)")
    parser.add_argument("--connections", type=int, help="idle connections (default 10000)")
    parser.add_argument("--duration", type=float, help="seconds per propagation window")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--output", type=Path, help="default loadtest/results/bench.json "
                        "(bench-quick.json.tmp with --quick, so smoke runs leave no files)")
    args = parser.parse_args(argv)
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    if args.runs < 1 or args.acceptance_runs < 1:
        parser.error("--runs and --acceptance-runs must be at least 1")
    if args.profile is None:
        args.profile = "all" in args.what and not args.quick
    if args.write_docs == DOCS and args.quick:
        parser.error(f"--write-docs with --quick would put smoke sizes into "
                     f"{DOCS.relative_to(ROOT)} (give another FILE)")
    other = bool(os.environ.get("LOADTEST_GATEWAY_CMD"))  # another checkout's gateway
    if other and args.write_docs == DOCS:
        parser.error(f"--write-docs with LOADTEST_GATEWAY_CMD would put another gateway's "
                     f"figures into {DOCS.relative_to(ROOT)} (give another FILE)")
    if args.output is None:
        # Only this checkout's full-size figures go into the committed bench.json.
        args.output = RESULTS / ("bench-quick.json.tmp" if args.quick
                                 else "bench-other.json.tmp" if other else "bench.json")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    command = shlex.join(["python", "-m", "loadtest.bench",
                          *(sys.argv[1:] if argv is None else argv)])
    sz = dataclasses.replace(measures.QUICK) if args.quick else measures.Sizes()
    if args.procs:
        sz.procs = args.procs
    if args.connections:
        sz.idle_conns = args.connections
    if args.duration:
        sz.duration = args.duration
    if "all" in args.what:
        what = tuple(m for m in ALL if not (args.quick and m == "acceptance"))
    else:
        what = tuple(dict.fromkeys(args.what))

    results = {name: repeat(name, sz, args.acceptance_runs if name == "acceptance"
                            else args.runs) for name in what}
    profiles: dict[str, dict[str, Any]] = {}
    if args.profile:
        for name, entry in results.items():
            missed = verdicts.missed(verdicts.rows(name, entry))
            if missed:
                print(f"== {name}: target missed ({missed[0].measure.strip()}: "
                      f"{missed[0].verdict})", flush=True)
                profiles[name] = entry["profile"] = profiled(name, sz)

    doc = {"machine": machine(), "quick": args.quick, "command": command,
           "runs": args.runs, "acceptance_runs": args.acceptance_runs,
           "sizes": dataclasses.asdict(sz),
           "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    save(args, doc, results)
    rows = table_rows(results)
    print()
    print_table(rows)
    print(f"\n{args.runs} run(s) per measurement (acceptance: {args.acceptance_runs}); "
          "figures: median (min-max) over the runs; ratios taken within each run; "
          "verdicts on the median, deliveries on every run.")
    if args.quick:
        print("quick sizes (CI smoke): the figures are not at the targets' sizes.")
    for name, prof in profiles.items():
        print()
        print("\n".join(profile_text(name, prof)))
    print(f"\nJSON: {args.output}")
    if args.write_docs:
        write_docs(args.write_docs, docs_section(rows, doc, profiles))
        print(f"docs: {args.write_docs} (generated section rewritten)")
    broken = [b for n, e in results.items() for r in e["runs"] if (b := check(n, r))]
    for b in broken:
        print(f"BROKEN: {b}", file=sys.stderr)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
