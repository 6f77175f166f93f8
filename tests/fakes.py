"""Test doubles for what cannot be real in a unit test: time and an issuer."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable

from broker.errors import IssuerError
from broker.secret import Secret
from broker.token import Grant


async def settle(rounds: int = 20) -> None:
    """Let every ready task run until the loop is quiet."""
    for _ in range(rounds):
        await asyncio.sleep(0)


class FakeClock:
    """A clock that moves only when the test says so.

    ``advance`` releases the sleepers whose deadline passed, like time going
    by; ``suspend`` moves time without releasing anyone, like a laptop lid
    closing (monotonic timers stop), and ``wake`` then releases them all.
    """

    def __init__(self, start: float = 1000.0, wall: float = 1_800_000_000.0) -> None:
        self._now = start
        self._wall_offset = wall - start
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def now(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._now + self._wall_offset

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            return
        future = asyncio.get_running_loop().create_future()
        entry = (self._now + seconds, future)
        self._sleepers.append(entry)
        try:
            await future
        finally:
            self._sleepers.remove(entry)

    @property
    def sleeping(self) -> list[float]:
        """Deadlines of current sleepers, soonest first."""
        return sorted(deadline for deadline, _ in self._sleepers)

    async def advance(self, seconds: float) -> None:
        self._now += seconds
        for deadline, future in list(self._sleepers):
            if deadline <= self._now and not future.done():
                future.set_result(None)
        await settle()

    def suspend(self, seconds: float) -> None:
        self._now += seconds

    async def wake(self) -> None:
        for _, future in list(self._sleepers):
            if not future.done():
                future.set_result(None)
        await settle()


Outcome = Grant | IssuerError | Exception


def grant(token: str = "tok-1", expires_in: float | None = 3600.0) -> Grant:
    """A successful issuer answer."""
    return Grant(Secret(token), expires_in, "a b")


class ScriptedFetch:
    """An issuer that answers from a script; ``hold`` keeps a request open."""

    def __init__(self, outcomes: Iterable[Outcome] = (), prefix: str = "auto") -> None:
        self.outcomes: deque[Outcome] = deque(outcomes)
        self.prefix = prefix
        self.calls = 0
        self.hold: asyncio.Event | None = None
        self._counter = 0

    async def __call__(self) -> Grant:
        self.calls += 1
        if self.hold is not None:
            await self.hold.wait()
        if self.outcomes:
            outcome = self.outcomes.popleft()
        else:
            self._counter += 1
            outcome = grant(f"{self.prefix}-{self._counter}")
        if isinstance(outcome, Exception):
            raise outcome
        return outcome
