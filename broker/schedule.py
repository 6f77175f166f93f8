"""When to refresh and how long to wait after a failure: pure arithmetic.

That includes reading the wait an issuer asks for in its headers. Random
draws come in as ``rand`` in [0, 1) so tests can pin them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import UTC
from email.utils import parsedate_to_datetime

from broker.config import RefreshPolicy
from broker.errors import IssuerError

# Rate-limit reset headers vendors send besides (or instead of) Retry-After.
_RESET_HEADERS = ("RateLimit-Reset", "X-RateLimit-Reset", "X-Rate-Limit-Reset")
# 2001-09-09 as a Unix time, and 31 years as a delay.
_EPOCH_FLOOR = 1e9
_DECIMAL = re.compile(r"[0-9]{1,12}(\.[0-9]{1,9})?", re.ASCII)


def refresh_delay(lifetime: float, policy: RefreshPolicy, rand: float) -> float:
    """Seconds after a token arrives at which to fetch its successor.

    ``at`` of the lifetime, but no later than ``before`` ahead of expiry (nor
    later than the token is still served) and no earlier than half the
    lifetime (a 10-minute token with ``before: 5m`` would otherwise be
    refreshed the moment it arrives). Jitter only moves the moment earlier,
    so the ``before`` promise holds for every broker.
    """
    lead = max(policy.before, serve_margin(lifetime, policy))
    planned = min(policy.at * lifetime, lifetime - lead)
    planned = max(planned, lifetime / 2)

    return planned * (1.0 - policy.jitter * rand)


def serve_margin(lifetime: float, policy: RefreshPolicy) -> float:
    """Seconds before expiry after which a token is no longer handed out.

    At most a tenth of the lifetime, so short-lived tokens stay usable.
    """
    return min(policy.margin, lifetime / 10)


def backoff_delay(
    failures: int, error: IssuerError, policy: RefreshPolicy, rand: float
) -> float:
    """Seconds to wait after the ``failures``-th consecutive failure.

    Exponential with full jitter, capped at ``backoff.max``; permanent
    errors wait ``backoff.permanent`` (less up to ``jitter`` of it). An
    issuer's ``Retry-After`` is a floor, capped at ``backoff.permanent`` so a
    bogus value cannot park a client for days.
    """
    backoff = policy.backoff
    if error.permanent:
        delay = backoff.permanent * (1.0 - policy.jitter * rand)
    else:
        ceiling = min(backoff.max, backoff.initial * 2.0 ** min(failures - 1, 62))
        delay = max(backoff.initial / 2, ceiling * rand)
    if error.retry_after is not None:
        delay = max(delay, min(error.retry_after, backoff.permanent))

    return delay


def retry_delay(headers: Mapping[str, str], wall_now: float) -> float | None:
    """Seconds an error answer asks us to wait, if it says.

    ``Retry-After`` first; without it, the first readable rate-limit reset
    header (:data:`_RESET_HEADERS`).
    """
    seconds = parse_retry_after(headers.get("Retry-After"), wall_now)
    if seconds is not None:
        return seconds
    for name in _RESET_HEADERS:
        seconds = parse_reset(headers.get(name), wall_now)
        if seconds is not None:
            return seconds

    return None


# Longer waits than this are nonsense from a header; the backoff caps what
# it honours far lower anyway (backoff.permanent).
MAX_WAIT = 366 * 86400.0


def parse_retry_after(value: str | None, wall_now: float) -> float | None:
    """Read ``Retry-After`` as seconds (RFC 9110 10.2.3: delay or HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        seconds = float(value)
        return min(seconds, MAX_WAIT) if math.isfinite(seconds) else None
    moment = http_date(value)
    if moment is None:
        return None

    return min(max(0.0, moment - wall_now), MAX_WAIT)


def parse_reset(value: str | None, wall_now: float) -> float | None:
    """Read a rate-limit reset header as seconds from now.

    Vendors send either a delay (the IETF RateLimit draft) or a Unix time
    (GitHub style), sometimes with a fraction. No limiter asks for a wait
    of decades, so a value past :data:`_EPOCH_FLOOR` is a Unix time.
    """
    if not value or not _DECIMAL.fullmatch(value.strip()):
        return None
    number = float(value.strip())

    if number >= _EPOCH_FLOOR:
        number -= wall_now
    return min(max(0.0, number), MAX_WAIT)


def http_date(value: str | None) -> float | None:
    """An RFC 9110 HTTP-date as a Unix time; ``None`` when unreadable.

    All three RFC 9110 5.6.7 forms; the asctime form carries no zone and
    means GMT, like the others.
    """
    if not value:
        return None
    try:
        moment = parsedate_to_datetime(value.strip())
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.timestamp()
    except (TypeError, ValueError, OverflowError):
        return None
