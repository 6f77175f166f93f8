"""Refresh timing and failure backoff follow the policy, whatever the draw."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from broker.config import RefreshPolicy
from broker.errors import IssuerError
from broker.schedule import (
    MAX_WAIT,
    backoff_delay,
    http_date,
    parse_reset,
    parse_retry_after,
    refresh_delay,
    retry_delay,
    serve_margin,
)

HOUR = 3600.0
NOW = 1_700_000_000.0
ALMOST_ONE = 0.999999
TRANSIENT = IssuerError("connection", "cannot reach the issuer")
PERMANENT = IssuerError("invalid_client", "status 401", status=401, permanent=True)


def policy(**fields: Any) -> RefreshPolicy:
    """The default policy with ``fields`` laid over it."""
    return RefreshPolicy.model_validate(fields)


def transient(retry_after: float | None = None) -> IssuerError:
    """A retryable failure, such as a 503, with an optional Retry-After."""
    return IssuerError("http_5xx", "status 503", status=503, retry_after=retry_after)


# refresh_delay


def test_hour_token_refreshes_at_eighty_percent() -> None:
    """A one-hour token with the defaults is refreshed after 48 minutes."""
    assert refresh_delay(HOUR, policy(), rand=0.0) == 2880.0


def test_before_caps_a_late_at() -> None:
    """With at 0.95 the five-minute lead wins: refresh 55 minutes in."""
    assert refresh_delay(HOUR, policy(at=0.95, before="5m"), rand=0.0) == 3300.0


def test_short_token_refreshes_at_half_life() -> None:
    """A 10-minute token with before 5m is refreshed at half its life."""
    assert refresh_delay(600.0, policy(before="5m"), rand=0.0) == 300.0


def test_token_shorter_than_twice_before_still_waits_half() -> None:
    """An 8-minute token with before 5m waits 4 minutes, not zero."""
    assert refresh_delay(480.0, policy(before="5m"), rand=0.0) == 240.0


def test_refresh_happens_while_the_token_is_still_served() -> None:
    """at 1 with no lead still refreshes before the serve margin begins."""
    strict = policy(at=1.0, before=0, margin="10s", jitter=0)

    assert refresh_delay(HOUR, strict, rand=0.0) == HOUR - 10.0


def test_jitter_only_moves_earlier() -> None:
    """Jitter takes up to ``jitter`` of the planned delay off, never adds."""
    chosen = policy(jitter=0.1)

    earliest = refresh_delay(HOUR, chosen, rand=ALMOST_ONE)
    latest = refresh_delay(HOUR, chosen, rand=0.0)

    assert latest == 2880.0
    assert 2880.0 * 0.9 <= earliest < 2880.0
    assert earliest == pytest.approx(2592.0)


def test_no_jitter_ignores_the_draw() -> None:
    """With jitter 0 every broker refreshes at the same planned moment."""
    assert refresh_delay(HOUR, policy(jitter=0), rand=0.7) == 2880.0


# serve_margin


def test_serve_margin_is_the_policy_margin_for_long_tokens() -> None:
    """A one-hour token stops being served ``margin`` before expiry."""
    assert serve_margin(HOUR, policy(margin="10s")) == 10.0


def test_serve_margin_is_at_most_a_tenth_of_the_lifetime() -> None:
    """A one-minute token keeps 54 of its 60 seconds servable."""
    assert serve_margin(60.0, policy(margin="10s")) == 6.0


# backoff_delay


def test_backoff_grows_exponentially_up_to_max() -> None:
    """The ceiling doubles per failure from ``initial`` and stops at ``max``."""
    chosen = policy(backoff={"initial": "1s", "max": "2m"})

    delays = [backoff_delay(n, TRANSIENT, chosen, ALMOST_ONE) for n in range(1, 10)]

    ceilings = [1, 2, 4, 8, 16, 32, 64, 120, 120]
    assert delays == [pytest.approx(c * ALMOST_ONE) for c in ceilings]


def test_backoff_has_full_jitter() -> None:
    """A draw of one half waits half the ceiling."""
    chosen = policy(backoff={"initial": "1s", "max": "2m"})

    assert backoff_delay(5, TRANSIENT, chosen, rand=0.5) == 8.0


def test_backoff_is_never_zero() -> None:
    """A zero draw still waits half of ``initial``."""
    chosen = policy(backoff={"initial": "2s", "max": "2m"})

    assert backoff_delay(1, TRANSIENT, chosen, rand=0.0) == 1.0
    assert backoff_delay(30, TRANSIENT, chosen, rand=0.0) == 1.0


def test_backoff_survives_endless_failures() -> None:
    """Thousands of failures in a row still give a finite delay at ``max``."""
    chosen = policy(backoff={"initial": "1s", "max": "2m"})

    assert backoff_delay(100_000, TRANSIENT, chosen, ALMOST_ONE) <= 120.0


def test_permanent_errors_wait_backoff_permanent() -> None:
    """invalid_client and friends wait ``backoff.permanent``, less jitter."""
    chosen = policy(jitter=0.1, backoff={"permanent": "10m"})

    assert backoff_delay(1, PERMANENT, chosen, rand=0.0) == 600.0
    assert backoff_delay(1, PERMANENT, chosen, rand=ALMOST_ONE) >= 540.0


def test_retry_after_is_a_floor() -> None:
    """An issuer's Retry-After holds the next attempt back at least that long."""
    chosen = policy(backoff={"initial": "1s", "max": "2m"})

    assert backoff_delay(1, transient(30.0), chosen, rand=0.0) == 30.0


