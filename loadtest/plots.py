"""PNG plots of a bench run (matplotlib, Agg backend: no display needed).

A measurement's entry holds its ``runs``; latency curves come from the run nearest the
median (``plot_run``, the one whose samples are kept), throughput points are the median
over the runs with their min-max as error bars. Entries of the older one-run format
(no ``runs``) are drawn as one run.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any


def _runs(entry: Any) -> list[dict[str, Any]]:
    if not isinstance(entry, dict):
        return []
    if "runs" not in entry:
        return [entry] if "error" not in entry and "skipped" not in entry else []
    return [r for r in entry["runs"] if "error" not in r and "skipped" not in r]


def _plotted(entry: Any) -> dict[str, Any] | None:
    """The run whose samples are plotted."""
    if not isinstance(entry, dict):
        return None
    if "runs" not in entry:
        return entry if "error" not in entry and "skipped" not in entry else None
    i = entry.get("plot_run")
    return entry["runs"][i] if i is not None else None


def _med_err(values: list[float]) -> tuple[float, float, float]:
    """Median, and its distances to the min and the max (error bar lengths)."""
    m = statistics.median(values)
    return m, m - min(values), max(values) - m


def _cdf(ax: Any, samples: list[int], label: str) -> None:
    if not samples:
        return
    s = sorted(max(v, 0) + 0.5 for v in samples)  # +0.5: ms resolution, log axis
    n = len(s)
    step = max(1, n // 2000)
    xs = [*s[::step], s[-1]]
    ys = [*(i / n for i in range(0, n, step)), 1.0]
    ax.plot(xs, ys, label=f"{label} (n={n:,})")


def _series(ax: Any, xs: list[float], per_x: list[list[float]], style: str, label: str) -> None:
    pts = [(x, _med_err(v)) for x, v in zip(xs, per_x, strict=True) if v]
    if not pts:
        return
    ax.errorbar([x for x, _ in pts], [m for _, (m, _, _) in pts],
                yerr=[[lo for _, (_, lo, _) in pts], [hi for _, (_, _, hi) in pts]],
                fmt=style, capsize=3, label=label)


def draw(results: dict[str, Any], outdir: Path, suffix: str = ".png") -> list[Path]:
    """Draw what the results allow; return the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    curves: list[tuple[list[int], str]] = []
    if (r := _plotted(results.get("propagation"))) and r.get("samples"):
        curves.append((r["samples"], f"one gateway, {r['rate']:.0f} upd/s"))
    if (r := _plotted(results.get("cluster"))) and r.get("samples"):
        curves.append((r["samples"], f"Redis Cluster, 2 gateways, {r['rate']:.0f} upd/s"))
    if (r := _plotted(results.get("peer"))) and "ours" in r:
        for who, name in (("ours", "ours"), ("peer", "python-socketio")):
            steps = r[who]["steps"]
            if steps and steps[-1].get("samples"):
                top = steps[-1]
                curves.append((top["samples"], f"{name}, offered {top['offered']:.0f} upd/s"))
    if curves:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for samples, label in curves:
            _cdf(ax, samples, label)
        ax.set_xscale("log")
        ax.set_xlabel("propagation latency (ms, receipt time - diff ts)")
        ax.set_ylabel("fraction of diffs")
        ax.axvline(250, color="grey", linestyle=":", linewidth=1)
        ax.set_title("Propagation latency distribution (CDF, the run nearest the median)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        path = outdir / f"latency{suffix}"
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=110)
        plt.close(fig)
        written.append(path)

    fan_runs = [r["points"] for r in _runs(results.get("fanout")) if r.get("points")]
    peer_runs = [r for r in _runs(results.get("peer")) if "ours" in r]
    if fan_runs or peer_runs:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        ax = axes[0]
        if fan_runs:
            members = sorted({p["members"] for pts in fan_runs for p in pts})
            for key, style, label in (("gateway_frames_per_s", "o-", "gateway"),
                                      ("bare_frames_per_s", "s--",
                                       "bare websockets.broadcast()")):
                per_x = [[p[key] for pts in fan_runs for p in pts
                          if p["members"] == m and p.get(key) is not None] for m in members]
                _series(ax, members, per_x, style, label)
            ax.set_xlabel("connections in the channel")
            ax.set_ylabel("frames delivered per second")
            ax.set_title(f"Fan-out throughput ({len(fan_runs)} run(s): median, min-max)")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        ax = axes[1]
        if peer_runs:
            offered = [s["offered"] for s in peer_runs[0]["ours"]["steps"]]
            for who, name in (("ours", "ours"), ("peer", "python-socketio")):
                per_x = [[s["delivered_per_s"] for r in peer_runs for s in r[who]["steps"]
                          if s["offered"] == o] for o in offered]
                _series(ax, offered, per_x, "o-", name)
            steps = peer_runs[0]["ours"]["steps"]
            ax.plot(offered, [s["expected_per_s"] for s in steps], ":",
                    color="grey", label="offered x (room size - 1)")
            ax.set_xlabel(f"offered updates/s ({peer_runs[0]['clients']} connections)")
            ax.set_ylabel("updates delivered per second")
            ax.set_title(f"Room workload: ours against python-socketio "
                         f"({len(peer_runs)} run(s))")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        path = outdir / f"throughput{suffix}"
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=110)
        plt.close(fig)
        written.append(path)
    return written
