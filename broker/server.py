"""The daemon's lifecycle: start listeners and clients, stop them cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import structlog
from aiohttp import web

from broker import __version__, api, metrics_app, unixsock
from broker.audit import Audit
from broker.clock import SystemClock
from broker.config import Config
from broker.issuer import IssuerClient, skew_observer
from broker.limits import (
    Gate,
    GatedSockSite,
    GatedTCPSite,
    raise_descriptor_limit,
    runner_options,
)
from broker.metrics import Metrics
from broker.ratelimit import RateLimiter
from broker.registry import Registry, issuer_fetch
from broker.reload import Reloader, Source
from broker.scoped import ScopedTokens, builder
from broker.transport import client_session

log = structlog.get_logger("broker.server")

EXIT_FILE_CHECK_EVERY = 1.0


@dataclass
class Listeners:
    """What is bound, for the start-up log line and for tests."""

    http: str | None = None
    unix: str | None = None
    metrics: str | None = None
    runners: list[web.AppRunner] = field(default_factory=list)
    socket_identity: unixsock.Identity | None = None


async def serve(
    config: Config, stop: asyncio.Event, source: Source | None = None
) -> None:
    """Run the broker until ``stop`` is set; raises BrokerError on start-up.

    With ``source`` (where ``config`` was read from), SIGHUP and a change
    of that file reload the config by difference (see :mod:`broker.reload`).
    """
    clock = SystemClock()
    metrics = Metrics()

    async with contextlib.AsyncExitStack() as stack:
        if config.dev_issuer is not None:
            from broker import devissuer

            issuer_server = await devissuer.start(config.dev_issuer)
            stack.push_async_callback(issuer_server.close)

        session = await stack.enter_async_context(client_session())
        issuer = IssuerClient(
            session,
            observe_skew=skew_observer(metrics),
            observe_status=metrics.upstream_response,
        )
        registry = Registry(
            config,
            issuer_fetch(issuer, config),
            clock=clock,
            metrics=metrics,
            bind=partial(issuer_fetch, issuer),
        )
        scoped = ScopedTokens(builder(registry, issuer, clock, metrics), clock)
        reloader = _reloader(source, registry, metrics, clock, scoped)
        metrics.track(
            lambda: [(r.name, r.servable() is not None) for r in registry],
            lambda: len(scoped),
        )
        # Unwound in reverse: listeners drain first, while the clients (and
        # an embedded issuer) still run to answer requests in flight.
        stack.push_async_callback(registry.stop)
        stack.callback(scoped.close)
        audit = Audit(config.audit_interval, clock.wall) if config.audit else None
        if audit is not None:
            # Registered before the listeners, so unwound after they drained:
            # the last round counts the hand-outs of the drain too.
            flusher = asyncio.create_task(audit.run(), name="audit")
            stack.push_async_callback(_cancelled, flusher)
        listeners = Listeners()
        stack.push_async_callback(_close_listeners, listeners, config)
        apis = partial(
            api.create_app,
            registry,
            metrics,
            clock,
            scoped=scoped,
            stop=stop,
            audit=audit,
            limiter=_limiter(config, clock),
        )
        await _listen(config, metrics, registry, apis, listeners)

        registry.start()
        background = [asyncio.create_task(clock.watch_suspend(), name="suspend")]
        if config.exit_when_file_exists is not None:
            background.append(
                asyncio.create_task(
                    _exit_when_file_exists(config.exit_when_file_exists, stop)
                )
            )
        for task in background:
            stack.callback(task.cancel)
        if reloader is not None:
            # Ended first, so no reload runs while the clients stop.
            watch = asyncio.create_task(reloader.run(), name="reload")
            stack.push_async_callback(_cancelled, watch)

        if os.geteuid() == 0:
            # Nothing here needs root; a bug or a bad sink path would then
            # act with every privilege on the machine.
            log.warning("broker.running_as_root", hint="run as an unprivileged user")
        log.info(
            "broker.started",
            version=__version__,
            pid=os.getpid(),
            http=listeners.http,
            unix=listeners.unix,
            metrics=listeners.metrics,
            clients=sorted(config.clients),
        )
        await stop.wait()
        drain = config.listen.drain_timeout
        log.info("broker.stopping", drain_timeout=drain)
        # Callers still waiting for a first token are answered (503) a little
        # before the drain deadline, rather than cut off by it.
        asyncio.get_running_loop().call_later(
            max(0.0, drain - min(1.0, drain / 5)), registry.give_up.set
        )

    log.info("broker.stopped")


def _reloader(
    source: Source | None,
    registry: Registry,
    metrics: Metrics,
    clock: SystemClock,
    scoped: ScopedTokens,
) -> Reloader | None:
    """Reload on SIGHUP and on a change of the file, when the file is known."""
    if source is None:
        return None

    reloader = Reloader(registry, metrics, source, clock=clock, forget=scoped.drop)
    # Handled from here on: SIGHUP's default action would end the process.
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reloader.request)

    return reloader


async def _cancelled(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def _exit_when_file_exists(path: str, stop: asyncio.Event) -> None:
    """Stop the broker once ``path`` exists (a Job's main container is done).

    A classic sidecar cannot see its neighbour exit; a file on a shared
    volume is the usual signal. Checked every second: an exit a second late
    costs nothing, and no portable notification covers every volume type.
    """
    # A stat on a network volume can block: keep it off the event loop.
    while not await asyncio.to_thread(os.path.exists, path):  # noqa: ASYNC110
        await asyncio.sleep(EXIT_FILE_CHECK_EVERY)

    log.info("broker.exit_file_seen", path=path)
    stop.set()


def _limiter(config: Config, clock: SystemClock) -> RateLimiter | None:
    limits = config.listen.limits
    if limits.rate is None:
        return None
    return RateLimiter(limits.rate, limits.burst, clock.now)


async def _listen(
    config: Config,
    metrics: Metrics,
    registry: Registry,
    apis: Callable[..., web.Application],
    listeners: Listeners,
) -> None:
    listen = config.listen
    limits = listen.limits
    raise_descriptor_limit(limits.connections * 3 + 64)

    async def runner_for(app: web.Application, listener: str) -> web.AppRunner:
        bad = partial(metrics.refusal, listener, "bad_request")
        runner = web.AppRunner(
            app,
            shutdown_timeout=listen.drain_timeout,
            **runner_options(limits, listener, bad),
        )
        await runner.setup()
        listeners.runners.append(runner)
        return runner

    def gate(listener: str) -> Gate:
        metrics.add_listener(listener)
        return Gate(limits.connections, partial(_too_many, metrics, listener))

    if listen.http is not None:
        runner = await runner_for(apis(listener="tcp"), "tcp")
        http = listen.http
        await GatedTCPSite(runner, http.host, http.port, gate("tcp")).start()
        listeners.http = _bound(runner)
    if listen.unix is not None:
        sock, identity = unixsock.bind(
            listen.unix, listen.unix_mode, listen.unix_group, listen.unix_shared_dir
        )
        listeners.socket_identity = identity
        listeners.unix = listen.unix
        runner = await runner_for(apis(listener="unix"), "unix")
        await GatedSockSite(runner, sock, gate("unix")).start()
    if listen.metrics is not None:
        runner = await runner_for(metrics_app.create_app(registry, metrics), "metrics")
        address = listen.metrics
        await GatedTCPSite(runner, address.host, address.port, gate("metrics")).start()
        listeners.metrics = _bound(runner)


def _too_many(metrics: Metrics, listener: str) -> None:
    # No log line per connection: a flood would flood the log too.
    metrics.refusal(listener, "too_many_connections")


def _bound(runner: web.AppRunner) -> str:
    """The addresses a runner's TCP site bound, port 0 resolved.

    ``localhost`` may bind both 127.0.0.1 and ::1; all are listed.
    """
    shown = []
    for address in runner.addresses:
        host, port = address[:2]
        shown.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    return ",".join(shown)


async def _close_listeners(listeners: Listeners, config: Config) -> None:
    """Stop accepting, let requests in flight finish, remove the socket."""
    try:
        await asyncio.gather(*(runner.cleanup() for runner in listeners.runners))
    finally:
        if config.listen.unix and listeners.socket_identity:
            unixsock.remove(config.listen.unix, listeners.socket_identity)


def install_signals(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """SIGTERM / SIGINT ask for a graceful stop; a second one exits at once."""

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("broker.forced_exit", signal=signal.Signals(signum).name)
            os._exit(1)
        log.info("broker.signal", signal=signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
