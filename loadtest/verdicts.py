"""From the bench's repeated runs to the table: figures, median and spread, verdicts.

Pure functions (standard library only, importable without the load extra):

- :func:`figures` flattens one run of a measurement into named numbers; ratios that
  must come from one run (fan-out gateway/bare, cluster against single process, ours
  against python-socketio) are taken from the run itself, so their spread is the spread
  of per-run ratios;
- :func:`spread` and :func:`summarize` give the median, min and max of each figure over
  the runs;
- :class:`Target` and :func:`verdict` say ``met`` or ``missed by X %``;
- :func:`rows` builds the table rows of one measurement (DESIGN.md, "Targets").

Verdicts are taken on the median over the runs, except deliveries: every expected
delivery must arrive in every run.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Figures = dict[str, float | None]
Spread = dict[str, float]


# -- median and spread --------------------------------------------------------------------
def spread(values: Sequence[float | None]) -> Spread | None:
    """Median, min, max and count of the values that are not None; None if there are none."""
    vs = [float(v) for v in values if v is not None]
    if not vs:
        return None
    return {"median": statistics.median(vs), "min": min(vs), "max": max(vs), "n": len(vs)}


def summarize(runs: Sequence[Mapping[str, float | None]]) -> dict[str, Spread]:
    """The spread of every figure named in any of the runs (runs lacking it are left out)."""
    keys = list(dict.fromkeys(k for r in runs for k in r))
    out: dict[str, Spread] = {}
    for k in keys:
        s = spread([r.get(k) for r in runs])
        if s is not None:
            out[k] = s
    return out


def num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def fmt_spread(s: Spread | None, digits: int = 0, unit: str = "") -> str:
    """``median (min-max) unit``; the median alone for one run."""
    if s is None:
        return "-"
    text = num(s["median"], digits)
    if s["n"] > 1:
        sep = "-" if s["min"] >= 0 else " to "
        text += f" ({num(s['min'], digits)}{sep}{num(s['max'], digits)})"
    return text + unit


# -- targets and verdicts -------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """A bound a figure must keep: ``op`` is ``>=``, ``<`` or ``<=``."""

    op: str
    bound: float
    text: str

    def met(self, value: float) -> bool:
        if self.op == ">=":
            return value >= self.bound
        if self.op == "<":
            return value < self.bound
        if self.op == "<=":
            return value <= self.bound
        raise ValueError(f"unknown operator {self.op!r}")

    def miss_pct(self, value: float) -> float:
        """How far ``value`` is on the wrong side of the bound, in % of the bound."""
        gap = self.bound - value if self.op == ">=" else value - self.bound
        return max(gap, 0.0) / abs(self.bound) * 100


def pct(p: float) -> str:
    if p >= 1:
        return f"{p:,.0f} %"
    return "< 1 %" if p > 0 else "0 %"


def verdict(value: float | None, target: Target) -> str:
    """``met``, ``missed by X %`` (X of the bound), or ``-`` without a figure."""
    if value is None:
        return "-"
    if target.met(value):
        return "met"
    p = target.miss_pct(value)
    return f"missed by {pct(p)}" if p > 0 else "missed (at the bound)"


def lost_verdict(lost: Sequence[float | None], expected: Sequence[float | None]) -> str:
    """Every expected delivery in every run: ``met``, or what was lost in how many runs."""
    pairs = [(lo, ex) for lo, ex in zip(lost, expected, strict=True)
             if lo is not None and ex is not None]
    if not pairs:
        return "-"
    bad = [(lo, ex) for lo, ex in pairs if lo > 0]
    if not bad:
        return "met"
    worst_lost, worst_expected = max(bad, key=lambda p: p[0] / max(p[1], 1.0))
    return (f"missed: {num(worst_lost)} lost ({pct(worst_lost / max(worst_expected, 1.0) * 100)})"
            f" in {len(bad)} of {len(pairs)} runs")


def zero_verdict(counts: Sequence[float | None], noun: str) -> str:
    """None of ``noun`` in any run: ``met`` or ``missed: N <noun> in k of n runs``."""
    vs = [c for c in counts if c is not None]
    if not vs:
        return "-"
    bad = [c for c in vs if c > 0]
    if not bad:
        return "met"
    return f"missed: {num(max(bad))} {noun} in {len(bad)} of {len(vs)} runs"


# DESIGN.md, "Targets" (on one 2-core machine, load generator included).
HELD = 10_000
MEM_KB = Target("<", 18.0, "< 18 KB")
MEM_NEXT_KB = Target("<", 12.0, "< 12 KB")
CONNECTS = Target(">=", 1_500.0, ">= 1,500/s")
PROPAGATION_P99 = Target("<", 250.0, "< 250 ms at 1,000 upd/s")
PROPAGATION_RATE = 1_000.0
FANOUT = Target(">=", 1.2, ">= 1.2x bare")
FANOUT_MEMBERS = (250, 500, 1_000)
CLUSTER_ADDED = Target("<", 100.0, "< 100 ms (median of 3 runs)")
CLUSTER_CPU = Target("<=", 1.3, "<= 1.3x single process")
PEER = Target(">=", 3.0, ">= 3x")
ACCEPTANCE_P95 = Target("<", 2_000.0, "p95 < 2,000 ms")
ALL_DELIVERED = "every expected delivery"


# -- one run's figures -----------------------------------------------------------------------
def _lat(d: Mapping[str, Any] | None, prefix: str = "") -> Figures:
    d = d or {}
    return {f"{prefix}{q}": d.get(q) for q in ("p50", "p95", "p99")}


def _per(a: float | None, b: float | None, scale: float = 1.0) -> float | None:
    return a / b * scale if a is not None and b else None


def _propagation_figures(r: Mapping[str, Any], prefix: str = "") -> Figures:
    delivered, expected = r.get("entries"), r.get("expected_entries")
    tracked = r.get("deliveries") or {}  # per update and receiver (older runs: entries)
    lost = tracked.get("lost", max(expected - delivered, 0)
                       if expected is not None and delivered is not None else None)
    srv = r.get("server_side_ms") or {}
    out: Figures = {
        **_lat(r.get("latency_ms"), prefix),
        f"{prefix}delivered": delivered, f"{prefix}expected": expected,
        f"{prefix}lost": lost, f"{prefix}extra": tracked.get("extra"),
        f"{prefix}refused": tracked.get("refused_updates"),
        f"{prefix}cpu_us": r.get("cpu_us_per_delivery"),
        f"{prefix}rate": r.get("rate"), f"{prefix}clients": r.get("connected"),
    }
    if not prefix:
        out.update({f"srv_{q[2:]}": srv.get(q) for q in ("0.5", "0.95", "0.99")})
    return out


def figures(name: str, r: Mapping[str, Any]) -> Figures:
    """The named numbers of one run of measurement ``name`` (empty for a failed run)."""
    if "error" in r or "skipped" in r:
        return {}
    if name == "idle":
        hello = r.get("hello_only") or {}
        return {"connected": r.get("connected"), "tried": r.get("target"),
                "kb_join": r.get("kb_per_connection"), "kb_hello": hello.get("kb_per_connection"),
                "connect_rate": r.get("connect_rate"),
                "hello_connect_rate": hello.get("connect_rate"),
                "srv_us_connect": r.get("server_cpu_us_per_connect"),
                "srv_busy": r.get("server_busy"),
                "cli_us_connect": r.get("client_cpu_us_per_connect"),
                **_lat(r.get("connect_ms"), "connect_")}
    if name == "propagation":
        return _propagation_figures(r)
    if name == "cluster":
        return {**_propagation_figures(r), **_propagation_figures(r.get("single") or {}, "s_"),
                "p99_added": r.get("p99_added_ms"), "cpu_ratio": r.get("cpu_ratio")}
    if name == "fanout":
        out: Figures = {}
        for p in r.get("points", []):
            m = p["members"]
            out.update({f"ratio_{m}": p.get("ratio"), f"gw_fps_{m}": p.get("gateway_frames_per_s"),
                        f"bare_fps_{m}": p.get("bare_frames_per_s"),
                        f"bytes_{m}": p.get("payload_bytes"),
                        f"cpu_ratio_{m}": p.get("cpu_ratio"),
                        f"gw_us_{m}": p.get("gateway_cpu_us_per_frame"),
                        f"bare_us_{m}": p.get("bare_cpu_us_per_frame"),
                        f"written_ratio_{m}": p.get("written_ratio"),
                        f"gw_wps_{m}": p.get("gateway_written_per_s"),
                        f"bare_wps_{m}": p.get("bare_written_per_s"),
                        f"gw_backlog_{m}": p.get("gateway_backlog_mb"),
                        f"bare_backlog_{m}": p.get("bare_backlog_mb")})
        return out
    if name == "peer":
        ours, peer = r.get("ours") or {}, r.get("peer") or {}
        return {"ours_sustained": ours.get("max_sustained"),
                "peer_sustained": peer.get("max_sustained"),
                "ratio_sustained": r.get("ratio_sustained"),
                "ours_cpu_us": ours.get("cpu_us_per_entry"),
                "peer_cpu_us": peer.get("cpu_us_per_entry"),
                "ratio_cpu": r.get("ratio_cpu_efficiency"),
                "clients": r.get("clients"), "team": r.get("channel_size")}
    if name == "acceptance":
        return {"held": r.get("connections_held"), "errors": r.get("errors"),
                "users": r.get("users"), "connect_p50": r.get("connect_p50_ms"),
                "samples": r.get("propagation_samples"), **_lat(r.get("propagation_ms"))}
    return {}


# Which figure picks the run whose samples are plotted (the run nearest the median).
KEY_FIGURE = {"propagation": "p99", "cluster": "p99", "peer": "ratio_sustained",
              "idle": "kb_join", "acceptance": "p95"}


def representative(name: str, runs: Sequence[Mapping[str, float | None]]) -> int | None:
    """Index of the run nearest the median of the measurement's key figure."""
    key = KEY_FIGURE.get(name)
    if key is None and name == "fanout":
        key = max((k for r in runs for k in r if k.startswith("ratio_")),
                  key=lambda k: int(k.split("_")[1]), default=None)
    ok = [i for i, r in enumerate(runs) if r]
    if not ok:
        return None
    s = spread([runs[i].get(key) for i in ok]) if key else None
    if s is None:
        return ok[0]
    return min(ok, key=lambda i: abs((runs[i].get(key) or 0.0) - s["median"])
               if runs[i].get(key) is not None else float("inf"))


