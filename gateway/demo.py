"""A built-in simulator that drives real traffic through a running gateway.

:func:`run_demo` plays a compressed working day (one simulated day per
:data:`DAY_SECONDS` real seconds) for three wedding teams (``team:w1`` .. ``team:w3``,
8 to 15 suppliers each) and one customer-success manager watching ``churn:acme``:
suppliers connect with the real client (:class:`gateway.client.PresenceClient`), go
online, away or busy with notes and devices, and disconnect; busier in the evening
peak, quieter at night. Every few seconds the churn model posts drifting scores for
the org ``acme`` to ``POST /v1/churn`` with a service token.

It is gentle (a few messages per second in all) and bounded: it returns within a few
seconds once ``stop`` is set, closing every connection it opened. Failures (server
restarting, backend down) are logged and retried on later ticks; they never end it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import structlog

from gateway.auth import mint_token
from gateway.client import PresenceClient

__all__ = ["DAY_SECONDS", "ORG", "TEAMS", "run_demo"]

log = structlog.get_logger("presence.demo")

DAY_SECONDS = 600.0
"""Real seconds per simulated day."""
TICK = 0.5
"""Seconds between two steps of the simulation."""
CHURN_EVERY = 5.0
"""Seconds between two churn posts."""
ORG = "acme"
TEAMS = ("team:w1", "team:w2", "team:w3")
ROLES = ("photographer", "venue", "planner", "florist", "caterer", "dj", "baker", "stylist")
NAMES = ("ana", "ben", "chloe", "dev", "ella", "finn", "grace", "hugo", "iris", "jack",
         "kai", "lena", "milo", "nora", "omar", "pia", "quinn", "rosa", "sam", "tess")
DEVICES = ("mobile", "mobile", "web", "tablet")
NOTES = {
    "online": ("", "", "Back at the studio", "Checking the timeline", "On site"),
    "away": ("Driving", "Lunch", "Picking up flowers", "In transit"),
    "busy": ("At the venue", "Ceremony", "First dance", "Shooting portraits", "Speeches"),
}


@dataclass
class Supplier:
    user: str
    team: str
    client: PresenceClient | None = None
    status: str = "offline"
    score: float = 0.3
    factors: dict[str, float] = field(default_factory=dict)


def activity(sim_hour: float) -> float:
    """How likely a supplier is to be connected at this hour of the simulated day."""
    if 17 <= sim_hour < 21:
        return 0.9  # the coordination peak
    if 9 <= sim_hour < 17:
        return 0.65
    if 7 <= sim_hour < 9 or 21 <= sim_hour < 23:
        return 0.35
    return 0.08


class Demo:
    """The simulation's state and steps (one instance per :func:`run_demo` call)."""

    def __init__(self, ws_url: str, admin_url: str, secret: str, rng: random.Random) -> None:
        self.ws_url = ws_url
        self.admin_url = admin_url.rstrip("/")
        self.secret = secret
        self.rng = rng
        self.started = time.monotonic()
        self.suppliers: list[Supplier] = []
        names = list(NAMES)
        for n, team in enumerate(TEAMS):
            rng.shuffle(names)
            for i in range(rng.randint(8, 15)):
                role = ROLES[i % len(ROLES)]
                s = Supplier(f"{names[i]}-{role}-{n + 1}", team)
                s.score = rng.betavariate(2, 5)
                self.suppliers.append(s)
        self.csm: PresenceClient | None = None
        self.service_token = mint_token(secret, "demo-churn-model", [], role="service",
                                        ttl=86400)

    def sim_hour(self) -> float:
        """The simulated hour of day, starting at 07:00."""
        return (7 + 24 * (time.monotonic() - self.started) / DAY_SECONDS) % 24

    async def connect_csm(self) -> None:
        if self.csm is not None and not self.csm.closed.is_set():
            return
        token = mint_token(self.secret, "olivia-csm", ["team:*", f"churn:{ORG}"],
                           role="csm", ttl=86400)
        self.csm = await PresenceClient.connect(self.ws_url, token)
        await self.csm.join(f"churn:{ORG}")
        await self.csm.join(TEAMS[0], {"status": "online", "device": "web",
                                       "note": "Customer success"})

    async def step(self) -> None:
        """Move one or two suppliers towards what the hour of day makes likely."""
        p = activity(self.sim_hour())
        for s in self.rng.sample(self.suppliers, k=self.rng.choice((1, 1, 2))):
            if s.client is not None and s.client.closed.is_set():
                s.client, s.status = None, "offline"
            if s.client is None:
                if self.rng.random() < p:
                    await self._go_online(s)
            elif self.rng.random() > p + 0.05:
                await self._go_offline(s)
            else:
                await self._change(s)

    async def _go_online(self, s: Supplier) -> None:
        token = mint_token(self.secret, s.user, [s.team], ttl=86400)
        client = await PresenceClient.connect(self.ws_url, token)
        try:
            await client.join(s.team, {"status": "online", "device": self.rng.choice(DEVICES),
                                       "note": self.rng.choice(NOTES["online"])})
        except BaseException:
            await client.close()
            raise
        s.client, s.status = client, "online"

    async def _go_offline(self, s: Supplier) -> None:
        client, s.client, s.status = s.client, None, "offline"
        if client is not None:
            await client.close()

    async def _change(self, s: Supplier) -> None:
        assert s.client is not None
        busy = 0.5 if 17 <= self.sim_hour() < 21 else 0.25
        status = "busy" if self.rng.random() < busy else self.rng.choice(("online", "away"))
        s.status = status
        await s.client.update(status=status, note=self.rng.choice(NOTES[status]))

    def drift(self) -> list[dict[str, Any]]:
        """Next scores: a small random walk for most, a jump now and then."""
        scores = []
        for s in self.rng.sample(self.suppliers, k=min(len(self.suppliers), 8)):
            step = self.rng.gauss(0, 0.03)
            if self.rng.random() < 0.08:
                step += self.rng.choice((-1, 1)) * self.rng.uniform(0.15, 0.3)
            s.score = min(1.0, max(0.0, s.score + step))
            s.factors = {
                "days_since_login": round(self.rng.uniform(0, 1) * s.score, 3),
                "open_tickets": round(self.rng.uniform(0, 0.5) * s.score, 3),
                "bookings_trend": round(self.rng.uniform(-0.3, 0.3), 3),
            }
            scores.append({"supplier": s.user, "score": round(s.score, 4),
                           "factors": s.factors, "model": "demo-v1"})
        return scores

    async def post_churn(self, session: aiohttp.ClientSession) -> None:
        body = {"org": ORG, "scores": self.drift()}
        headers = {"Authorization": f"Bearer {self.service_token}"}
        async with session.post(f"{self.admin_url}/v1/churn", json=body,
                                headers=headers) as resp:
            if resp.status != 200:
                log.warning("demo_churn_refused", status=resp.status, body=await resp.text())

    async def close(self) -> None:
        clients = [s.client for s in self.suppliers if s.client is not None]
        if self.csm is not None:
            clients.append(self.csm)
        for s in self.suppliers:
            s.client, s.status = None, "offline"
        self.csm = None
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


