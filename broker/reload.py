"""Reload the config by difference, on SIGHUP and when its file changes.

:func:`diff` sorts the clients of two configs into kept, changed, added and
removed; :func:`restart_keys` names the changes a running process cannot
take. :class:`Reloader` reads the file again, has the registry apply it
(:meth:`broker.registry.Registry.apply`), and logs and counts the outcome.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TextIO

import structlog

from broker import logs
from broker.clock import Clock
from broker.config import Config, Listen
from broker.errors import ConfigError
from broker.loader import MAX_FILE_BYTES, load
from broker.metrics import Metrics

if TYPE_CHECKING:
    from broker.registry import Registry

Result = Literal["applied", "unchanged", "refused", "failed"]
Trigger = Literal["signal", "file"]

log = structlog.get_logger("broker.reload")


@dataclass(frozen=True)
class Plan:
    """Client names, in config order, by what a reload does to them."""

    kept: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()


@dataclass(frozen=True)
class ReloadResult:
    """What one reload did: the result, its plan, the keys that refused it."""

    result: Result
    plan: Plan = Plan()
    restart_keys: tuple[str, ...] = ()


_LIVE_LISTEN_KEYS = ("guard", "quit_callers")


def diff(old: Config, new: Config) -> Plan:
    """Sort the clients of ``old`` and ``new`` by what a reload must do.

    A client is kept only when its own settings, its environment's settings
    and its effective refresh policy are all equal. Config models compare
    by value: a secret by its value, a key or certificate by its path.
    """
    kept: list[str] = []
    changed: list[str] = []
    added: list[str] = []
    for name in new.clients:
        if name not in old.clients:
            added.append(name)
        elif _same_client(old, new, name):
            kept.append(name)
        else:
            changed.append(name)
    removed = [name for name in old.clients if name not in new.clients]

    return Plan(tuple(kept), tuple(changed), tuple(added), tuple(removed))


def _same_client(old: Config, new: Config, name: str) -> bool:
    # Callers are read per request: a change to them alone needs no new token.
    before = old.clients[name].model_copy(update={"callers": None})
    after = new.clients[name].model_copy(update={"callers": None})
    environment_before = old.environments[before.environment]
    environment_after = new.environments[after.environment]

    return (
        before == after
        and environment_before == environment_after
        and old.policy(name) == new.policy(name)
    )


def restart_keys(old: Config, new: Config) -> tuple[str, ...]:
    """The changed keys that only a restart can apply, as dotted key paths.

    The listeners are bound, the embedded issuer is serving, and the exit
    file and the audit run from the start; the rest of the file can be
    reloaded. The guard and quit_callers are read per request.
    """
    keys = [
        f"listen.{key}"
        for key in Listen.model_fields
        if key not in _LIVE_LISTEN_KEYS
        and getattr(old.listen, key) != getattr(new.listen, key)
    ]
    keys += [
        key
        for key in ("dev_issuer", "exit_when_file_exists", "audit", "audit_interval")
        if getattr(old, key) != getattr(new, key)
    ]

    return tuple(keys)


def access_changes(old: Config, new: Config) -> list[str]:
    """Who-may-take-what settings a reload changed, as key paths: they apply
    at once, and an operator must see that they did."""
    keys = [
        f"listen.{key}"
        for key in _LIVE_LISTEN_KEYS
        if getattr(old.listen, key) != getattr(new.listen, key)
    ]
    keys += [
        f"clients.{name}.callers"
        for name, spec in new.clients.items()
        if name in old.clients and old.clients[name].callers != spec.callers
    ]
    return keys


@dataclass(frozen=True)
class Source:
    """Where the running config came from, so a reload reads it the same way.

    ``environ`` interpolates ``${VAR}`` as at start; ``log_level`` is the
    ``--log-level`` override, which outlives reloads; ``log_stream`` is where
    the logs go (stdout when ``None``).
    """

    path: str
    environ: Mapping[str, str]
    log_level: str | None = None
    log_stream: TextIO | None = None


def file_digest(path: str) -> str:
    """Digest the file's content, reached through any symlinks on its path.

    An unreadable file digests to its error, so that a file gone missing is
    reported once rather than at every poll.
    """
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        return f"unreadable: errno {exc.errno}"

    return hashlib.sha256(data).hexdigest()


class Reloader:
    """Reload the config when asked (SIGHUP) or when its file's content changes.

    ``forget`` is called with each changed or removed client's name once a
    reload is applied, for what lives outside the registry (cached tokens
    of scope subsets).
    """

    def __init__(
        self,
        registry: Registry,
        metrics: Metrics,
        source: Source,
        *,
        clock: Clock,
        forget: Callable[[str], None] | None = None,
    ) -> None:
        self._registry = registry
        self._metrics = metrics
        self._source = source
        self._clock = clock
        self._forget = forget
        self._requested = asyncio.Event()
        self._digest = file_digest(source.path)

    def request(self) -> None:
        """Ask for a reload (the SIGHUP handler); requests made meanwhile merge."""
        self._requested.set()

    async def run(self) -> None:
        """Reload on every request and whenever the file's digest changes."""
        settling: str | None = None
        while True:
            requested = await self._next()
            if not requested:
                digest = file_digest(self._source.path)
                if digest == self._digest:
                    settling = None
                    continue
                # A file edited in place may be caught half-written; act only
                # on content that stayed the same for one whole interval.
                if digest != settling:
                    settling = digest
                    continue
            settling = None

            try:
                await self.reload("signal" if requested else "file")
            except Exception:
                # A bug in one reload must not end the watching.
                log.exception("config.reload_crashed", file=self._source.path)
                self._metrics.config_reloaded("failed")

    async def _next(self) -> bool:
        """Wait for a request or the next poll; return whether it was asked.

        A Kubernetes ConfigMap volume updates the file by swapping the
        ``..data`` symlink its path goes through: inotify watches the old
        inode and never sees it, and no portable notification covers it.
        So the content's digest is compared every ``watch_config`` seconds
        instead; reading a small file is cheap, and only a new digest reloads.
        """
        interval = self._registry.config.watch_config
        waiters: set[asyncio.Future[Any]] = {
            asyncio.ensure_future(self._requested.wait())
        }
        if interval is not None:
            waiters.add(asyncio.ensure_future(self._clock.sleep(interval)))
        try:
            await asyncio.wait(waiters, return_when="FIRST_COMPLETED")
        finally:
            for waiter in waiters:
                waiter.cancel()

        requested = self._requested.is_set()
        self._requested.clear()

        return requested

    async def reload(self, trigger: Trigger) -> ReloadResult:
        """Read the file again and apply it by difference; log and count it.

        An invalid file, or one changing a key that needs a restart, leaves
        everything as it was. Reloads must not overlap: :meth:`run` makes
        them one at a time.
        """
        path = self._source.path
        self._digest = file_digest(path)
        try:
            loaded = load(path, self._source.environ)
        except ConfigError as exc:
            self._metrics.config_reloaded("failed")
            log.error(
                "config.reload_failed",
                trigger=trigger,
                file=exc.file,
                key_path=exc.key_path,
                reason=exc.reason,
            )
            return ReloadResult("failed")

        before = self._registry.config
        result = await self._registry.apply(loaded.config)
        self._metrics.config_reloaded(result.result)
        if result.result == "refused":
            keys = ", ".join(result.restart_keys)
            log.error(
                "config.reload_refused",
                trigger=trigger,
                file=path,
                keys=list(result.restart_keys),
                reason=f"{keys} changed, which needs a restart; nothing was reloaded",
            )
            return result

        self._after(result.plan, loaded.warnings)
        log.info(
            "config.reloaded",
            trigger=trigger,
            file=path,
            result=result.result,
            kept=list(result.plan.kept),
            changed=list(result.plan.changed),
            added=list(result.plan.added),
            removed=list(result.plan.removed),
            access=access_changes(before, loaded.config),
        )
        if loaded.config.log != before.log:
            # After the line above, so the reload shows under the old settings.
            source = self._source
            level = source.log_level or loaded.config.log.level
            logs.configure(level, loaded.config.log.format, source.log_stream)

        return result

    def _after(self, plan: Plan, warnings: tuple[tuple[str, str], ...]) -> None:
        """Forget what outlived changed clients; warn as a start would."""
        if self._forget is not None:
            for name in (*plan.changed, *plan.removed):
                self._forget(name)

        fresh = {*plan.changed, *plan.added}
        for kind, client in warnings:
            if client in fresh:
                log.warning(f"config.{kind}", client=client, file=self._source.path)
