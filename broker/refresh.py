"""One client's token: the refresh schedule, backoff and single flight.

A :class:`Refresher` owns the cached token of one client. Its :meth:`run`
loop fetches at start, then again once the schedule says so; callers read
the cached token with :meth:`get`, which only waits when no servable token
exists and a request is (or may be) under way. Every caller arriving while a
request is in flight shares that one request.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Literal

import structlog

from broker import redact
from broker.clock import Clock
from broker.config import RefreshPolicy
from broker.errors import IssuerError, TokenUnavailable
from broker.metrics import Metrics
from broker.schedule import backoff_delay, refresh_delay, serve_margin
from broker.token import Grant, Token, rfc3339

State = Literal["pending", "fresh", "refreshing", "stale", "failing", "expired"]
Fetch = Callable[[], Awaitable[Grant]]
# Called with every new token, after it is cached (token files, hooks).
OnToken = Callable[[Token], Awaitable[None]]

log = structlog.get_logger("broker.refresh")

# However short-lived a token, never ask for the next one sooner than this.
MIN_REFRESH_DELAY = 1.0
# Failures that a rotated secret, key or certificate can cure.
CREDENTIAL_REASONS = frozenset({"invalid_client", "secret_unreadable"})
CREDENTIAL_CHECK_EVERY = 5.0


class Refresher:
    """Keep one client's token fresh; see the module docstring."""

    def __init__(
        self,
        name: str,
        environment: str,
        scopes: tuple[str, ...],
        policy: RefreshPolicy,
        fetch: Fetch,
        *,
        clock: Clock,
        metrics: Metrics,
        rand: Callable[[], float] = random.random,
        give_up: asyncio.Event | None = None,
        fingerprint: Callable[[], str] | None = None,
        on_token: OnToken | None = None,
        scoped: bool = False,
        keep_going: Callable[[], bool] | None = None,
    ) -> None:
        self.name = name
        self.environment = environment
        self.scopes = scopes
        self.policy = policy
        self._fetch = fetch
        self._clock = clock
        self._metrics = metrics
        self._rand = rand
        # Set when the broker stops: callers still waiting then get an answer
        # (503) before the listeners' drain deadline cuts their connection.
        self._give_up = give_up or asyncio.Event()
        # A digest of the credential files, to notice a rotation while the
        # issuer refuses the client (see _watch_credentials).
        self._fingerprint = fingerprint
        self._refused_with: str | None = None
        self._on_token = on_token
        # A token for a subset of the client's scopes (see broker.scoped):
        # it counts as the client's, and it stops when nobody uses it.
        self.scoped = scoped
        self._keep_going = keep_going

        self.token: Token | None = None
        self.failures = 0
        self.last_error: IssuerError | None = None
        self.last_success_wall: float | None = None
        self.next_attempt = clock.now()
        self._attempted_at: float | None = None
        self._inflight: asyncio.Task[Token] | None = None
        self._changed = asyncio.Event()
        if not scoped:
            metrics.add_client(name)

    async def run(self) -> None:
        """Fetch now, then keep refreshing until cancelled."""
        while True:
            inflight = self._inflight
            if inflight is not None and not inflight.done():
                await asyncio.wait({inflight})
                continue

            now = self._clock.now()
            if now >= self.next_attempt:
                if self.token is not None and not self._wanted():
                    return
                await asyncio.wait({self.refresh()})
                continue

            await self._wait(self.next_attempt - now)

    def _wanted(self) -> bool:
        return self._keep_going is None or self._keep_going()

    def cancel(self) -> None:
        """Abandon a request in flight (at shutdown)."""
        if self._inflight is not None:
            self._inflight.cancel()

    def refresh(self) -> asyncio.Task[Token]:
        """Start a token request, or join the one already in flight."""
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.create_task(
                self._attempt(), name=f"refresh-{self.name}"
            )
            # Nobody may await a failed attempt; its error is logged already.
            self._inflight.add_done_callback(_consume_error)
        return self._inflight

    async def get(self, min_ttl: float = 0.0) -> Token:
        """Return a servable token living ``min_ttl`` more seconds.

        Waits only for a request in flight, or starts one when no servable
        token exists and neither backoff nor ``min_interval`` forbids it.
        Raises :class:`TokenUnavailable` otherwise.
        """
        token = self.token
        if token is not None and token.servable(self._clock.now(), min_ttl):
            return token

        task = self._inflight
        if task is None or task.done():
            if not self._may_fetch(self._clock.now()):
                raise self.unavailable(min_ttl)
            task = self.refresh()
        log.debug("token.waiting", client=self.name, min_ttl=min_ttl)
        await self._wait_for(task)

        token = self.token
        if token is not None and token.servable(self._clock.now(), min_ttl):
            return token

        raise self.unavailable(min_ttl)

    async def _wait_for(self, task: asyncio.Task[Token]) -> None:
        """Wait for a request in flight, but not past its timeout or a stop."""
        if self._give_up.is_set():
            return
        give_up = asyncio.ensure_future(self._give_up.wait())
        try:
            await asyncio.wait(
                {task, give_up},
                timeout=self.policy.timeout + 1.0,
                return_when="FIRST_COMPLETED",
            )
        finally:
            give_up.cancel()

    async def force(self) -> Token:
        """A new token now, for a caller whose API refused the held one.

        Joins a request in flight. Within ``min_interval`` of the last
        request, or during a backoff, no new request is made: the newest
        token is returned (a second refresh could not be fresher), or
        :class:`TokenUnavailable` when none is valid.
        """
        task = self._inflight
        if task is None or task.done():
            if not self._may_fetch(self._clock.now()):
                token = self.servable()
                if token is not None:
                    return token
                raise self.unavailable()
            log.info("token.forced", client=self.name, scope=" ".join(self.scopes))
            task = self.refresh()
        await self._wait_for(task)

        token = self.servable()
        if token is None:
            raise self.unavailable()

        return token

    def servable(self) -> Token | None:
        """The cached token if it may be handed out now, else ``None``."""
        token = self.token
        if token is not None and token.servable(self._clock.now()):
            return token
        return None

    def state(self) -> State:
        """Summarise the client for status pages and ``/v1/clients``."""
        now = self._clock.now()
        token = self.token
        valid = token is not None and token.servable(now)

        if self._inflight is not None and not self._inflight.done():
            return "refreshing"
        if not valid:
            return "pending" if self._attempted_at is None else "expired"
        if self.failures:
            return "failing"
        if token is not None and now >= token.refresh_at:
            return "stale"
        return "fresh"

    def unavailable(self, min_ttl: float = 0.0) -> TokenUnavailable:
        """Explain why no token can be served, and when to try again."""
        now = self._clock.now()
        retry_after = max(1.0, self.next_attempt - now)

        if self._give_up.is_set():
            reason, message = "stopping", "the broker is shutting down"
        elif self.last_error is not None:
            reason, message = self.last_error.reason, self.last_error.message
        elif self.token is None:
            reason, message = "pending", "the first token request is not answered yet"
        elif min_ttl and self.token.servable(now):
            reason = "min_ttl"
            message = f"the held token lives less than min_ttl={min_ttl:g}s"
            retry_after = max(1.0, self._next_fetch_allowed(now) - now)
        else:
            reason, message = "expired", "the held token has expired"

        return TokenUnavailable(self.name, reason, message, retry_after)

    def _may_fetch(self, now: float) -> bool:
        return now >= self._next_fetch_allowed(now)

    def _next_fetch_allowed(self, now: float) -> float:
        allowed = now
        if self.failures:
            allowed = self.next_attempt
        if self._attempted_at is not None:
            allowed = max(allowed, self._attempted_at + self.policy.min_interval)
        return allowed

    async def _wait(self, seconds: float) -> None:
        """Sleep on the clock, or less when another caller changed the plan
        or a refused client's credentials were rotated."""
        self._changed.clear()
        waiters = {
            asyncio.ensure_future(self._clock.sleep(seconds)),
            asyncio.ensure_future(self._changed.wait()),
        }
        if self._refused_with is not None:
            waiters.add(asyncio.ensure_future(self._watch_credentials()))
        try:
            await asyncio.wait(waiters, return_when="FIRST_COMPLETED")
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def _watch_credentials(self) -> None:
        """Return once the credential files differ from the refused ones.

        A refused client waits ``backoff.permanent``; a secret rotated in
        the meantime (a Kubernetes secret volume swapping its ``..data``
        link, say) should be tried at once. There is no portable file
        notification for a symlink swap, so the digest is checked every
        few seconds, and only while the client is refused.
        """
        assert self._fingerprint is not None
        while True:
            await self._clock.sleep(CREDENTIAL_CHECK_EVERY)
            current = self._fingerprint()
            if current and current != self._refused_with:
                break

        log.info("token.credentials_changed", client=self.name)
        # One prompt retry per change; what follows is judged on its own.
        self._refused_with = None
        self.next_attempt = self._clock.now()

    async def _attempt(self) -> Token:
        started = self._clock.now()
        started_wall = self._clock.wall()
        self._attempted_at = started

        try:
            grant = await self._fetch()
        except IssuerError as exc:
            self._failed(exc, self._clock.now() - started)
            raise
        except Exception as exc:
            # A bug in one request must not end the client's schedule.
            log.exception("token.refresh_crashed", client=self.name)
            error = IssuerError("internal_error", f"unexpected {type(exc).__name__}")
            self._failed(error, self._clock.now() - started)
            raise error from None

        token = self._succeeded(grant, started, started_wall)
        if self._on_token is not None:
            try:
                await self._on_token(token)
            except Exception:
                # Token files and hooks report their own failures; one that
                # escapes must not turn a good token into a failed refresh.
                log.exception("token.hook_crashed", client=self.name)

        return token

    def _succeeded(self, grant: Grant, started: float, started_wall: float) -> Token:
        duration = self._clock.now() - started
        lifetime = grant.expires_in or self.policy.default_lifetime
        delay = refresh_delay(lifetime, self.policy, self._rand())
        # The issuer's clock started no earlier than our request did, so
        # timing from the send errs on the side of expiring early.
        token = Token(
            value=grant.access_token,
            lifetime=lifetime,
            obtained_at=started,
            obtained_wall=started_wall,
            scope=grant.scope if grant.scope is not None else " ".join(self.scopes),
            margin=serve_margin(lifetime, self.policy),
            refresh_at=started + max(delay, MIN_REFRESH_DELAY),
            expires_iso=rfc3339(started_wall + lifetime),
        )

        previous, self.token = self.token, token
        redact.remember_secret(token.value.reveal())
        if previous is not None and previous.value != token.value:
            redact.forget_secret(previous.value.reveal())
        self.failures = 0
        self.last_error = None
        self._refused_with = None
        self.last_success_wall = self._clock.wall()
        self.next_attempt = token.refresh_at
        self._changed.set()

        self._metrics.refreshed(
            self.name,
            self.environment,
            duration,
            token.expires_wall,
            gauges=not self.scoped,
        )
        log.info(
            "token.refreshed",
            client=self.name,
            environment=self.environment,
            expires_in=int(lifetime),
            lifetime_given=grant.expires_in is not None,
            refresh_in=round(token.refresh_at - self._clock.now(), 1),
            duration=round(duration, 3),
            scope=token.scope,
            token_fp=token.value.fingerprint(),
        )

        return token

    def _failed(self, error: IssuerError, duration: float) -> None:
        self.failures += 1
        self.last_error = error
        if error.reason in CREDENTIAL_REASONS and self._fingerprint is not None:
            self._refused_with = self._fingerprint()
        delay = backoff_delay(self.failures, error, self.policy, self._rand())
        self.next_attempt = self._clock.now() + delay
        self._changed.set()

        self._metrics.refresh_failed(
            self.name,
            self.environment,
            error.reason,
            duration,
            self.failures,
            gauges=not self.scoped,
        )
        log.warning(
            "token.refresh_failed",
            client=self.name,
            environment=self.environment,
            reason=error.reason,
            message=error.message,
            status=error.status,
            permanent=error.permanent,
            scope=" ".join(self.scopes),
            attempt=self.failures,
            retry_in=round(delay, 1),
            still_serving=self.servable() is not None,
            duration=round(duration, 3),
        )


def _consume_error(task: asyncio.Task[Token]) -> None:
    if not task.cancelled():
        task.exception()
