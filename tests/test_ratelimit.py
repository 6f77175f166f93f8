"""Tests for broker.ratelimit: a token bucket per caller, on an injected clock."""

from __future__ import annotations

import pytest

from broker.ratelimit import RateLimiter, Throttle, retry_after
from tests.fakes import FakeClock


def limiter(rate: float, burst: int, size: int = 100) -> tuple[RateLimiter, FakeClock]:
    """A limiter on a clock that moves only when the test moves it.

    ``clock.suspend`` moves its time forward; there are no sleepers to wake.
    """
    clock = FakeClock()
    return RateLimiter(rate, burst, clock.now, size=size), clock


def test_a_new_caller_may_burst() -> None:
    """A caller never seen before gets ``burst`` requests at once, no more."""
    limits, _ = limiter(rate=1.0, burst=3)

    answers = [limits.wait("uid:1000") for _ in range(4)]

    assert answers[:3] == [0.0, 0.0, 0.0]
    assert answers[3] > 0


def test_the_bucket_refills_at_rate() -> None:
    """Each 1/rate seconds gives back one request; part of one gives none."""
    limits, clock = limiter(rate=2.0, burst=1)
    assert limits.wait("tcp") == 0.0

    clock.suspend(0.25)
    assert limits.wait("tcp") > 0
    clock.suspend(0.25)
    assert limits.wait("tcp") == 0.0
    assert limits.wait("tcp") > 0


def test_refill_stops_at_burst() -> None:
    """A caller idle for long gets ``burst`` requests back, not more."""
    limits, clock = limiter(rate=10.0, burst=2)
    limits.wait("tcp")
    limits.wait("tcp")

    clock.suspend(3600.0)
    answers = [limits.wait("tcp") for _ in range(3)]

    assert answers[:2] == [0.0, 0.0]
    assert answers[2] > 0


def test_the_wait_is_the_time_to_the_next_request() -> None:
    """A refusal says how long until one whole request is back in the bucket."""
    limits, clock = limiter(rate=0.5, burst=1)
    limits.wait("tcp")

    assert limits.wait("tcp") == pytest.approx(2.0)
    clock.suspend(0.5)
    assert limits.wait("tcp") == pytest.approx(1.5)
    clock.suspend(1.5)
    assert limits.wait("tcp") == 0.0


@pytest.mark.parametrize(
    ("seconds", "header"),
    [(0.0, "1"), (0.001, "1"), (1.0, "1"), (1.5, "2"), (2.0, "2"), (2.0001, "3")],
)
def test_retry_after_is_whole_seconds_rounded_up(seconds: float, header: str) -> None:
    """Retry-After is the wait rounded up to whole seconds, never below 1."""
    assert retry_after(seconds) == header


def test_a_refused_request_takes_nothing() -> None:
    """Asking again while refused does not push the next allowed request back."""
    limits, clock = limiter(rate=1.0, burst=1)
    limits.wait("tcp")

    clock.suspend(0.5)
    first = limits.wait("tcp")
    second = limits.wait("tcp")
    third = limits.wait("tcp")
    clock.suspend(0.5)

    assert first == second == third == pytest.approx(0.5)
    assert limits.wait("tcp") == 0.0


def test_callers_have_separate_buckets() -> None:
    """One caller using up its bucket leaves every other caller's alone."""
    limits, _ = limiter(rate=1.0, burst=2)
    for _ in range(5):
        limits.wait("uid:1000")

    assert limits.wait("uid:1000") > 0
    assert limits.wait("uid:1001") == 0.0
    assert limits.wait("key:app") == 0.0
    assert limits.wait("tcp") == 0.0


def test_the_table_forgets_the_least_recently_seen_caller() -> None:
    """Past ``size`` callers the one seen longest ago is dropped (a full bucket
    again), while a recently seen one keeps its state."""
    limits, _ = limiter(rate=1.0, burst=1, size=2)
    limits.wait("old")
    limits.wait("recent")
    assert limits.wait("old") > 0
    assert limits.wait("recent") > 0
    # "old" is now the most recently seen: the next newcomer evicts "recent".
    limits.wait("old")

    assert limits.wait("newcomer") == 0.0
    assert limits.wait("old") > 0
    assert limits.wait("recent") == 0.0


def test_a_throttle_lets_one_through_per_interval_and_counts_the_rest() -> None:
    """The first event of a key shows; the next shown one says how many
    were held back; keys do not share an interval."""
    clock = FakeClock()
    throttle = Throttle(10.0, clock.now)

    first = throttle.admit("a")
    held = [throttle.admit("a") for _ in range(4)]
    other = throttle.admit("b")
    clock.suspend(10.0)
    later = throttle.admit("a")

    assert first == 0
    assert held == [None] * 4
    assert other == 0
    assert later == 4
