"""When to refresh and how long to wait after a failure: pure arithmetic.

Random draws come in as ``rand`` in [0, 1) so tests can pin them.
"""

from __future__ import annotations

from broker.config import RefreshPolicy
from broker.errors import IssuerError


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