# -- table rows --------------------------------------------------------------------------
@dataclass
class Row:
    measure: str
    figure: str
    runs: str
    target: str = "-"
    verdict: str = ""


def _runs_text(n: float | None, total: int) -> str:
    k = int(n or 0)
    return str(total) if k == total else f"{k} of {total}"


class _Rows:
    """Collects the rows of one measurement from its summary and per-run figures."""

    def __init__(self, entry: Mapping[str, Any]) -> None:
        self.summary: Mapping[str, Spread] = entry.get("summary") or {}
        self.per_run: list[Figures] = [r.get("figures") or {} for r in entry.get("runs", [])]
        self.total = len(self.per_run)
        self.out: list[Row] = []

    def s(self, key: str) -> Spread | None:
        return self.summary.get(key)

    def med(self, key: str) -> float | None:
        s = self.s(key)
        return s["median"] if s else None

    def values(self, key: str) -> list[float | None]:
        return [r.get(key) for r in self.per_run]

    def n(self, *keys: str) -> str:
        return _runs_text(max(((self.s(k) or {}).get("n", 0) for k in keys), default=0),
                          self.total)

    def add(self, measure: str, figure: str, keys: Sequence[str], target: str = "-",
            verdict_text: str = "") -> None:
        self.out.append(Row(measure, figure, self.n(*keys), target, verdict_text))

    def deliveries(self, measure: str, prefix: str = "") -> None:
        lost, expected = self.values(f"{prefix}lost"), self.values(f"{prefix}expected")
        per_run = ", ".join(num(v) for v in lost)
        more = ""
        for key, what in (("refused", "updates refused"), ("extra", "beyond the receivers")):
            vs = self.values(prefix + key)
            if any(vs):
                more += f"; {what}: {', '.join(num(v) for v in vs)}"
        self.add(measure, f"{num(self.med(prefix + 'delivered'))} of "
                 f"{num(self.med(prefix + 'expected'))} (lost per run: {per_run}{more})",
                 [f"{prefix}lost"], ALL_DELIVERED, lost_verdict(lost, expected))


