"""The connection core (presence/connection.py) driven without sockets or event loop.

A hypothesis state machine sends random requests (joins of granted, forbidden and churn
channels, re-joins, leaves, updates, queries, pings, malformed frames), lets a model of
the node execute the effects, failing some of them as a backend would, and checks
after every step what the protocol promises: one reply per request, ``joined`` before
the diffs held back during the join, the node holding exactly the metas the core
holds, every meta carrying the connection's current status, device and note, quotas
never exceeded, and nothing at all after a close.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from presence.codec import Format
from presence.connection import (
    Adopt,
    Close,
    Connection,
    Deliver,
    DeviceUsed,
    Effect,
    Enter,
    Exit,
    Fail,
    PutMetas,
    QueryUsers,
    Send,
    Snapshot,
    Verify,
)
from presence.errors import CloseCode, Overloaded, Unauthorized
from presence.meta import Meta, MetaPatch, new_meta
from presence.ratelimit import SlidingWindow
from presence.settings import QuotaSettings

CHANNELS = ["team:a", "team:b", "team:c", "other:x", "churn:acme"]
QUOTAS = QuotaSettings(max_channels_free=3, joins_per_minute=1000, updates_per_second=5.0,
                       updates_burst=5, requests_per_second=50.0, requests_burst=60,
                       max_errors_per_minute=30, max_malformed=5)


@dataclass(frozen=True)
class Grants:
    user: str = "u1"
    channels: tuple[str, ...] = ("team:*", "churn:*")
    role: str = "csm"
    tier: str = "free"

    exp: int = 2_000_000_000

    @property
    def may_read_churn(self) -> bool:
        return self.role in {"csm", "admin", "service"}




def frame(**fields: Any) -> str:
    return orjson.dumps(fields).decode()


class ConnectionMachine(RuleBasedStateMachine):
    """The core, and a model of the node that executes its effects."""

    @initialize(role=st.sampled_from(["member", "csm"]))
    def start(self, role: str) -> None:
        self.now = 1000.0
        self.ms = 1_700_000_000_000
        self.core = Connection("c1", QUOTAS, self.now)
        self.window = SlidingWindow(QUOTAS.joins_per_minute, 60.0)
        self.core.authenticated(Grants(role=role), lambda user: self.window)
        self.node: dict[str, Meta | None] = {}  # channel -> this conn's meta in the Store
        self.sent: list[dict[str, Any]] = []
        self.closed_with: int | None = None
        self.ref = 0

    # -- executing effects as the session does ---------------------------------------
    def execute(self, effects: list[Effect], fail: set[type]) -> None:
        for effect in effects:
            assert self.closed_with is None or isinstance(effect, Fail | Send), effect
            if type(effect) in fail:
                fail = set()
                self.execute(self.core.failed(effect, Overloaded("down"), self.now), set())
                return
            more = self.run(effect)
            if more:
                self.execute(more, fail)

    def run(self, effect: Effect) -> list[Effect] | None:
        if isinstance(effect, Send):
            self.sent.append(effect.frame)
        elif isinstance(effect, Deliver):
            self.sent.append({"t": "diff", "data": effect.data})
        elif isinstance(effect, Fail):
            self.sent.append({"t": "error", "ref": effect.ref, "code": effect.error.code})
        elif isinstance(effect, Close):
            self.closed_with = effect.code
        elif isinstance(effect, Enter):
            assert effect.ch not in self.node
            self.node[effect.ch] = effect.meta
            self.core.entered(effect.ch, effect.meta)
        elif isinstance(effect, Snapshot):
            # A diff that arrived while the join was in flight is held back.
            assert not self.core.hold("team:zzz", b"x")
            if effect.fresh:
                assert self.core.hold(effect.ch, b"held")
            return self.core.snapshot_ready(effect.ch, effect.ref, {"presence": {}})
        elif isinstance(effect, Exit):
            assert effect.ch in self.node
            assert effect.had_meta == (self.node.pop(effect.ch) is not None)
            if effect.had_meta:
                assert effect.last == (not any(m is not None for m in self.node.values()))
        elif isinstance(effect, PutMetas):
            for ch, meta in effect.metas.items():
                assert ch in self.node
                self.node[ch] = meta
        elif isinstance(effect, QueryUsers):
            self.sent.append({"t": "result", "ref": effect.ref})
        else:
            assert isinstance(effect, DeviceUsed)
        return None

    def request(self, fail: set[type], **fields: Any) -> None:
        self.ref += 1
        before = len(self.sent)
        closed = self.closed_with is not None
        effects = self.core.receive(frame(ref=self.ref, **fields), Format.JSON, self.now,
                                    self.ms)
        self.execute(effects, fail)
        replies = [f for f in self.sent[before:] if f.get("ref") == self.ref]
        if closed:
            assert effects == [] and len(self.sent) == before
        else:
            assert len(replies) == 1, (fields, self.sent[before:])
            new = self.sent[before:]
            if new and new[0]["t"] == "joined" and fail == set():
                # the joined reply comes before anything held back during the join
                assert all(f["t"] == "diff" for f in new[1:] if f.get("ref") is None)

    # -- rules ---------------------------------------------------------------------------
    @rule(ch=st.sampled_from(CHANNELS), status=st.sampled_from([None, "online", "busy"]),
          fail=st.sampled_from([set(), {Enter}, {Snapshot}]))
    def join(self, ch: str, status: str | None, fail: set[type]) -> None:
        meta = {} if status is None else {"meta": {"status": status}}
        self.request(fail, t="join", ch=ch, **meta)

    @rule(ch=st.sampled_from(CHANNELS))
    def leave(self, ch: str) -> None:
        self.request(set(), t="leave", ch=ch)

    @rule(note=st.text("abc", max_size=3), device=st.sampled_from([None, "web", "ios"]),
          fail=st.sampled_from([set(), {PutMetas}]))
    def update(self, note: str, device: str | None, fail: set[type]) -> None:
        meta: dict[str, Any] = {"note": note}
        if device is not None:
            meta["device"] = device
        before = dict(self.core.metas)
        self.request(fail, t="update", meta=meta)
        reply = next((f for f in self.sent if f.get("ref") == self.ref), {})
        if reply.get("t") == "ok":
            # an update sets what it names in every presence channel the connection joined
            for ch, m in self.core.metas.items():
                assert m.note == note and (device is None or m.device == device)
                assert m.seq == before[ch].seq + 1 and m.since == before[ch].since
        else:
            assert self.core.metas == before  # a failed update is not applied

    @rule()
    def ping(self) -> None:
        self.request(set(), t="ping")

    @rule()
    def query(self) -> None:
        self.request(set(), t="query", users=["u1", "u2"])

    @rule()
    def malformed(self) -> None:
        before = len(self.sent)
        self.execute(self.core.receive("{not json", Format.JSON, self.now, self.ms), set())
        if self.closed_with is None:
            assert self.sent[before:][-1]["code"] == "bad_request"

    @rule(seconds=st.sampled_from([0.0, 0.05, 1.0, 61.0]))
    def wait(self, seconds: float) -> None:
        self.now += seconds
        self.ms += int(seconds * 1000)

    # -- invariants ------------------------------------------------------------------
    @invariant()
    def node_holds_what_the_core_holds(self) -> None:
        presence = {ch: m for ch, m in self.node.items() if m is not None}
        assert presence == self.core.metas
        assert set(self.node) - set(presence) == self.core.churn_channels

    @invariant()
    def quotas_hold(self) -> None:
        assert len(self.core.metas) + len(self.core.churn_channels) <= QUOTAS.max_channels_free
        assert all(ch.startswith(("team:", "churn:")) for ch in self.node)
        assert self.core.backlog == {}  # nothing stays held once a request is done


ConnectionMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40,
                                               deadline=None)
TestConnectionMachine = ConnectionMachine.TestCase


def test_a_member_may_not_join_churn_nor_query() -> None:
    core = Connection("c1", QUOTAS, 0.0)
    core.authenticated(Grants(role="member"), lambda user: SlidingWindow(100, 60.0))
    effects = core.receive(frame(t="join", ref=1, ch="churn:acme"), Format.JSON, 0.0, 0)
    assert [type(e) for e in effects] == [Fail] and effects[0].error.code == "forbidden"
    effects = core.receive(frame(t="query", ref=2, users=["x"]), Format.JSON, 0.0, 0)
    assert effects[0].error.code == "forbidden"  # type: ignore[union-attr]


def test_every_request_draws_on_one_budget_and_a_re_join_costs_a_join() -> None:
    quotas = QuotaSettings(requests_per_second=1.0, requests_burst=3, joins_per_minute=2)
    core = Connection("c1", quotas, 0.0)
    window = SlidingWindow(quotas.joins_per_minute, 60.0)
    core.authenticated(Grants(), lambda user: window)
    assert isinstance(core.receive(frame(t="join", ch="team:a"), Format.JSON, 0.0, 0)[0], Enter)
    core.entered("team:a", None)
    core.backlog.clear()
    # A re-join is answered from the mirror, but counts against the join window.
    assert isinstance(core.receive(frame(t="join", ch="team:a"), Format.JSON, 0.0, 0)[0],
                      Snapshot)
    third = core.receive(frame(t="join", ref=3, ch="team:a"), Format.JSON, 0.0, 0)
    assert third[0].error.code == "rate_limited"  # type: ignore[union-attr]
    ping = core.receive(frame(t="ping", ref=4), Format.JSON, 0.0, 0)
    assert ping[0].error.code == "rate_limited"  # type: ignore[union-attr]
    assert ping[0].error.retry_after == 1.0  # type: ignore[union-attr]
    assert isinstance(core.receive(frame(t="ping"), Format.JSON, 1.0, 0)[0], Send)


def test_malformed_frames_then_close_4000_and_silence() -> None:
    core = Connection("c1", QUOTAS, 0.0)
    core.authenticated(Grants(), lambda user: SlidingWindow(100, 60.0))
    for _ in range(QUOTAS.max_malformed):
        assert isinstance(core.receive(b"\xff", Format.JSON, 0.0, 0)[0], Fail)
    assert core.receive(b"\xff", Format.JSON, 0.0, 0) == [Close(CloseCode.MALFORMED,
                                                              "too many malformed frames")]
    assert core.receive(frame(t="ping"), Format.JSON, 0.0, 0) == []


def test_error_flood_closes_1008() -> None:
    core = Connection("c1", QUOTAS, 0.0)
    core.authenticated(Grants(), lambda user: SlidingWindow(100, 60.0))
    effects: list[Effect] = []
    for i in range(QUOTAS.max_errors_per_minute + 1):
        effects = core.receive(frame(t="leave", ref=i, ch="team:a"), Format.JSON, i * 0.1, 0)
    assert effects[-1] == Close(CloseCode.POLICY_VIOLATION, "too many errors")


def test_hello_must_come_first() -> None:
    assert Connection.hello(frame(t="hello", token="x", ref=1), Format.JSON).ref == 1
    for bad in (frame(t="ping"), "{", frame(t="nope")):
        try:
            Connection.hello(bad, Format.JSON)
        except Unauthorized:
            continue
        raise AssertionError(f"{bad!r} was taken for a hello")


def test_user_connection_limit_welcome_or_close() -> None:
    core = Connection("c1", QUOTAS, 0.0)
    core.authenticated(Grants(tier="paid"), lambda user: SlidingWindow(100, 60.0))
    (welcome,) = core.registered(1, 7, "n1", 20.0, 4096, ("tok", 15.0, True))
    assert isinstance(welcome, Send)
    assert welcome.frame == {"t": "welcome", "conn": "c1", "user": "u1", "node": "n1",
                             "ping_interval": 20, "ref": 7,
                             "limits": {"max_channels": QUOTAS.max_channels_paid,
                                        "max_frame": 4096},
                             "exp": 2_000_000_000, "resume": "tok", "resume_ttl": 15,
                             "resumed": True}
    (plain,) = core.registered(1, None, "n1", 20.0, 4096, ("tok", 0.0, None))
    assert "resumed" not in plain.frame and plain.frame["resume_ttl"] == 0  # type: ignore[union-attr]
    fail, close = core.registered(QUOTAS.max_user_connections + 1, 7, "n1", 20.0, 4096)
    assert isinstance(fail, Fail) and fail.error.code == "limit_exceeded" and fail.ref == 7
    assert close == Close(CloseCode.POLICY_VIOLATION, "too many connections for this user")


def test_drain_removes_every_meta_then_closes_1012() -> None:
    core = Connection("c1", QUOTAS, 0.0)
    core.authenticated(Grants(), lambda user: SlidingWindow(100, 60.0))
    for ch in ("team:a", "team:b"):
        core.entered(ch, new_meta("c1", None, 0))
    effects = core.drain(2.5)
    assert effects == [Exit("team:a", True, False), Exit("team:b", True, True),
                       Close(CloseCode.SERVICE_RESTART, "server restarting; reconnect in 2.5s")]
    assert core.metas == {}


def test_refresh_keeps_the_user_replaces_grants_and_moves_the_deadline() -> None:
    core = Connection("c1", QUOTAS, 0.0)
    core.authenticated(Grants(exp=100), lambda user: SlidingWindow(100, 60.0))
    core.entered("team:a", new_meta("c1", None, 0))
    core.entered("churn:acme", None)
    (verify,) = core.receive(frame(t="refresh", ref=2, token="t"), Format.JSON, 0.0, 0)
    assert verify == Verify("t", 2)
    other = core.refreshed(Grants(user="u2", exp=500), 2)
    assert [type(e) for e in other] == [Fail] and other[0].error.code == "forbidden"
    assert core.expires_ms(5.0) == 105_000  # kept the first token
    effects = core.refreshed(Grants(channels=("team:*",), role="member", exp=500), 2)
    assert effects == [Exit("churn:acme", False, False),
                       Send({"t": "left", "ref": None, "ch": "churn:acme"}),
                       Send({"t": "refreshed", "ref": 2, "exp": 500})]
    assert core.expired(104_999, 5.0) == []
    assert core.expired(505_000, 5.0) == [Close(CloseCode.UNAUTHORIZED, "token expired")]
    failed = core.failed(verify, Unauthorized("invalid token"), 0.0)
    assert failed[0] == Fail(failed[0].error, 2)  # type: ignore[union-attr]
    assert failed[0].error.code == "forbidden"  # type: ignore[union-attr]



def test_resumed_channels_come_back_as_joined_frames_and_set_the_current_patch() -> None:
    core = Connection("c1", QUOTAS, 0.0)
    core.authenticated(Grants(), lambda user: SlidingWindow(100, 60.0))
    meta = new_meta("c1", MetaPatch(status="busy", note="venue"), 5)
    effects = core.resumed({"team:a": meta})
    assert effects == [Adopt("team:a", meta), Snapshot("team:a", None, fresh=True)]
    assert core.metas == {"team:a": meta}  # recorded at once
    assert core.hold("team:a", b"diff")  # held back until its joined frame
    out = core.snapshot_ready("team:a", None, {"presence": {}})
    assert out == [Send({"t": "joined", "ref": None, "ch": "team:a", "presence": {}}),
                   Deliver(b"diff")]
    assert core.current == MetaPatch(status="busy", device="unknown", note="venue")
    # A channel that cannot be adopted here: held again (no leave), the client sent off.
    (churn,) = core.resumed({"churn:acme": None})[:1]
    assert core.failed(churn, Overloaded("down"), 0.0) == [
        Close(CloseCode.SERVICE_RESTART, "server restarting; reconnect")]
    assert "churn:acme" in core.joined_channels() and core.backlog == {}


def test_a_resumed_channel_the_token_no_longer_grants_is_left() -> None:
    core = Connection("c1", QUOTAS, 0.0)
    core.authenticated(Grants(channels=("team:a",)), lambda user: SlidingWindow(100, 60.0))
    meta = new_meta("c1", None, 5)
    assert core.resumed({"team:b": meta}) == [
        Exit("team:b", True, True), Send({"t": "left", "ref": None, "ch": "team:b"})]
    assert core.backlog == {} and core.metas == {}
