"""Channel state and diff coalescing: "applying the diffs in order to the snapshot gives
the state" (PROTOCOL.md, "Presence channels"), driven by a hypothesis state machine.

The machine plays one channel of one node. The server side keeps the truth (a
:class:`ChannelState`) and folds every change into a :class:`PendingDiff` exactly as
``gateway/hub.py`` does (``Hub.on_join`` flushes first when ``add_join`` refuses a join
because a leave of that conn is pending; ``Hub._flush`` sends ``frame()`` to plain
members and ``frame(exclude=conn)`` to members whose own changes are in the diff).
Clients start from a ``joined`` snapshot taken at any point and apply, in order, every
diff flushed after it; frames travel through the real codec (JSON or msgpack).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from presence.codec import Format, decode, encode
from presence.diff import PendingDiff
from presence.meta import STATUSES, Meta, MetaPatch, new_meta, overall_status
from presence.state import ChannelState

CH = "team:w123"
CONNS = tuple(f"n1-{i}" for i in range(6))
# A conn belongs to one user for its whole life; several conns share a user (devices).
USER_OF = {c: f"u{i % 3}" for i, c in enumerate(CONNS)}
MAX_CLIENTS = 4

patches = st.builds(
    MetaPatch,
    status=st.none() | st.sampled_from(STATUSES),
    device=st.none() | st.sampled_from(("web", "mobile", "", "d" * 32)),
    note=st.none() | st.sampled_from(("", "At the venue", "n" * 128)),
)
formats = st.sampled_from(tuple(Format))


def entries(frame: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Every (kind, user, conn) a diff frame talks about."""
    out = [("join", u, m["conn"]) for u, ms in frame["joins"].items() for m in ms]
    out += [("leave", u, e["conn"]) for u, es in frame["leaves"].items() for e in es]
    return out


def without(state: ChannelState, conn: str | None) -> ChannelState:
    """A copy of ``state`` without the meta of ``conn``."""
    copy = ChannelState.from_wire(state.to_wire())
    if conn is not None:
        copy.remove(USER_OF[conn], conn)
    return copy


def over_the_wire(frame: dict[str, Any], fmt: Format) -> dict[str, Any]:
    return decode(encode(frame, fmt), fmt)


@dataclass
class Client:
    """A connection that joined the channel: its mirror and the diffs it was sent."""

    state: ChannelState
    own: str | None
    fmt: Format
    received: list[dict[str, Any]] = field(default_factory=list)