async def run_demo(
    ws_url: str,
    http_admin_url: str,
    secret: str,
    stop: asyncio.Event,
    rng_seed: int | None = None,
) -> None:
    """Simulate teams and a churn model against the gateway until ``stop`` is set.

    ``ws_url`` is the gateway's WebSocket URL, ``http_admin_url`` its admin API base
    URL, ``secret`` the HS256 secret used to mint the demo's tokens. ``rng_seed`` makes
    the sequence of choices repeatable (timing still depends on the server).
    """
    demo = Demo(ws_url, http_admin_url, secret, random.Random(rng_seed))
    log.info("demo_started", suppliers=len(demo.suppliers), teams=len(TEAMS), org=ORG)
    timeout = aiohttp.ClientTimeout(total=5)
    next_churn = 0.0
    pause = TICK
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while not stop.is_set():
                try:
                    await demo.connect_csm()
                    await demo.step()
                    if time.monotonic() >= next_churn:
                        next_churn = time.monotonic() + CHURN_EVERY
                        await demo.post_churn(session)
                    pause = TICK
                except Exception as exc:  # server restarting, refused request, ...
                    log.warning("demo_step_failed", error=repr(exc))
                    pause = min(10.0, pause * 2)  # back off while the server is away
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), pause)
    finally:
        await demo.close()
        log.info("demo_stopped")
