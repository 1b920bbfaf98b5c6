"""Rate limits as pure objects: the caller passes ``now`` (monotonic seconds)."""

from __future__ import annotations


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` banked.

    :meth:`take` returns 0.0 when a token was taken, else the seconds until one will be
    available (the ``retry_after`` of a ``rate_limited`` error).
    """

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = now

    def take(self, now: float) -> float:
        elapsed = max(0.0, now - self.stamp)
        self.stamp = now
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class SlidingWindow:
    """At most ``limit`` events in any ``window`` seconds.

    :meth:`hit` records an event and returns 0.0, or refuses it (recording nothing) and
    returns the seconds until the oldest event leaves the window.
    """

    __slots__ = ("events", "limit", "window")

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        # A list, not a deque: it never holds more than ``limit`` events (tens), and an
        # empty deque costs 760 bytes to a list's 56 for every connection's windows.
        self.events: list[float] = []

    def _expire(self, now: float) -> None:
        events, cutoff = self.events, now - self.window
        expired = 0
        while expired < len(events) and events[expired] <= cutoff:
            expired += 1
        if expired:
            del events[:expired]

    def hit(self, now: float) -> float:
        self._expire(now)
        if len(self.events) >= self.limit:
            return self.events[0] + self.window - now
        self.events.append(now)
        return 0.0

    def count(self, now: float) -> int:
        self._expire(now)
        return len(self.events)

    def idle(self, now: float) -> bool:
        """True when no event is left in the window (the object can be dropped)."""
        self._expire(now)
        return not self.events


class KeyedWindows:
    """One :class:`SlidingWindow` per key (a user, say), made on first use; idle ones
    are dropped once there are more than ``4 * live + 1000`` of them, so the map
    stays bounded by the live population rather than by everyone ever seen."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._windows: dict[str, SlidingWindow] = {}

    def get(self, key: str, now: float, live: int) -> SlidingWindow:
        window = self._windows.get(key)
        if window is None:
            if len(self._windows) > 4 * max(1, live) + 1000:
                for k in [k for k, w in self._windows.items() if w.idle(now)]:
                    del self._windows[k]
            window = self._windows[key] = SlidingWindow(self.limit, self.window)
        return window
