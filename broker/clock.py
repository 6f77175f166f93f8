"""Time as the broker sees it: a clock that counts while the machine sleeps.

Token expiry is absolute in the issuer's world. ``time.monotonic`` (and the
asyncio loop's timers) stop while a laptop is suspended, so a token judged by
them would look younger than it is after a wake-up. On Linux,
``CLOCK_BOOTTIME`` keeps counting through suspend; elsewhere we fall back to
the monotonic clock and say so in the README.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

_BOOTTIME = getattr(time, "CLOCK_BOOTTIME", None)


class Clock(Protocol):
    """What the refresh logic needs from time; tests inject a fake one."""

    def now(self) -> float:
        """Seconds on a clock that never goes back and counts through suspend."""

    def wall(self) -> float:
        """Seconds since the Unix epoch, only for showing and exporting times."""

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` on :meth:`now`, or less if the machine woke up."""


class SystemClock:
    """The real clock, with a watcher that notices a resume from suspend."""

    def __init__(self, *, check_every: float = 5.0, tolerance: float = 2.0) -> None:
        self._check_every = check_every
        self._tolerance = tolerance
        self._woke = asyncio.Event()

    def now(self) -> float:
        if _BOOTTIME is None:
            return time.monotonic()
        return time.clock_gettime(_BOOTTIME)

    def wall(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            return
        woke = self._woke
        try:
            async with asyncio.timeout(seconds):
                await woke.wait()
        except TimeoutError:
            pass

    def _suspended_for(self) -> float:
        return self.now() - time.monotonic()

    async def watch_suspend(self) -> None:
        """Wake every sleeper when the suspend gap grows (runs until cancelled).

        The gap between the boot-time and monotonic clocks grows only while
        the machine is suspended, so a jump means a wake-up: sleepers then
        re-check their deadlines instead of oversleeping by the nap's length.
        """
        gap = self._suspended_for()
        while True:
            await asyncio.sleep(self._check_every)

            new_gap = self._suspended_for()
            if new_gap - gap > self._tolerance:
                self.notify_wake()
            gap = new_gap

    def notify_wake(self) -> None:
        """Release every current sleeper so it re-checks its deadline."""
        woke, self._woke = self._woke, asyncio.Event()
        woke.set()