class ChannelMachine(RuleBasedStateMachine):
    """Server truth + pending diff + clients of one channel."""

    def __init__(self) -> None:
        super().__init__()
        self.truth = ChannelState()
        self.pending = PendingDiff()
        self.pending_ts: list[int] = []  # ts of every change folded into ``pending``
        self.left: set[str] = set()  # conns that joined and then left (may rejoin)
        self.clients: list[Client] = []
        self.clock = 1_700_000_000_000

    # -- helpers --------------------------------------------------------------------
    def present(self) -> list[str]:
        return [c for c in CONNS if self.truth.get(USER_OF[c], c) is not None]

    def fresh(self) -> list[str]:
        return [c for c in CONNS if c not in self.present() and c not in self.left]

    def absent(self) -> list[str]:
        return [c for c in CONNS if c not in self.present()]

    def tick(self, data: st.DataObject) -> int:
        """The ts of the next change: the clock moves on, changes relayed from other
        nodes may carry a slightly older ts."""
        self.clock += data.draw(st.integers(0, 30), label="advance")
        return self.clock - data.draw(st.integers(0, 40), label="age")

    def fold_join(self, user: str, meta: Meta, ts: int) -> None:
        """``Hub.on_join``: flush first when a leave of this conn is pending."""
        before = (self.pending.frame(CH), self.pending.ts)
        if not self.pending.add_join(user, meta, ts):
            # The refused join left the diff untouched.
            assert (self.pending.frame(CH), self.pending.ts) == before
            self.flush()
            assert self.pending.add_join(user, meta, ts)
        self.pending_ts.append(ts)

    def do_join(self, conn: str, patch: MetaPatch, ts: int) -> None:
        meta = new_meta(conn, patch, ts)
        assert meta.seq == 1 and meta.since == ts
        self.truth.put(USER_OF[conn], meta)
        self.left.discard(conn)
        self.fold_join(USER_OF[conn], meta, ts)

    def snapshot(self, own: str | None, fmt: Format) -> None:
        """A ``joined`` reply: the whole state now; later flushes reach the client."""
        joined = {"t": "joined", "ref": 1, "ch": CH, "presence": self.truth.to_wire()}
        state = ChannelState.from_wire(over_the_wire(joined, fmt)["presence"])
        assert state == self.truth
        self.clients.append(Client(state, own, fmt))

    # -- rules ------------------------------------------------------------------------
    @initialize(fmt=formats, early=st.booleans())
    def first_observer(self, fmt: Format, early: bool) -> None:
        # Half the runs have a client from the empty channel on.
        if early:
            self.snapshot(None, fmt)

    @precondition(lambda self: bool(self.fresh()))
    @rule(data=st.data(), patch=patches)
    def join(self, data: st.DataObject, patch: MetaPatch) -> None:
        conn = data.draw(st.sampled_from(self.fresh()), label="conn")
        self.do_join(conn, patch, self.tick(data))

    @precondition(lambda self: bool(self.left))
    @rule(data=st.data(), patch=patches)
    def rejoin(self, data: st.DataObject, patch: MetaPatch) -> None:
        """The same conn joins again after a leave: its seq starts over at 1."""
        conn = data.draw(st.sampled_from(sorted(self.left)), label="conn")
        self.do_join(conn, patch, self.tick(data))

    @precondition(lambda self: bool(self.present()))
    @rule(data=st.data(), patch=patches)
    def update(self, data: st.DataObject, patch: MetaPatch) -> None:
        conn = data.draw(st.sampled_from(self.present()), label="conn")
        user = USER_OF[conn]
        old = self.truth.get(user, conn)
        assert old is not None
        meta = old.patched(patch)
        assert meta.seq == old.seq + 1 and meta.since == old.since
        self.truth.put(user, meta)
        self.fold_join(user, meta, self.tick(data))

    @precondition(lambda self: bool(self.present()))
    @rule(data=st.data())
    def leave(self, data: st.DataObject) -> None:
        conn = data.draw(st.sampled_from(self.present()), label="conn")
        ts = self.tick(data)
        assert self.truth.remove(USER_OF[conn], conn) is not None
        self.left.add(conn)
        # The leaving connection is no longer a member: it gets no more diffs.
        self.clients = [c for c in self.clients if c.own != conn]
        self.pending.add_leave(USER_OF[conn], conn, ts, ts)
        self.pending_ts.append(ts)

    @precondition(lambda self: bool(self.absent()))
    @rule(data=st.data())
    def stray_leave(self, data: st.DataObject) -> None:
        """A leave of a conn that is not there (a repeated leave, a lease expiry after
        an explicit leave): the truth does not change and clients must not care."""
        conn = data.draw(st.sampled_from(self.absent()), label="conn")
        ts = self.tick(data)
        self.pending.add_leave(USER_OF[conn], conn, ts, ts)
        self.pending_ts.append(ts)

    @rule()
    def flush(self) -> None:
        """``Hub._flush``: one shared frame, personal copies for the conns in the diff."""
        pending = self.pending
        if not pending:
            assert pending.ts is None and not self.pending_ts
            assert pending.frame(CH) is None
            return
        self.pending, ts_list, self.pending_ts = PendingDiff(), self.pending_ts, []
        frame = pending.frame(CH)
        assert frame is not None
        assert frame["t"] == "diff" and frame["ch"] == CH
        assert frame["ts"] == pending.ts == min(ts_list)
        talked = [c for _, _, c in entries(frame)]
        assert len(talked) == len(set(talked)), "a conn appears at most once in a diff"
        assert set(talked) == pending.conns()
        for _, user, conn in entries(frame):
            assert USER_OF[conn] == user
        for user, metas in frame["joins"].items():
            for m in metas:
                # A pending join is the conn's newest meta, i.e. the truth's.
                current = self.truth.get(user, m["conn"])
                assert current is not None and current.to_wire() == m
        for client in self.clients:
            if client.own in pending.conns():
                personal = pending.frame(CH, exclude=client.own)
            else:
                personal = frame
                assert pending.frame(CH, exclude=client.own) == frame
            if personal is None:
                assert set(talked) == {client.own}
                continue
            assert personal["ts"] == frame["ts"]
            received = over_the_wire(personal, client.fmt)
            client.state.apply_diff(received)
            client.received.append(received)

    @rule(fmt=formats)
    def observer_joins(self, fmt: Format) -> None:
        """A connection whose user has no meta here (e.g. a CSM watching)."""
        if len(self.clients) < MAX_CLIENTS:
            self.snapshot(None, fmt)

    @precondition(lambda self: bool(self.absent()) and len(self.clients) < MAX_CLIENTS)
    @rule(data=st.data(), patch=patches, fmt=formats)
    def member_joins(self, data: st.DataObject, patch: MetaPatch, fmt: Format) -> None:
        """A conn joins and gets the snapshot, its own meta included; its own later
        changes are excluded from the diffs it is sent."""
        conn = data.draw(st.sampled_from(self.absent()), label="conn")
        self.do_join(conn, patch, self.tick(data))
        self.snapshot(conn, fmt)
        assert self.clients[-1].state.get(USER_OF[conn], conn) is not None

    # -- invariants -------------------------------------------------------------------
    @invariant()
    def own_changes_never_sent(self) -> None:
        for client in self.clients:
            for frame in client.received:
                assert client.own not in {c for _, _, c in entries(frame)}

    @invariant()
    def clients_match_truth_after_a_flush(self) -> None:
        """The convergence property, checked after every step that leaves nothing
        pending (every flush included). Own metas are stale by design: a connection is
        not sent its own changes."""
        if self.pending:
            return
        for client in self.clients:
            assert without(client.state, client.own) == without(self.truth, client.own)
            if client.own is None:
                assert client.state.to_wire() == self.truth.to_wire()


ChannelMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=40, deadline=None
)
TestChannelMachine = ChannelMachine.TestCase


# -- PendingDiff properties outside the machine -------------------------------------------
ops = st.lists(
    st.tuples(
        st.sampled_from(("join", "update", "leave")),
        st.sampled_from(CONNS),
        st.integers(0, 10_000),  # ts
    ),
    max_size=30,
)


def fold(op_list: list[tuple[str, str, int]]) -> tuple[PendingDiff, list[int]]:
    """Fold ops into one diff, skipping refused joins; returns the accepted ts values."""
    pending = PendingDiff()
    accepted: list[int] = []
    seqs: dict[str, int] = {}
    for kind, conn, ts in op_list:
        user = USER_OF[conn]
        if kind == "leave":
            pending.add_leave(user, conn, ts, ts)
            seqs.pop(conn, None)
            accepted.append(ts)
            continue
        seq = seqs.get(conn, 0) + 1 if kind == "update" else 1
        if pending.add_join(user, Meta(conn, since=0, seq=seq), ts):
            seqs[conn] = seq
            accepted.append(ts)
    return pending, accepted


@settings(max_examples=200)
@given(ops)
def test_diff_ts_is_the_oldest_change(op_list: list[tuple[str, str, int]]) -> None:
    pending, accepted = fold(op_list)
    frame = pending.frame(CH)
    if not accepted:
        assert frame is None and pending.ts is None and not pending
        return
    assert pending.ts == min(accepted)
    assert frame is not None and frame["ts"] == min(accepted)


