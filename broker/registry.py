"""All configured clients, their refreshers and their background tasks."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from functools import partial

from broker import credentials
from broker.clock import Clock
from broker.config import Config
from broker.issuer import IssuerClient
from broker.metrics import Metrics
from broker.refresh import Fetch, Refresher

FetchFactory = Callable[[str], Fetch]


class Registry:
    """The refreshers by client name, started and stopped together."""

    def __init__(
        self,
        config: Config,
        fetch_for: FetchFactory,
        *,
        clock: Clock,
        metrics: Metrics,
    ) -> None:
        self.config = config
        self.give_up = asyncio.Event()
        self.refreshers = {
            name: Refresher(
                name,
                spec.environment,
                spec.scopes,
                config.policy(name),
                fetch_for(name),
                clock=clock,
                metrics=metrics,
                give_up=self.give_up,
                fingerprint=(
                    partial(credentials.fingerprint, spec)
                    if credentials.rotatable(spec)
                    else None
                ),
            )
            for name, spec in config.clients.items()
        }
        self._tasks: list[asyncio.Task[None]] = []

    def __iter__(self) -> Iterator[Refresher]:
        return iter(self.refreshers.values())

    def get(self, name: str) -> Refresher | None:
        """The refresher of ``name``, or ``None`` for an unknown client."""
        return self.refreshers.get(name)

    def start(self) -> None:
        """Start every client's loop; all first requests go out together."""
        for refresher in self:
            task = asyncio.create_task(refresher.run(), name=f"client-{refresher.name}")
            self._tasks.append(task)

    async def stop(self) -> None:
        """Cancel every loop and any request in flight, and wait for them."""
        for refresher in self:
            refresher.cancel()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    def waiting(self) -> list[str]:
        """Required clients that hold no servable token; empty when ready."""
        return [
            name
            for name, spec in self.config.clients.items()
            if spec.required and self.refreshers[name].servable() is None
        ]


def issuer_fetch(issuer: IssuerClient, config: Config) -> FetchFactory:
    """Bind each client's config to the shared issuer client."""

    def fetch_for(name: str) -> Fetch:
        spec = config.clients[name]
        env = config.environments[spec.environment]
        timeout = config.policy(name).timeout

        return partial(issuer.fetch, spec, env, timeout, spec.environment, name)

    return fetch_for
