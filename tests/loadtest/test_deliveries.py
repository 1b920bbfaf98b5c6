"""Counting lost deliveries per update and receiver (``loadtest/measures.py``), pure."""

from __future__ import annotations

from loadtest.measures import _deliveries


def _worker(joined: list[tuple[str, str]], sent: list[tuple[str, str]],
            seen: list[tuple[str, str, int]],
            refused: list[tuple[str, str, str]] | None = None) -> dict[str, object]:
    return {"joined": joined, "sent_keys": [[("a", "n0")], sent], "seen": seen,
            "refused": refused or []}


def test_every_update_to_every_other_connected_member() -> None:
    w1 = _worker([("a", "t1"), ("b", "t1")], [("a", "n1"), ("a", "n2")],
                 [("c", "n1", 1)])
    w2 = _worker([("c", "t1"), ("d", "t2")], [("c", "n1")],
                 [("a", "n1", 2), ("a", "n2", 2), ("a", "n0", 2)])
    d = _deliveries([w1, w2], 1)
    # t1 has 3 members: a's two updates reach both others, c's reaches b but not a
    assert (d["expected"], d["delivered"], d["lost"], d["extra"]) == (6, 5, 1, 0)
    assert d["updates_with_loss"] == 1


def test_refused_updates_count_as_lost_and_are_named() -> None:
    w = _worker([("a", "t1"), ("b", "t1")], [("a", "n1"), ("a", "n2")], [("a", "n1", 1)],
                refused=[("a", "n2", "overloaded"), ("a", "n0", "overloaded")])
    d = _deliveries([w], 1)
    assert (d["expected"], d["delivered"], d["lost"]) == (2, 1, 1)
    assert d["refused_updates"] == 1 and d["refused_codes"] == {"overloaded": 1}