def test_retry_after_does_not_shorten_the_backoff() -> None:
    """A Retry-After shorter than the backoff leaves the backoff as it is."""
    chosen = policy(backoff={"initial": "1s", "max": "2m"})

    assert backoff_delay(8, transient(1.0), chosen, rand=0.5) == 60.0


def test_retry_after_is_capped_at_permanent() -> None:
    """A Retry-After of days is cut to ``backoff.permanent``."""
    chosen = policy(backoff={"permanent": "10m"})

    assert backoff_delay(1, transient(86400.0 * 3), chosen, rand=0.0) == 600.0


# the wait an issuer asks for


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        (" 5 ", 5.0),
        ("0", 0.0),
        ("Tue, 14 Nov 2023 22:15:20 GMT", 120.0),
        ("Tue Nov 14 22:15:20 2023", 120.0),
        ("Tuesday, 14-Nov-23 22:15:20 GMT", 120.0),
        ("Tue, 14 Nov 2023 22:00:00 GMT", 0.0),
        ("-5", None),
        ("1.5", None),
        ("soon", None),
        ("", None),
        (None, None),
        ("9" * 400, None),
        ("١٢", None),
    ],
)
def test_retry_after_forms(value: str | None, seconds: float | None) -> None:
    """Retry-After is delay-seconds or any HTTP date; anything else is ignored."""
    assert parse_retry_after(value, NOW) == seconds


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("30", 30.0),
        (" 7 ", 7.0),
        ("0", 0.0),
        ("2.5", 2.5),
        (str(int(NOW) + 90), 90.0),
        (f"{NOW + 12.5:.3f}", 12.5),
        (str(int(NOW) - 60), 0.0),
        ("999999999", MAX_WAIT),
        ("-3", None),
        ("1e3", None),
        ("1_000", None),
        ("nan", None),
        ("inf", None),
        ("١٢", None),
        ("9" * 40, None),
        ("", None),
        (None, None),
    ],
)
def test_rate_limit_reset_forms(value: str | None, seconds: float | None) -> None:
    """A reset is a delay, or a Unix time once it is past 2001 (waits capped
    at a year); nothing else."""
    assert parse_reset(value, NOW) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"Retry-After": "3", "RateLimit-Reset": "50"}, 3.0),
        ({"Retry-After": "later", "RateLimit-Reset": "50"}, 50.0),
        ({"X-RateLimit-Reset": str(int(NOW) + 20)}, 20.0),
        ({"X-Rate-Limit-Reset": "11"}, 11.0),
        ({"X-RateLimit-Reset": "soon", "X-Rate-Limit-Reset": "11"}, 11.0),
        ({"X-RateLimit-Limit": "100"}, None),
        ({}, None),
    ],
)
def test_retry_delay_prefers_retry_after(
    headers: dict[str, str], seconds: float | None
) -> None:
    """Retry-After decides; the first readable reset header fills in for it."""
    assert retry_delay(headers, NOW) == seconds