def _lat_text(rows: _Rows, prefix: str = "") -> str:
    return " / ".join(fmt_spread(rows.s(f"{prefix}{q}")) for q in ("p50", "p95", "p99")) + " ms"


def rows(name: str, entry: Mapping[str, Any]) -> list[Row]:
    """The table rows of one measurement's entry (``runs`` with ``figures``, ``summary``)."""
    runs = entry.get("runs") or []
    first_bad = next((r for r in runs if "error" in r or "skipped" in r), None)
    if runs and all("skipped" in r for r in runs):
        return [Row(name, "skipped: " + str(runs[0]["skipped"]), "0")]
    R = _Rows(entry)
    if name == "idle" and R.summary:
        tried = R.med("tried") or 0
        held_v = (verdict(R.med("connected"), Target(">=", HELD, ""))
                  if tried >= HELD else f"n/a ({num(tried)} tried)")
        R.add("connections held (hello + join of a 20-member team)",
              f"{fmt_spread(R.s('connected'))} of {num(tried)}", ["connected"],
              f"{HELD:,}", held_v)
        kb = R.med("kb_join")
        R.add("server RSS per idle connection, hello + join", fmt_spread(R.s("kb_join"), 1, " KB"),
              ["kb_join"], f"{MEM_KB.text} (next {MEM_NEXT_KB.text})",
              f"{verdict(kb, MEM_KB)}; next: {verdict(kb, MEM_NEXT_KB)}")
        R.add("server RSS per idle connection, hello only", fmt_spread(R.s("kb_hello"), 1, " KB"),
              ["kb_hello"], "(bare websockets: 14.3 KB)")
        R.add("connects, hello + join (80 in flight)",
              fmt_spread(R.s("connect_rate"), 0, " conn/s"), ["connect_rate"], CONNECTS.text,
              verdict(R.med("connect_rate"), CONNECTS))
        R.add("  connect time p50 / p99", f"{fmt_spread(R.s('connect_p50'))} / "
              f"{fmt_spread(R.s('connect_p99'))} ms", ["connect_p50"])
        if R.med("srv_us_connect") is not None:
            R.add("  CPU per connect: gateway (its busy share of the phase) / clients",
                  f"{fmt_spread(R.s('srv_us_connect'), 0, ' us')} "
                  f"({fmt_spread(R.s('srv_busy'), 2)}) / "
                  f"{fmt_spread(R.s('cli_us_connect'), 0, ' us')}", ["srv_us_connect"])
        R.add("connects, hello only", fmt_spread(R.s("hello_connect_rate"), 0, " conn/s"),
              ["hello_connect_rate"])
    if name == "propagation" and R.summary:
        rate, clients = R.med("rate"), R.med("clients")
        R.add(f"propagation p99, {num(rate)} upd/s into 20-member channels, "
              f"{num(clients)} clients", fmt_spread(R.s("p99"), 0, " ms"), ["p99"],
              PROPAGATION_P99.text, verdict(R.med("p99"), PROPAGATION_P99))
        R.add("  p50 / p95 / p99", _lat_text(R), ["p99"])
        R.deliveries("  deliveries (updates x 19 members)")
        R.add("  in the gateway, ts -> written (bucket bounds)",
              " / ".join(fmt_spread(R.s(f"srv_{q}")) for q in ("5", "95", "99")) + " ms",
              ["srv_99"])
        R.add("  server CPU per delivered update", fmt_spread(R.s("cpu_us"), 1, " us"),
              ["cpu_us"])
    if name == "fanout" and R.summary:
        members = sorted({int(k.split("_")[1]) for k in R.summary if k.startswith("ratio_")})
        for m in members:
            R.add(f"fan-out, 1 channel x {m:,} members, {num(R.med(f'bytes_{m}'))} B frames: "
                  "gateway / bare", fmt_spread(R.s(f"ratio_{m}"), 2), [f"ratio_{m}"],
                  FANOUT.text, verdict(R.med(f"ratio_{m}"), FANOUT))
            R.add("  frames/s, gateway vs bare broadcast()",
                  f"{fmt_spread(R.s(f'gw_fps_{m}'))} vs {fmt_spread(R.s(f'bare_fps_{m}'))}",
                  [f"gw_fps_{m}"])
            R.add("  server CPU per frame, bare / gateway (frames per CPU second)",
                  f"{fmt_spread(R.s(f'cpu_ratio_{m}'), 2)} ({fmt_spread(R.s(f'bare_us_{m}'), 2)}"
                  f" vs {fmt_spread(R.s(f'gw_us_{m}'), 2)} us)", [f"cpu_ratio_{m}"])
            if R.s(f"written_ratio_{m}") is not None:
                R.add("  frames/s written, by each server's count: gateway / bare",
                      f"{fmt_spread(R.s(f'written_ratio_{m}'), 2)} "
                      f"({fmt_spread(R.s(f'gw_wps_{m}'))} vs {fmt_spread(R.s(f'bare_wps_{m}'))})",
                      [f"written_ratio_{m}"])
                R.add("  unread at the window's end (TCP memory), gateway vs bare",
                      f"{fmt_spread(R.s(f'gw_backlog_{m}'), 0)} vs "
                      f"{fmt_spread(R.s(f'bare_backlog_{m}'), 0)} MB", [f"gw_backlog_{m}"])
    if name == "cluster" and R.summary:
        R.add("Redis Cluster, 2 gateways, same load: p99 added to one process's",
              fmt_spread(R.s("p99_added"), 0, " ms"), ["p99_added"], CLUSTER_ADDED.text,
              verdict(R.med("p99_added"), CLUSTER_ADDED))
        R.add("  p50 / p95 / p99 via the cluster", _lat_text(R), ["p99"])
        R.add("  p50 / p95 / p99 one process, same run", _lat_text(R, "s_"), ["s_p99"])
        R.add("  server CPU per delivered update, cluster / one process",
              fmt_spread(R.s("cpu_ratio"), 2), ["cpu_ratio"], CLUSTER_CPU.text,
              verdict(R.med("cpu_ratio"), CLUSTER_CPU))
        R.add("    both gateways summed vs one process",
              f"{fmt_spread(R.s('cpu_us'), 1)} vs {fmt_spread(R.s('s_cpu_us'), 1)} us",
              ["cpu_us"])
        R.deliveries("  deliveries via the cluster")
        R.deliveries("  deliveries one process, same run", "s_")
    if name == "peer" and R.summary:
        R.add(f"room workload ({num(R.med('clients'))} connections, rooms of "
              f"{num(R.med('team'))}): max sustained upd/s, ours / python-socketio",
              fmt_spread(R.s("ratio_sustained"), 2), ["ratio_sustained"], PEER.text,
              verdict(R.med("ratio_sustained"), PEER))
        R.add("  max sustained upd/s, ours vs python-socketio",
              f"{fmt_spread(R.s('ours_sustained'))} vs {fmt_spread(R.s('peer_sustained'))}",
              ["ours_sustained"])
        R.add("  server CPU per delivered update, ours vs python-socketio",
              f"{fmt_spread(R.s('ours_cpu_us'), 1)} vs {fmt_spread(R.s('peer_cpu_us'), 1)} us "
              f"(x{fmt_spread(R.s('ratio_cpu'), 2)})", ["ours_cpu_us"])
    if name == "acceptance" and R.summary:
        R.add(f"Locust acceptance, {num(R.med('users'))} users: held, errors",
              f"{fmt_spread(R.s('held'))} held, {fmt_spread(R.s('errors'))} errors",
              ["errors"], "no errors", zero_verdict(R.values("errors"), "errors"))
        R.add("  Locust propagation p50 / p95 / p99", _lat_text(R), ["p95"],
              ACCEPTANCE_P95.text, verdict(R.med("p95"), ACCEPTANCE_P95))
    if first_bad is not None and "error" in first_bad:
        bad = sum("error" in r for r in runs)
        last = str(first_bad["error"]).strip().splitlines() or [""]
        R.out.append(Row(name, f"FAILED in {bad} of {len(runs)} runs: {last[-1][:80]}",
                         str(len(runs)), "-", ""))
    return R.out


def missed(rs: Sequence[Row]) -> list[Row]:
    """The rows whose target is missed (a missed *next* target alone does not count)."""
    return [r for r in rs if r.verdict.startswith("missed")]
