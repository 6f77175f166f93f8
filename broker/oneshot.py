"""``token-broker once``: fetch each client's token one time, write its files, end.

For init containers, Jobs and CronJobs, which cannot wait for a sidecar
that never exits. Each client gets the same request, token files and
on_refresh command as under ``serve``, all clients at once; a transient
failure (connection, timeout, 429, 5xx) is retried a few times within
seconds, a refusal (a wrong secret, say) is not.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from broker.clock import Clock, SystemClock
from broker.config import Config
from broker.errors import IssuerError
from broker.issuer import IssuerClient
from broker.metrics import Metrics
from broker.refresh import Refresher
from broker.registry import issuer_fetch
from broker.sinks import SinkWriter
from broker.transport import client_session

ATTEMPTS = 3
# A longer wait (a Retry-After of minutes) ends the client's attempts: a Job
# is better off failing now and being retried by its controller.
MAX_RETRY_WAIT = 10.0

log = structlog.get_logger("broker.oneshot")


@dataclass(frozen=True)
class Outcome:
    """What ``once`` did for one client; ``detail`` is expiry or reason."""

    client: str
    required: bool
    ok: bool
    detail: str


async def run_once(
    config: Config,
    names: Sequence[str] = (),
    *,
    attempts: int = ATTEMPTS,
    clock: Clock | None = None,
) -> list[Outcome]:
    """Fetch the clients ``names`` (every client when empty) once each.

    A client named in ``names`` counts as required, whatever the config says.
    Raises ``BrokerError`` or ``OSError`` when the dev issuer cannot start.
    """
    clock = clock or SystemClock()
    metrics = Metrics()
    writer = SinkWriter(metrics)
    chosen = list(dict.fromkeys(names)) or list(config.clients)

    async with contextlib.AsyncExitStack() as stack:
        if config.dev_issuer is not None:
            from broker import devissuer

            issuer_server = await devissuer.start(config.dev_issuer)
            stack.push_async_callback(issuer_server.close)
        session = await stack.enter_async_context(client_session())
        fetch_for = issuer_fetch(IssuerClient(session), config)
        stack.push_async_callback(writer.close)

        refreshers = [
            Refresher(
                name,
                config.clients[name].environment,
                config.clients[name].scopes,
                config.policy(name),
                fetch_for(name),
                clock=clock,
                metrics=metrics,
                on_token=writer.hook(name, config.clients[name]),
            )
            for name in chosen
        ]
        errors = await asyncio.gather(
            *(_fetch(refresher, attempts, clock) for refresher in refreshers)
        )
        await writer.idle()

    outcomes = []
    for refresher, error in zip(refreshers, errors, strict=True):
        required = bool(names) or config.clients[refresher.name].required
        outcomes.append(_outcome(refresher, error, writer, required=required))

    return outcomes


async def _fetch(
    refresher: Refresher, attempts: int, clock: Clock
) -> IssuerError | None:
    """Get one token, retrying transient failures; the last error if none."""
    for attempt in range(1, attempts + 1):
        try:
            await refresher.refresh()
        except IssuerError as exc:
            error = exc
        else:
            return None

        wait = max(0.0, refresher.next_attempt - clock.now())
        if error.permanent or attempt == attempts or wait > MAX_RETRY_WAIT:
            break
        log.info(
            "once.retrying",
            client=refresher.name,
            reason=error.reason,
            attempt=attempt,
            retry_in=round(wait, 1),
        )
        await clock.sleep(wait)

    return error


def _outcome(
    refresher: Refresher,
    error: IssuerError | None,
    writer: SinkWriter,
    *,
    required: bool,
) -> Outcome:
    name = refresher.name
    sinks = writer.client(name)
    if error is not None:
        return Outcome(name, required, False, f"{error.reason}: {error.message}")
    if sinks is not None and sinks.error is not None:
        return Outcome(name, required, False, f"token file: {sinks.error}")
    if sinks is not None and sinks.hook_error is not None:
        return Outcome(name, required, False, f"on_refresh: {sinks.hook_error}")

    assert refresher.token is not None
    return Outcome(name, required, True, f"expires {refresher.token.expires_iso}")


def exit_code(outcomes: Sequence[Outcome]) -> int:
    """0 when every required client succeeded, else 1."""
    return 0 if all(o.ok for o in outcomes if o.required) else 1


def summary(outcomes: Sequence[Outcome]) -> str:
    """An aligned table: client, required, result, and expiry or reason."""
    rows = [("client", "required", "result", "detail")]
    for o in outcomes:
        required = "yes" if o.required else "no"
        rows.append((o.client, required, "ok" if o.ok else "failed", o.detail))
    width = [max(len(row[column]) for row in rows) for column in range(3)]

    lines = [
        f"{a.ljust(width[0])}  {b.ljust(width[1])}  {c.ljust(width[2])}  {d}"
        for a, b, c, d in rows
    ]
    return "\n".join(lines) + "\n"