def test_http_date_without_a_zone_is_gmt() -> None:
    """An asctime date names no zone; RFC 9110 says it is GMT."""
    assert http_date("Tue Nov 14 22:13:20 2023") == NOW
    assert http_date("Tue, 14 Nov 2023 23:13:20 +0100") == NOW
    assert http_date("Tue, 14 Nov 2023 22:13:20 GMT") == NOW


# properties

lifetimes = st.floats(min_value=1.0, max_value=1e7)
fractions = st.floats(min_value=0.0, max_value=1.0, exclude_max=True)


@st.composite
def policies(draw: st.DrawFn) -> RefreshPolicy:
    """Any valid refresh policy."""
    return policy(
        at=draw(st.floats(min_value=0.01, max_value=1.0)),
        before=draw(st.floats(min_value=0.0, max_value=1e4)),
        jitter=draw(st.floats(min_value=0.0, max_value=0.5)),
        margin=draw(st.floats(min_value=0.0, max_value=100.0)),
    )


@given(lifetime=lifetimes, chosen=policies(), rand=fractions)
def test_refresh_delay_stays_in_its_window(
    lifetime: float, chosen: RefreshPolicy, rand: float
) -> None:
    """No earlier than half-life less jitter, no later than ``before`` ahead."""
    assume(lifetime >= 2 * chosen.before)

    delay = refresh_delay(lifetime, chosen, rand)

    assert lifetime / 2 * (1 - chosen.jitter) <= delay <= lifetime - chosen.before


@given(lifetime=lifetimes, chosen=policies(), rand=fractions)
@example(lifetime=HOUR, chosen=policy(at=1.0, before=0, margin=10, jitter=0), rand=0.0)
def test_refresh_delay_comes_before_expiry(
    lifetime: float, chosen: RefreshPolicy, rand: float
) -> None:
    """With any lead (``before`` or a margin) the refresh precedes expiry."""
    assume(chosen.before >= 0.001 or chosen.margin >= 0.001)

    delay = refresh_delay(lifetime, chosen, rand)

    assert 0 < delay < lifetime
    assert delay <= lifetime - serve_margin(lifetime, chosen)


@given(
    failures=st.integers(min_value=1, max_value=10_000),
    rand=fractions,
    retry_after=st.none() | st.floats(min_value=0.0, max_value=1e9),
)
def test_backoff_delay_is_bounded(
    failures: int, rand: float, retry_after: float | None
) -> None:
    """A transient failure waits between initial/2 and max (or Retry-After)."""
    chosen = policy(backoff={"initial": "1s", "max": "2m", "permanent": "10m"})

    delay = backoff_delay(failures, transient(retry_after), chosen, rand)

    assert 0.5 <= delay <= max(120.0, min(retry_after or 0.0, 600.0))
    if retry_after is not None:
        assert delay >= min(retry_after, 600.0)


@given(value=st.text(max_size=40), wall_now=st.floats(min_value=0, max_value=4e9))
def test_header_readers_never_raise(value: str, wall_now: float) -> None:
    """Whatever an issuer puts in these headers, the answer is a wait or None."""
    for seconds in (parse_retry_after(value, wall_now), parse_reset(value, wall_now)):
        assert seconds is None or 0.0 <= seconds < 1e13
    assert http_date(value) is None or isinstance(http_date(value), float)
