"""Requests per caller: a token bucket each, so one caller cannot starve all.

Tokens are cheap to serve, but a caller stuck in a loop still takes the
event loop from every other caller of the same broker.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from cachetools import LRUCache

# Callers are users and key names: a handful on any real host. The bound
# keeps a flood of distinct uids from growing the table without end.
MAX_CALLERS = 10_000


class RateLimiter:
    """``rate`` requests per second per caller, bursts up to ``burst``."""

    def __init__(
        self, rate: float, burst: int, now: Callable[[], float], size: int = MAX_CALLERS
    ) -> None:
        self.rate = rate
        self.burst = burst
        self._now = now
        self._buckets: LRUCache[str, tuple[float, float]] = LRUCache(maxsize=size)

    def wait(self, caller: str) -> float:
        """Take one request from ``caller``'s bucket.

        Returns 0 when the request may go ahead, else the seconds until it
        could (the answer's ``Retry-After``); a refused request takes nothing.
        """
        now = self._now()
        tokens, then = self._buckets.get(caller, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - then) * self.rate)

        if tokens >= 1:
            self._buckets[caller] = (tokens - 1, now)
            return 0.0
        self._buckets[caller] = (tokens, now)
        return (1 - tokens) / self.rate


def retry_after(seconds: float) -> str:
    """A ``Retry-After`` value: whole seconds, at least one."""
    return str(max(1, math.ceil(seconds)))


class Throttle:
    """Lets one event per key through every ``interval``, counting the rest.

    For log lines a caller can cause at will (refusals): the first one shows
    at once, and the next one says how many were left out meanwhile.
    """

    def __init__(
        self, interval: float, now: Callable[[], float], size: int = MAX_CALLERS
    ) -> None:
        self.interval = interval
        self._now = now
        self._seen: LRUCache[object, tuple[float, int]] = LRUCache(maxsize=size)

    def admit(self, key: object) -> int | None:
        """``None`` to stay quiet, else how many were held back before this."""
        now = self._now()
        last, held = self._seen.get(key, (-math.inf, 0))

        if now - last < self.interval:
            self._seen[key] = (last, held + 1)
            return None
        self._seen[key] = (now, 0)
        return held
