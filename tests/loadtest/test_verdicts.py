"""The bench's aggregation over runs and its verdicts (``loadtest/verdicts.py``), pure."""

from __future__ import annotations

import pytest

from loadtest import verdicts as v


def test_spread_is_median_min_max_of_the_values_present() -> None:
    assert v.spread([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert v.spread([4, None, 1]) == {"median": 2.5, "min": 1.0, "max": 4.0, "n": 2}
    assert v.spread([None, None]) is None
    assert v.spread([]) is None


def test_summarize_takes_every_figure_of_any_run() -> None:
    runs = [{"a": 1.0, "b": 10.0}, {"a": 3.0}, {"a": 2.0, "b": None}]
    s = v.summarize(runs)
    assert s["a"] == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert s["b"] == {"median": 10.0, "min": 10.0, "max": 10.0, "n": 1}


def test_fmt_spread() -> None:
    assert v.fmt_spread({"median": 0.85, "min": 0.77, "max": 0.9, "n": 3}, 2) == \
        "0.85 (0.77-0.90)"
    assert v.fmt_spread({"median": 1232.0, "min": 1232.0, "max": 1232.0, "n": 1}, 0,
                        " conn/s") == "1,232 conn/s"
    assert v.fmt_spread({"median": -3.0, "min": -8.0, "max": 2.0, "n": 3}) == "-3 (-8 to 2)"
    assert v.fmt_spread(None) == "-"


@pytest.mark.parametrize(("value", "target", "expected"), [
    (0.85, v.FANOUT, "missed by 29 %"),
    (1.2, v.FANOUT, "met"),
    (1.5, v.FANOUT, "met"),
    (1232.0, v.CONNECTS, "missed by 18 %"),
    (1500.0, v.CONNECTS, "met"),
    (42.0, v.PROPAGATION_P99, "met"),
    (300.0, v.PROPAGATION_P99, "missed by 20 %"),
    (250.0, v.PROPAGATION_P99, "missed (at the bound)"),
    (250.5, v.PROPAGATION_P99, "missed by < 1 %"),
    (-5.0, v.CLUSTER_ADDED, "met"),
    (1.3, v.CLUSTER_CPU, "met"),
    (1.69, v.CLUSTER_CPU, "missed by 30 %"),
    (17.6, v.MEM_KB, "met"),
    (17.6, v.MEM_NEXT_KB, "missed by 47 %"),
    (2.0, v.PEER, "missed by 33 %"),
    (None, v.PEER, "-"),
])
def test_verdict(value: float | None, target: v.Target, expected: str) -> None:
    assert v.verdict(value, target) == expected


def test_lost_deliveries_are_judged_on_every_run() -> None:
    assert v.lost_verdict([0, 0, 0], [100, 100, 100]) == "met"
    assert v.lost_verdict([0, 29, 0], [189_867, 189_867, 189_867]) == \
        "missed: 29 lost (< 1 %) in 1 of 3 runs"
    assert v.lost_verdict([None], [None]) == "-"
    assert v.zero_verdict([0, 0], "errors") == "met"
    assert v.zero_verdict([0, 3], "errors") == "missed: 3 errors in 1 of 2 runs"


def _fanout_run(ratios: dict[int, float]) -> dict[str, object]:
    return {"points": [{"members": m, "ratio": r, "gateway_frames_per_s": r * 1000,
                        "bare_frames_per_s": 1000.0, "payload_bytes": 300}
                       for m, r in ratios.items()]}


def _entry(name: str, runs: list[dict[str, object]]) -> dict[str, object]:
    for r in runs:
        r["figures"] = v.figures(name, r)
    per_run = [r["figures"] for r in runs]
    return {"runs": runs, "summary": v.summarize(per_run)}


def test_fanout_rows_use_the_ratio_of_each_run() -> None:
    entry = _entry("fanout", [_fanout_run({250: 0.8, 1000: 1.3}),
                              _fanout_run({250: 0.9, 1000: 1.1}),
                              _fanout_run({250: 0.85, 1000: 1.25})])
    rows = {r.measure: r for r in v.rows("fanout", entry)}
    r250 = rows["fan-out, 1 channel x 250 members, 300 B frames: gateway / bare"]
    assert (r250.figure, r250.runs, r250.target, r250.verdict) == \
        ("0.85 (0.80-0.90)", "3", ">= 1.2x bare", "missed by 29 %")
    r1000 = rows["fan-out, 1 channel x 1,000 members, 300 B frames: gateway / bare"]
    assert (r1000.figure, r1000.verdict) == ("1.25 (1.10-1.30)", "met")
    assert [r.measure for r in v.missed(list(rows.values()))] == [r250.measure]


def test_fanout_rows_show_what_each_server_wrote_and_left_unread() -> None:
    runs = []
    for written, backlog in ((1.25, 40.0), (1.2, 90.0), (1.3, 60.0)):
        run = _fanout_run({500: 1.0})
        point = run["points"][0]  # type: ignore[index]
        point.update({"written_ratio": written, "gateway_written_per_s": written * 1000,
                      "bare_written_per_s": 1000.0, "gateway_backlog_mb": backlog,
                      "bare_backlog_mb": 1.0})
        runs.append(run)
    rows = {r.measure: r for r in v.rows("fanout", _entry("fanout", runs))}
    written = rows["  frames/s written, by each server's count: gateway / bare"]
    assert written.figure == "1.25 (1.20-1.30) (1,250 (1,200-1,300) vs 1,000 (1,000-1,000))"
    assert written.verdict == ""  # the verdict stays on the frames the clients read
    unread = rows["  unread at the window's end (TCP memory), gateway vs bare"]
    assert unread.figure == "60 (40-90) vs 1 (1-1) MB"
    verdict_row = rows["fan-out, 1 channel x 500 members, 300 B frames: gateway / bare"]
    assert verdict_row.verdict == "missed by 17 %"


def test_fanout_rows_without_server_counts_leave_their_rows_out() -> None:
    entry = _entry("fanout", [_fanout_run({250: 0.8})])
    measures = [r.measure for r in v.rows("fanout", entry)]
    assert not any("written" in m or "unread" in m for m in measures)


def _prop(p99: float, cpu_us: float, lost: int = 0) -> dict[str, object]:
    return {"latency_ms": {"n": 10, "p50": p99 / 2, "p95": p99 * 0.9, "p99": p99},
            "entries": 1900 - lost, "expected_entries": 1900, "cpu_us_per_delivery": cpu_us,
            "rate": 1000.0, "connected": 2000}


def test_cluster_rows_judge_the_ratios_taken_within_each_run() -> None:
    runs: list[dict[str, object]] = []
    for p99, single_p99, cpu, single_cpu, lost in ((130, 40, 30, 25, 0), (200, 45, 40, 25, 3),
                                                   (150, 42, 28, 20, 0)):
        runs.append({**_prop(p99, cpu, lost), "single": _prop(single_p99, single_cpu),
                     "p99_added_ms": p99 - single_p99, "cpu_ratio": cpu / single_cpu})
    rows = v.rows("cluster", _entry("cluster", runs))
    added = rows[0]
    assert added.figure == "108 (90-155) ms" and added.verdict == "missed by 8 %"
    cpu = next(r for r in rows if r.target == v.CLUSTER_CPU.text)
    assert cpu.figure == "1.40 (1.20-1.60)" and cpu.verdict == "missed by 8 %"
    lost = next(r for r in rows if r.measure == "  deliveries via the cluster")
    assert lost.verdict == "missed: 3 lost (< 1 %) in 1 of 3 runs"
    assert lost.figure == "1,900 of 1,900 (lost per run: 0, 3, 0)"


def test_idle_rows_show_the_next_memory_target_and_skip_the_count_at_small_sizes() -> None:
    run = {"connected": 500, "target": 500, "kb_per_connection": 17.0,
           "connect_rate": 1232.0, "connect_ms": {"p50": 30.0, "p99": 90.0},
           "hello_only": {"kb_per_connection": 14.0, "connect_rate": 1400.0}}
    rows = v.rows("idle", _entry("idle", [run]))
    assert rows[0].verdict == "n/a (500 tried)"
    assert rows[1].verdict == "met; next: missed by 42 %"
    assert rows[3].verdict == "missed by 18 %"
    assert [r.measure for r in v.missed(rows)] == [rows[3].measure]


def test_failed_and_skipped_runs() -> None:
    entry = _entry("propagation", [{"error": "Traceback ...\nRuntimeError: boom"},
                                   _prop(40, 20)])
    rows = v.rows("propagation", entry)
    assert rows[0].runs == "1 of 2" and rows[0].verdict == "met"
    assert rows[-1].figure == "FAILED in 1 of 2 runs: RuntimeError: boom"
    skipped = v.rows("cluster", _entry("cluster", [{"skipped": "no script"}]))
    assert skipped[0].figure == "skipped: no script"


def test_representative_run_is_the_one_nearest_the_median() -> None:
    per_run = [{"p99": 50.0}, {}, {"p99": 40.0}, {"p99": 90.0}]
    assert v.representative("propagation", per_run) == 0
    assert v.representative("propagation", [{}, {}]) is None
