"""The refresh schedule, backoff and single flight, on an injected clock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from broker.config import RefreshPolicy
from broker.errors import IssuerError, TokenUnavailable
from broker.metrics import Metrics
from broker.refresh import CREDENTIAL_CHECK_EVERY, Refresher
from tests.fakes import FakeClock, ScriptedFetch, grant, settle

NO_JITTER = {"jitter": 0.0}


def policy(**overrides: object) -> RefreshPolicy:
    return RefreshPolicy.model_validate({**NO_JITTER, **overrides})


def failure(
    reason: str = "http_5xx",
    *,
    permanent: bool = False,
    retry_after: float | None = None,
) -> IssuerError:
    return IssuerError(
        reason,
        f"{reason} from the test issuer",
        permanent=permanent,
        retry_after=retry_after,
    )


RefresherFactory = Callable[..., Refresher]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
async def make(clock: FakeClock, metrics: Metrics) -> AsyncIterator[RefresherFactory]:
    """Build refreshers; their loops are cancelled at teardown."""
    tasks: list[asyncio.Task[None]] = []

    def build(
        fetch: ScriptedFetch, *, run: bool = True, rand: float = 0.5, **rules: object
    ) -> Refresher:
        refresher = Refresher(
            "chat",
            "prod",
            ("a", "b"),
            policy(**rules),
            fetch,
            clock=clock,
            metrics=metrics,
            rand=lambda: rand,
        )
        if run:
            tasks.append(asyncio.create_task(refresher.run()))
        return refresher

    yield build

    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


async def test_fetches_at_start_and_serves(make: RefresherFactory) -> None:
    """The loop fetches at once and the token is served from the cache."""
    fetch = ScriptedFetch([grant("first")])
    refresher = make(fetch)
    await settle()

    token = await refresher.get()

    assert token.value.reveal() == "first"
    assert fetch.calls == 1
    assert refresher.state() == "fresh"


async def test_refreshes_at_the_configured_fraction(
    make: RefresherFactory, clock: FakeClock
) -> None:
    """A 1 h token is replaced once 80% of it has passed, not before."""
    fetch = ScriptedFetch([grant("first"), grant("second")])
    refresher = make(fetch)
    await settle()

    await clock.advance(2879)
    assert fetch.calls == 1
    await clock.advance(2)

    assert fetch.calls == 2
    assert (await refresher.get()).value.reveal() == "second"


async def test_before_caps_the_refresh_moment(
    make: RefresherFactory, clock: FakeClock
) -> None:
    """With at=0.99, ``before`` still forces the refresh 5 minutes early."""
    fetch = ScriptedFetch()
    make(fetch, at=0.99, before="5m")
    await settle()

    await clock.advance(3600 - 300 - 1)
    assert fetch.calls == 1
    await clock.advance(2)

    assert fetch.calls == 2


async def test_jitter_moves_refresh_earlier(
    make: RefresherFactory, clock: FakeClock
) -> None:
    """A jitter draw near 1 with jitter 0.1 refreshes at about 90% of plan."""
    fetch = ScriptedFetch()
    make(fetch, rand=0.999, jitter=0.1)
    await settle()

    await clock.advance(2880 * 0.9 - 1)
    assert fetch.calls == 1
    await clock.advance(2)

    assert fetch.calls == 2


async def test_missing_expiry_uses_default_lifetime(make: RefresherFactory) -> None:
    """No expires_in: the token lives default_lifetime."""
    refresher = make(ScriptedFetch([grant(expires_in=None)]), default_lifetime="2m")
    await settle()

    token = await refresher.get()

    assert token.lifetime == 120


async def test_failure_keeps_serving_the_valid_token(
    make: RefresherFactory, clock: FakeClock, metrics: Metrics
) -> None:
    """A failed refresh backs off and the old token is still served."""
    fetch = ScriptedFetch([grant("first"), failure(), grant("second")])
    refresher = make(fetch, rand=1.0)
    await settle()
    await clock.advance(2880)

    assert fetch.calls == 2
    assert refresher.state() == "failing"
    assert (await refresher.get()).value.reveal() == "first"
    labels = {"client": "chat", "environment": "prod"}
    assert (
        sample(
            metrics,
            "token_broker_refresh_total",
            **labels,
            result="failure",
            reason="http_5xx",
        )
        == 1
    )
    assert sample(metrics, "token_broker_consecutive_failures", client="chat") == 1

    await clock.advance(1)

    assert fetch.calls == 3
    assert (await refresher.get()).value.reveal() == "second"
    assert sample(metrics, "token_broker_consecutive_failures", client="chat") == 0


async def test_backoff_grows_and_is_capped(
    make: RefresherFactory, clock: FakeClock
) -> None:
    """Consecutive failures wait 1, 2, 4, 8 s ... then at most ``max``."""
    fetch = ScriptedFetch([failure()] * 20)
    refresher = make(fetch, rand=1.0, backoff={"initial": "1s", "max": "10s"})
    await settle()

    waits = []
    for _ in range(6):
        waits.append(refresher.next_attempt - clock.now())
        await clock.advance(waits[-1])

    assert waits == [1, 2, 4, 8, 10, 10]


async def test_permanent_error_backs_off_long(
    make: RefresherFactory, clock: FakeClock
) -> None:
    """invalid_client waits backoff.permanent, not the short backoff."""
    fetch = ScriptedFetch([failure("invalid_client", permanent=True)])
    refresher = make(fetch, backoff={"permanent": "10m"})
    await settle()

    assert refresher.next_attempt - clock.now() == 600
    await clock.advance(599)
    assert fetch.calls == 1


async def test_retry_after_is_honoured(
    make: RefresherFactory, clock: FakeClock
) -> None:
    """A 429 with Retry-After: 30 waits 30 s although backoff says 1 s."""
    fetch = ScriptedFetch([failure("rate_limited", retry_after=30.0)])
    make(fetch)
    await settle()

    await clock.advance(29)
    assert fetch.calls == 1
    await clock.advance(1)

    assert fetch.calls == 2


async def test_token_not_served_inside_the_margin(
    make: RefresherFactory, clock: FakeClock
) -> None:
    """Within ``margin`` of expiry the token is withheld: 503, not a dud."""
    fetch = ScriptedFetch([grant("first", 100.0)] + [failure()] * 50)
    refresher = make(fetch, margin="10s", backoff={"initial": 30, "max": 30})
    await settle()

    await clock.advance(89.5)
    assert (await refresher.get()).value.reveal() == "first"
    await clock.advance(1)

    with pytest.raises(TokenUnavailable, match="http_5xx from the test issuer"):
        await refresher.get()
    assert refresher.state() == "expired"


async def test_concurrent_callers_share_one_request(
    make: RefresherFactory,
) -> None:
    """Ten callers arriving during the first request cause one request."""
    fetch = ScriptedFetch([grant("only")])
    fetch.hold = asyncio.Event()
    refresher = make(fetch)
    await settle()

    callers = [asyncio.create_task(refresher.get()) for _ in range(10)]
    await settle()
    assert refresher.state() == "refreshing"
    fetch.hold.set()
    tokens = await asyncio.gather(*callers)

    assert fetch.calls == 1
    assert {t.value.reveal() for t in tokens} == {"only"}


async def test_callers_in_backoff_get_retry_after(
    make: RefresherFactory, clock: FakeClock
) -> None:
    """With no token and a backoff running, callers are told when to retry."""
    fetch = ScriptedFetch([failure(retry_after=20.0)])
    refresher = make(fetch)
    await settle()

    with pytest.raises(TokenUnavailable) as caught:
        await refresher.get()

    assert caught.value.reason == "http_5xx"
    assert caught.value.retry_after == 20
    assert fetch.calls == 1


async def test_min_ttl_refreshes_early_once(
    make: RefresherFactory, clock: FakeClock
) -> None:
    """min_ttl longer than the token has left fetches a new one, once."""
    fetch = ScriptedFetch([grant("first"), grant("second"), grant("third")])
    refresher = make(fetch, min_interval="5s")
    await settle()
    await clock.advance(1000)

    token = await refresher.get(min_ttl=3000)
    assert token.value.reveal() == "second"
    await clock.advance(1)

    assert (await refresher.get(min_ttl=3590)).value.reveal() == "second"
    assert fetch.calls == 2


async def test_min_interval_limits_caller_refreshes(
    make: RefresherFactory, clock: FakeClock
) -> None:
    """A caller asking for more than any token has cannot hammer the issuer."""
    fetch = ScriptedFetch([grant("a", 100.0), grant("b", 100.0)])
    refresher = make(fetch, min_interval="5s")
    await settle()
    await clock.advance(2)

    with pytest.raises(TokenUnavailable) as caught:
        await refresher.get(min_ttl=99.5)

    assert caught.value.reason == "min_ttl"
    assert caught.value.retry_after == 3
    assert fetch.calls == 1


async def test_unexpected_error_does_not_end_the_loop(
    make: RefresherFactory, clock: FakeClock
) -> None:
    """A crash inside a request counts as internal_error and retries."""
    fetch = ScriptedFetch([RuntimeError("boom"), grant("after")])
    refresher = make(fetch, rand=1.0)
    await settle()
    assert refresher.last_error is not None
    assert refresher.last_error.reason == "internal_error"

    await clock.advance(1)

    assert (await refresher.get()).value.reveal() == "after"


async def test_wake_from_suspend_rechecks_at_once(
    make: RefresherFactory, clock: FakeClock
) -> None:
    """After a suspend longer than the refresh delay, waking refreshes."""
    fetch = ScriptedFetch([grant("before-sleep"), grant("after-wake")])
    refresher = make(fetch)
    await settle()

    clock.suspend(3500)
    await settle()
    assert fetch.calls == 1
    assert refresher.state() == "stale"
    await clock.wake()

    assert fetch.calls == 2
    assert (await refresher.get()).value.reveal() == "after-wake"


async def test_a_suspend_past_expiry_withholds_the_token(
    make: RefresherFactory, clock: FakeClock
) -> None:
    """A token that expired during a suspend is never served, even before
    the wake-up is noticed."""
    fetch = ScriptedFetch([grant("old")])
    fetch.hold = asyncio.Event()
    refresher = make(fetch)
    fetch.hold.set()
    await settle()
    fetch.hold.clear()

    clock.suspend(4000)

    assert refresher.servable() is None
    assert refresher.state() in ("expired", "refreshing")


async def test_pending_state_before_first_answer(make: RefresherFactory) -> None:
    """Before any request completes the client is pending and not servable."""
    refresher = make(ScriptedFetch(), run=False)

    assert refresher.state() == "pending"
    assert refresher.servable() is None
    assert refresher.unavailable().reason == "pending"


async def test_waiting_callers_are_released_at_shutdown(
    clock: FakeClock, metrics: Metrics
) -> None:
    """When the broker gives up waiting, callers get 503 reason stopping."""
    give_up = asyncio.Event()
    fetch = ScriptedFetch()
    fetch.hold = asyncio.Event()
    refresher = Refresher(
        "chat",
        "prod",
        (),
        policy(),
        fetch,
        clock=clock,
        metrics=metrics,
        give_up=give_up,
    )
    caller = asyncio.create_task(refresher.get())
    await settle()
    assert not caller.done()

    give_up.set()

    with pytest.raises(TokenUnavailable) as caught:
        await caller
    assert caught.value.reason == "stopping"
    refresher.cancel()
    await settle()


async def test_a_credential_change_buys_one_prompt_retry_only(
    clock: FakeClock, metrics: Metrics
) -> None:
    """After a rotation is noticed and tried, later failures back off as
    usual, even though the files still differ from the refused ones."""
    files = {"digest": "old"}
    fetch = ScriptedFetch(
        [
            failure("invalid_client", permanent=True),
            failure("rate_limited", retry_after=600.0),
        ]
    )
    refresher = Refresher(
        "chat",
        "prod",
        (),
        policy(),
        fetch,
        clock=clock,
        metrics=metrics,
        fingerprint=lambda: files["digest"],
    )
    task = asyncio.create_task(refresher.run())
    await settle()
    assert fetch.calls == 1

    files["digest"] = "new"
    await clock.advance(CREDENTIAL_CHECK_EVERY)
    assert fetch.calls == 2
    for _ in range(10):
        await clock.advance(CREDENTIAL_CHECK_EVERY)

    assert fetch.calls == 2
    assert refresher.next_attempt - clock.now() > 500
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
