"""PNG plots of a bench run (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _cdf(ax: Any, samples: list[int], label: str) -> None:
    if not samples:
        return
    s = sorted(max(v, 0) + 0.5 for v in samples)  # +0.5: ms resolution, log axis
    n = len(s)
    step = max(1, n // 2000)
    xs = [*s[::step], s[-1]]
    ys = [*(i / n for i in range(0, n, step)), 1.0]
    ax.plot(xs, ys, label=f"{label} (n={n:,})")


def draw(results: dict[str, Any], outdir: Path, suffix: str = ".png") -> list[Path]:
    """Draw what the results allow; return the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    curves: list[tuple[list[int], str]] = []
    if (r := results.get("propagation")) and r.get("samples"):
        curves.append((r["samples"], f"one gateway, {r['rate']:.0f} upd/s"))
    if (r := results.get("cluster")) and r.get("samples"):
        curves.append((r["samples"], f"Redis Cluster, 2 gateways, {r['rate']:.0f} upd/s"))
    if (r := results.get("peer")) and "ours" in r:
        for who, name in (("ours", "ours"), ("peer", "python-socketio")):
            steps = r[who]["steps"]
            if steps:
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
        ax.set_title("Propagation latency distribution (CDF)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        path = outdir / f"latency{suffix}"
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=110)
        plt.close(fig)
        written.append(path)

    fan = (results.get("fanout") or {}).get("points") or []
    peer = results.get("peer") or {}
    if fan or "ours" in peer:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        ax = axes[0]
        if fan:
            members = [p["members"] for p in fan]
            ax.plot(members, [p["gateway_frames_per_s"] for p in fan], "o-", label="gateway")
            ax.plot(members, [p["bare_frames_per_s"] for p in fan], "s--",
                    label="bare websockets.broadcast()")
            ax.set_xlabel("connections in the channel")
            ax.set_ylabel("frames delivered per second")
            ax.set_title("Fan-out throughput against connections")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        ax = axes[1]
        if "ours" in peer:
            for who, name in (("ours", "ours"), ("peer", "python-socketio")):
                steps = peer[who]["steps"]
                ax.plot([s["offered"] for s in steps], [s["delivered_per_s"] for s in steps],
                        "o-", label=name)
            steps = peer["ours"]["steps"]
            ax.plot([s["offered"] for s in steps], [s["expected_per_s"] for s in steps], ":",
                    color="grey", label="offered x (room size - 1)")
            ax.set_xlabel(f"offered updates/s ({peer['clients']} connections)")
            ax.set_ylabel("updates delivered per second")
            ax.set_title("Room workload: ours against python-socketio")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        path = outdir / f"throughput{suffix}"
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=110)
        plt.close(fig)
        written.append(path)
    return written