@settings(max_examples=200)
@given(ops, st.sampled_from(CONNS))
def test_excluded_conn_never_sees_its_own_entries(
    op_list: list[tuple[str, str, int]], me: str
) -> None:
    pending, _ = fold(op_list)
    full = pending.frame(CH)
    mine = pending.frame(CH, exclude=me)
    if full is None:
        assert mine is None
        return
    others = [e for e in entries(full) if e[2] != me]
    if not others:
        assert mine is None
        return
    assert mine is not None
    assert sorted(entries(mine)) == sorted(others)
    assert mine["ts"] == full["ts"]
    assert me not in {c for _, _, c in entries(mine)}


def test_join_after_pending_leave_is_refused_and_changes_nothing() -> None:
    pending = PendingDiff()
    pending.add_join("u0", Meta("n1-0", seq=1), 10)
    pending.add_leave("u0", "n1-0", 20, 20)
    before = pending.frame(CH)
    assert pending.add_join("u0", Meta("n1-0", seq=1), 5) is False
    assert pending.frame(CH) == before
    assert pending.ts == 10
    assert before == {
        "t": "diff", "ch": CH, "ts": 10, "joins": {},
        "leaves": {"u0": [{"conn": "n1-0", "last_seen": 20}]},
    }


def test_pending_join_keeps_the_highest_seq() -> None:
    pending = PendingDiff()
    pending.add_join("u0", Meta("n1-0", status="busy", seq=3), 30)
    assert pending.add_join("u0", Meta("n1-0", status="away", seq=2), 20)  # late, older
    frame = pending.frame(CH)
    assert frame is not None
    assert frame["joins"] == {"u0": [Meta("n1-0", status="busy", seq=3).to_wire()]}
    assert frame["ts"] == 20


def test_frame_for_the_only_changed_conn_is_none() -> None:
    pending = PendingDiff()
    pending.add_join("u0", Meta("n1-0"), 1)
    assert pending.conns() == {"n1-0"}
    assert pending.frame(CH, exclude="n1-0") is None
    assert pending.frame(CH, exclude="n1-9") == pending.frame(CH)


def test_client_keeps_highest_seq_and_ignores_unknown_leaves() -> None:
    state = ChannelState()
    state.apply_diff({"joins": {"u0": [Meta("n1-0", seq=2).to_wire()]}})
    state.apply_diff({"joins": {"u0": [Meta("n1-0", status="away", seq=1).to_wire()]}})
    assert state.get("u0", "n1-0") == Meta("n1-0", seq=2)
    state.apply_diff({"leaves": {"u9": [{"conn": "x", "last_seen": 1}]}})
    state.apply_diff({"t": "diff"})  # joins and leaves may both be absent
    assert len(state) == 1 and list(state.users()) == ["u0"]
    state.apply_diff({"leaves": {"u0": [{"conn": "n1-0", "last_seen": 3}]}})
    assert len(state) == 0 and list(state.users()) == []


# -- overall status ---------------------------------------------------------------------
RANK = {"busy": 3, "online": 2, "away": 1}


@given(st.lists(st.sampled_from(STATUSES), max_size=6))
def test_overall_status_busy_over_online_over_away(statuses: list[str]) -> None:
    metas = [Meta(f"c{i}", status=s) for i, s in enumerate(statuses)]
    got = overall_status(metas)
    if not statuses:
        assert got == "offline"
    else:
        assert got == max(statuses, key=RANK.__getitem__)
    assert overall_status(reversed(metas)) == got  # order does not matter
    assert overall_status(iter(metas)) == got  # any iterable, consumed once


def test_overall_status_examples() -> None:
    assert overall_status([]) == "offline"
    assert overall_status([Meta("a", status="away")]) == "away"
    assert overall_status([Meta("a", status="away"), Meta("b", status="online")]) == "online"
    assert overall_status([Meta("a", status="online"), Meta("b", status="busy")]) == "busy"
