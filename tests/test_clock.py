"""The system clock: counts through suspend and wakes sleepers on resume."""

from __future__ import annotations

import asyncio
import time

import pytest

from broker.clock import SystemClock


def test_now_counts_at_least_as_fast_as_monotonic() -> None:
    """The boot-time clock never runs behind the monotonic one."""
    clock = SystemClock()

    gap_before = clock.now() - time.monotonic()
    gap_after = clock.now() - time.monotonic()

    assert gap_after >= gap_before - 0.01
    assert abs(clock.wall() - time.time()) < 1


async def test_notify_wake_releases_sleepers() -> None:
    """A wake-up ends every current sleep at once so deadlines are rechecked."""
    clock = SystemClock()
    sleepers = [asyncio.create_task(clock.sleep(3600)) for _ in range(3)]
    await asyncio.sleep(0)

    clock.notify_wake()

    async with asyncio.timeout(5):
        await asyncio.gather(*sleepers)


async def test_watcher_notices_a_suspend(monkeypatch: pytest.MonkeyPatch) -> None:
    """A jump of the boot-time clock past the monotonic one wakes sleepers."""
    clock = SystemClock(check_every=0.001, tolerance=2.0)
    jump = {"seconds": 0.0}
    real_now = clock.now
    monkeypatch.setattr(clock, "now", lambda: real_now() + jump["seconds"])
    sleeper = asyncio.create_task(clock.sleep(3600))
    watcher = asyncio.create_task(clock.watch_suspend())
    await asyncio.sleep(0.01)
    assert not sleeper.done()

    jump["seconds"] = 300.0
    try:
        async with asyncio.timeout(5):
            await sleeper
    finally:
        watcher.cancel()


async def test_sleep_of_zero_returns_at_once() -> None:
    """A deadline already passed does not sleep."""
    clock = SystemClock()

    async with asyncio.timeout(1):
        await clock.sleep(0)
        await clock.sleep(-5)
