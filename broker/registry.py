"""All configured clients, their refreshers and their background tasks."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator
from functools import partial

from broker import credentials
from broker.clock import Clock
from broker.config import Config
from broker.issuer import IssuerClient
from broker.metrics import Metrics
from broker.refresh import Fetch, Refresher
from broker.reload import ReloadResult, diff, restart_keys
from broker.sinks import SinkWriter

FetchFactory = Callable[[str], Fetch]
# Makes the fetch factory of a config that a reload brings.
Binder = Callable[[Config], FetchFactory]


class Registry:
    """The refreshers by client name, started, reloaded and stopped together.

    ``bind`` makes the fetch factory for a reloaded config (see
    :func:`issuer_fetch`); without it, reloads keep using ``fetch_for``.
    ``sinks`` writes each client's token files after every new token (a
    writer of its own when not given).
    """

    def __init__(
        self,
        config: Config,
        fetch_for: FetchFactory,
        *,
        clock: Clock,
        metrics: Metrics,
        bind: Binder | None = None,
        sinks: SinkWriter | None = None,
    ) -> None:
        self.config = config
        self.give_up = asyncio.Event()
        self._fetch_for = fetch_for
        self._bind = bind
        self._clock = clock
        self._metrics = metrics
        self.sinks = sinks if sinks is not None else SinkWriter(metrics)
        self.refreshers = {
            name: self._build(name, config, fetch_for) for name in config.clients
        }
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._started = False

    def _build(self, name: str, config: Config, fetch_for: FetchFactory) -> Refresher:
        """A refresher for the client ``name`` of ``config``, not yet running."""
        spec = config.clients[name]

        return Refresher(
            name,
            spec.environment,
            spec.scopes,
            config.policy(name),
            fetch_for(name),
            clock=self._clock,
            metrics=self._metrics,
            give_up=self.give_up,
            fingerprint=(
                partial(credentials.fingerprint, spec)
                if credentials.rotatable(spec)
                else None
            ),
            on_token=self.sinks.hook(name, spec),
        )

    def __iter__(self) -> Iterator[Refresher]:
        return iter(self.refreshers.values())

    def get(self, name: str) -> Refresher | None:
        """The refresher of ``name``, or ``None`` for an unknown client."""
        return self.refreshers.get(name)

    def start(self) -> None:
        """Start every client's loop; all first requests go out together."""
        self._started = True
        for name, refresher in self.refreshers.items():
            self._run(name, refresher)

    def _run(self, name: str, refresher: Refresher) -> None:
        self._tasks[name] = asyncio.create_task(refresher.run(), name=f"client-{name}")

    async def stop(self) -> None:
        """Cancel every loop, request in flight and on_refresh command; wait."""
        self._started = False
        for refresher in self:
            refresher.cancel()
        tasks, self._tasks = list(self._tasks.values()), {}
        await _cancel(tasks)
        await self.sinks.close()

    async def apply(self, config: Config) -> ReloadResult:
        """Move to ``config`` by difference, keeping every token it can.

        Kept clients keep their refresher, token and schedule. A changed
        client gets a new refresher, which serves the old token until its
        own first token replaces it (or while its requests fail, as long as
        the old token is valid). Removed clients stop and leave the API and
        the metrics; added ones start. When a key that needs a restart
        differs, nothing changes. Calls must not overlap.
        """
        refused = restart_keys(self.config, config)
        if refused:
            return ReloadResult("refused", restart_keys=refused)
        plan = diff(self.config, config)
        if config == self.config:
            return ReloadResult("unchanged", plan)

        fetch_for = self._fetch_for if self._bind is None else self._bind(config)
        old, kept = self.refreshers, set(plan.kept)
        refreshers: dict[str, Refresher] = {}
        for name in config.clients:
            if name in kept:
                refreshers[name] = old[name]
                continue
            refreshers[name] = self._build(name, config, fetch_for)
            if name in old and _same_grant(self.config, config, name):
                _inherit(refreshers[name], old[name])
        # Whole replacements, with no await between them: a request or a
        # readiness probe sees the old set or the new one, never a mix.
        self.refreshers, self.config, self._fetch_for = refreshers, config, fetch_for

        retired = [*plan.changed, *plan.removed]
        for name in retired:
            old[name].cancel()
        stopping = [self._tasks.pop(name) for name in retired if name in self._tasks]
        if self._started:
            for name in (*plan.changed, *plan.added):
                self._run(name, refreshers[name])
        await _cancel(stopping)
        for name in plan.removed:
            self._metrics.remove_client(name)
            self.sinks.forget(name)

        return ReloadResult("applied", plan)

    def waiting(self) -> list[str]:
        """Required clients that hold no servable token; empty when ready."""
        return [
            name
            for name, spec in self.config.clients.items()
            if spec.required and self.refreshers[name].servable() is None
        ]


def _inherit(new: Refresher, old: Refresher) -> None:
    """Have ``new`` serve ``old``'s token until its own first one arrives.

    That token was issued for the old settings and stays valid for them.
    Serving it meanwhile means a reload never leaves callers without a
    token, while no request is sent with the old settings any more.
    """
    new.token = old.token
    new.last_success_wall = old.last_success_wall


def _same_grant(old: Config, new: Config, name: str) -> bool:
    """Whether the old token still fits the new settings of ``name``.

    It does when the client asks the same issuer, as the same client id,
    for no more than the token was issued for; a new secret or a new
    refresh policy changes nothing about the token itself. A narrowed scope,
    another audience or identity must not be answered with the old token.
    """
    before, after = old.clients[name], new.clients[name]
    return (
        before.client_id == after.client_id
        and old.environments[before.environment] == new.environments[after.environment]
        and set(after.scopes) >= set(before.scopes)
        and (before.audience, before.resource, before.params)
        == (after.audience, after.resource, after.params)
    )


async def _cancel(tasks: Iterable[asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` and wait until they have ended."""
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def issuer_fetch(issuer: IssuerClient, config: Config) -> FetchFactory:
    """Bind each client's config to the shared issuer client."""

    def fetch_for(name: str) -> Fetch:
        spec = config.clients[name]
        env = config.environments[spec.environment]
        timeout = config.policy(name).timeout

        return partial(issuer.fetch, spec, env, timeout, spec.environment, name)

    return fetch_for
