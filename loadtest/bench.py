"""Benchmark driver: one gateway process measured by several asyncio client processes.

Usage (from the repository root, in the load venv)::

    python -m loadtest.bench [all|idle|propagation|fanout|cluster|peer ...] [--quick]
                             [--procs N] [--connections N] [--duration S]

Measurements (DESIGN.md, "Targets"):

- ``idle``: connections held and server RSS per idle connection (VmRSS before/after),
  and the connect rate (hello + join, concurrent);
- ``propagation``: propagation p50/p95/p99 at 1,000 updates/s into 20-member channels;
- ``fanout``: frames/s of one channel of 1,000 members against bare
  ``websockets.broadcast()`` of the same payload size to the same number of clients;
- ``cluster``: the propagation measurement through Redis Cluster across two gateways
  (skipped with a message when ``config/redis-cluster/cluster.sh`` is missing);
- ``peer``: the same room workload on python-socketio with its Redis manager;
- ``acceptance``: the Locust acceptance run (``loadtest.acceptance``, 2,000 users,
  60 s); ``all`` includes it except with ``--quick`` (the smoke runs it on its own).

Prints a table, writes ``loadtest/results/bench.json`` (merged with the figures of
measurements not run this time) and PNG plots to ``loadtest/results/``. ``--quick``
shrinks every size for a CI smoke run (under a minute or two). Exit status 1 when a
measurement failed or produced no latency samples; targets missed only print.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loadtest import acceptance, measures, plots
from loadtest.procs import RESULTS
from loadtest.stats import fmt

ALL = ("idle", "propagation", "fanout", "cluster", "peer", "acceptance")
RUNNERS: dict[str, Callable[[measures.Sizes], dict[str, Any]]] = {
    "acceptance": lambda sz: acceptance.measure(sz.acceptance_users, sz.acceptance_duration),
    "idle": measures.measure_idle,
    "propagation": measures.measure_propagation,
    "fanout": measures.measure_fanout,
    "cluster": measures.measure_cluster,
    "peer": measures.measure_peer,
}


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": model, "python": platform.python_version(),
            "platform": platform.platform()}


def strip_samples(obj: Any) -> Any:
    """The result without raw latency samples (kept only for the plots)."""
    if isinstance(obj, dict):
        return {k: strip_samples(v) for k, v in obj.items() if k != "samples"}
    if isinstance(obj, list):
        return [strip_samples(v) for v in obj]
    return obj


def lat(d: dict[str, Any] | None) -> str:
    if not d:
        return "-"
    return f"{fmt(d.get('p50'), '', 0)} / {fmt(d.get('p95'), '', 0)} / {fmt(d.get('p99'), '', 0)}"


def table(res: dict[str, Any], all_res: dict[str, Any] | None = None
          ) -> list[tuple[str, str, str]]:
    """(measure, figure, target) rows for the stdout table and docs/benchmarks.md.

    ``all_res`` (default ``res``) supplies the single-node propagation baseline that the
    Redis Cluster row subtracts, when that measurement was not run this time.
    """
    all_res = res if all_res is None else all_res
    rows: list[tuple[str, str, str]] = []
    if (r := res.get("idle")) and "error" not in r:
        rows += [
            ("connections held (idle)", f"{fmt(r['connected'])} of {fmt(r['target'])}",
             "10,000"),
            ("server RSS per idle connection (hello+join)", fmt(r["kb_per_connection"], " KB"),
             "< 18 KB"),
            ("server RSS per idle connection (hello only)",
             fmt(r["hello_only"]["kb_per_connection"], " KB"), "< 18 KB"),
            ("connect rate (hello+join)", fmt(r["connect_rate"], " conn/s", 0), "-"),
            ("connect time p50 / p99", f"{fmt(r['connect_ms']['p50'])} / "
             f"{fmt(r['connect_ms']['p99'])} ms", "-"),
        ]
    if (r := res.get("acceptance")) and "error" not in r:
        pm = r.get("propagation_ms") or {}
        rows += [
            (f"Locust acceptance: {r['users']} users, {r['duration']:.0f} s, {r['scenario']}",
             f"held {fmt(r['connections_held'], '', 0)}, errors {r['errors']}, connect p50 "
             f"{fmt(r['connect_p50_ms'], ' ms', 0)}", "no errors"),
            ("Locust propagation p50/p95/p99", lat(pm) + " ms", "p95 < 2,000 ms"),
        ]
    if (r := res.get("propagation")) and "error" not in r:
        rows.append((f"propagation p50/p95/p99 @ {fmt(r['rate'], '', 0)} upd/s, "
                     f"{r['channel_size']}-member channels",
                     lat(r["latency_ms"]) + " ms", "p99 < 250 ms"))
        srv = r.get("server_side_ms") or {}
        rows.append(("  of which in the gateway (ts -> written, bucket bounds)",
                     " / ".join(f"<= {fmt(srv.get(q), '', 0)}" for q in ("0.5", "0.95", "0.99"))
                     + " ms", "-"))
    if (r := res.get("fanout")) and "error" not in r:
        for p in r["points"]:
            rows.append((f"fan-out, 1 channel x {p['members']} members, "
                         f"{p['payload_bytes']} B frames",
                         f"{fmt(p['gateway_frames_per_s'], '', 0)} vs bare "
                         f"{fmt(p['bare_frames_per_s'], '', 0)} frames/s = "
                         f"{fmt(p['ratio'], '', 2)}", ">= 0.75"))
    if (r := res.get("cluster")):
        if "skipped" in r:
            rows.append(("propagation via Redis Cluster", "skipped: " + r["skipped"], "-"))
        elif "error" not in r:
            base = (all_res.get("propagation") or {}).get("latency_ms", {}).get("p99")
            added = r["latency_ms"]["p99"] - base if base is not None and \
                r["latency_ms"]["p99"] is not None else None
            rows.append(("propagation via Redis Cluster, 2 gateways",
                         lat(r["latency_ms"]) + f" ms (p99 added {fmt(added, ' ms', 0)})",
                         "p99 added < 100 ms"))
    if (r := res.get("peer")) and "error" not in r:
        for who in ("ours", "peer"):
            s = r[who]
            rows.append((f"{who}: max sustained upd/s ({r['clients']} clients, rooms of "
                         f"{r['channel_size']})",
                         f"{fmt(s['max_sustained'], '', 0)} (CPU "
                         f"{fmt(s['cpu_us_per_entry'], ' us', 1)}/delivered update)", "-"))
        rows.append(("ours / python-socketio", f"sustained x{fmt(r['ratio_sustained'], '', 2)}"
                     f", CPU efficiency x{fmt(r['ratio_cpu_efficiency'], '', 2)}", ">= 3x"))
    for name, r in res.items():
        if isinstance(r, dict) and "error" in r:
            rows.append((name, "FAILED: " + r["error"].splitlines()[-1][:80], "-"))
    return rows


def print_table(rows: list[tuple[str, str, str]]) -> None:
    w0 = max((len(r[0]) for r in rows), default=10)
    w1 = max((len(r[1]) for r in rows), default=10)
    print(f"{'measure':<{w0}}  {'figure':<{w1}}  target")
    print(f"{'-' * w0}  {'-' * w1}  ------")
    for a, b, c in rows:
        print(f"{a:<{w0}}  {b:<{w1}}  {c}")


def check(name: str, r: dict[str, Any]) -> str | None:
    """Why a measurement counts as broken (not as a missed target), or None."""
    if "error" in r:
        return f"{name}: {r['error'].splitlines()[-1]}"
    if name in ("propagation", "cluster") and "skipped" not in r and not r["latency_ms"]["n"]:
        return f"{name}: no latency samples"
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench",
                                     description="Gateway benchmarks (see docs/benchmarks.md)")
    parser.add_argument("what", nargs="*", choices=[*ALL, "all"], default=["all"])
    parser.add_argument("--quick", action="store_true", help="small sizes, for CI smoke")
    parser.add_argument("--procs", type=int, help="client processes (default 2)")
    parser.add_argument("--connections", type=int, help="idle connections (default 10000)")
    parser.add_argument("--duration", type=float, help="seconds per propagation window")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--output", type=Path, help="default loadtest/results/bench.json "
                        "(bench-quick.json.tmp with --quick, so smoke runs leave no files)")
    args = parser.parse_args(argv)
    if args.output is None:
        args.output = RESULTS / ("bench-quick.json.tmp" if args.quick else "bench.json")
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

    results: dict[str, Any] = {}
    for name in what:
        print(f"== {name} ...", flush=True)
        t0 = time.monotonic()
        try:
            results[name] = RUNNERS[name](sz)
        except Exception:
            results[name] = {"error": traceback.format_exc()}
            print(results[name]["error"], file=sys.stderr)
        results[name]["elapsed_s"] = round(time.monotonic() - t0, 1)
        print(f"   done in {results[name]['elapsed_s']} s", flush=True)

    RESULTS.mkdir(exist_ok=True)
    previous: dict[str, Any] = {}
    if args.output.exists() and not args.quick:
        try:
            previous = json.loads(args.output.read_text()).get("results", {})
        except (OSError, ValueError):
            previous = {}
    merged = {**previous, **strip_samples(results)}
    doc = {"machine": machine(), "quick": args.quick, "sizes": dataclasses.asdict(sz),
           "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "results": merged}
    args.output.write_text(json.dumps(doc, indent=2) + "\n")
    # Raw latency samples stay out of bench.json; a side file (ignored by git) keeps
    # them so that the plots can show measurements of earlier runs too.
    samples_path = args.output.with_name(args.output.name + ".samples.tmp")
    with_samples = results
    if not args.quick:
        old: dict[str, Any] = {}
        if samples_path.exists():
            try:
                old = json.loads(samples_path.read_text())
            except (OSError, ValueError):
                old = {}
        with_samples = {**merged, **old, **results}
        samples_path.write_text(json.dumps(with_samples))
    if not args.no_plots:
        for path in plots.draw(with_samples, RESULTS,
                               suffix=".png.tmp" if args.quick else ".png"):
            print(f"plot: {path}")
    print()
    print_table(table(strip_samples(results), merged))
    print(f"\nJSON: {args.output}")
    broken = [b for n, r in results.items() if (b := check(n, r))]
    for b in broken:
        print(f"BROKEN: {b}", file=sys.stderr)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
