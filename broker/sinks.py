"""Token files (sinks) and the ``on_refresh`` command run after they change.

Every new token is written to each of the client's files (see
:mod:`broker.sinkfile` for how a file is replaced atomically). The command
then runs if every file was written, in its own process group, with the
token neither in its arguments nor in its environment. At most one run per
client is under way; new tokens arriving during a run ask for one more run
after it, however many they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import IO

import structlog

from broker.config import Client, Sink
from broker.metrics import Metrics
from broker.sinkfile import SinkError, check_sinks, render, why, write_sink
from broker.token import Token

__all__ = ["ClientSinks", "SinkError", "SinkWriter", "check_sinks"]

log = structlog.get_logger("broker.sinks")

HOOK_TIMEOUT = 30.0
# After a failed write, try again this soon, then twice as late each time.
SINK_RETRY_FIRST = 5.0
SINK_RETRY_MAX = 300.0
# The end of a failed command's output goes into the log line.
HOOK_OUTPUT_TAIL = 2000
# A command inherits only these: the rest of the broker's environment may
# hold client secrets (``client_secret: {env: NAME}``).
HOOK_ENV_KEEP = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TZ", "TMPDIR")


def _write_all(sinks: tuple[Sink, ...], token: Token, wall: float) -> list[str | None]:
    """Write every sink; return each one's error message, ``None`` if written."""
    errors: list[str | None] = []
    for sink in sinks:
        try:
            write_sink(sink, render(sink, token, wall))
        except SinkError as exc:
            errors.append(exc.message)
        except OSError as exc:
            errors.append(f"cannot write {sink.path}: {why(exc)}")
        else:
            errors.append(None)

    return errors


class ClientSinks:
    """One client's token files and command; awaited with each new token."""

    def __init__(
        self,
        name: str,
        spec: Client,
        writer: SinkWriter,
    ) -> None:
        self.name = name
        self.sinks = spec.sinks
        self.command = spec.on_refresh
        self.required = spec.required
        # The last write's failures ("; "-joined), None once all succeeded.
        self.error: str | None = None
        # Why the last on_refresh run failed, None after a success.
        self.hook_error: str | None = None
        self._writer = writer
        self._expires_iso = ""
        self._hook: asyncio.Task[None] | None = None
        self._again = False
        self._latest: Token | None = None
        self._retry: asyncio.Task[None] | None = None
        self._retry_in = SINK_RETRY_FIRST

    async def __call__(self, token: Token) -> None:
        """Write every file, then start (or queue) the on_refresh command."""
        writer = self._writer
        self._latest = token
        errors = await asyncio.to_thread(_write_all, self.sinks, token, writer.wall())
        self._record(errors)
        self._schedule_retry(token)

        if self.command is None:
            return
        if self.error is not None:
            writer.metrics.hook_ran(self.name, "skipped")
            log.warning("sink.hook_skipped", client=self.name, reason="sink failed")
            return
        self._expires_iso = token.expires_iso
        if self._hook is not None and not self._hook.done():
            self._again = True
            log.debug("sink.hook_queued", client=self.name)
            return
        self._hook = asyncio.create_task(
            self._hook_loop(), name=f"on-refresh-{self.name}"
        )
        writer.track(self._hook)

    def _record(self, errors: list[str | None]) -> None:
        failed = []
        for sink, error in zip(self.sinks, errors, strict=True):
            self._writer.metrics.sink_written(self.name, error is None)
            fields = {"client": self.name, "path": sink.path, "format": sink.format}
            if error is None:
                log.debug("sink.written", **fields)
            else:
                failed.append(error)
                log.warning("sink.write_failed", error=error, **fields)

        self.error = "; ".join(failed) or None

    def _schedule_retry(self, token: Token) -> None:
        """Write again later after a failure (a directory fixed, a disk freed).

        Otherwise a failed file would wait for the next refresh, most of a
        token's lifetime, with readiness failing all along. The waits double
        up to :data:`SINK_RETRY_MAX`; a newer token takes the retry over.
        """
        if self.error is None:
            self._retry_in = SINK_RETRY_FIRST
            return
        if self._retry is not None and not self._retry.done():
            return

        async def retry() -> None:
            await asyncio.sleep(self._retry_in)
            self._retry_in = min(self._retry_in * 2, SINK_RETRY_MAX)
            self._retry = None  # so a failure again schedules the next one
            current = self._latest
            if current is not None and current.expires_wall > self._writer.wall():
                log.info("sink.retrying", client=self.name)
                await self(current)

        self._retry = asyncio.create_task(retry(), name=f"sink-retry-{self.name}")

    @property
    def pending_retry(self) -> asyncio.Task[None] | None:
        """The scheduled retry of a failed write, if one is pending."""
        retry = self._retry
        return retry if retry is not None and not retry.done() else None

    def cancel_retry(self) -> None:
        """Stop a pending retry (the client was removed, or shutdown)."""
        if self._retry is not None:
            self._retry.cancel()

    async def _hook_loop(self) -> None:
        while True:
            self._again = False
            try:
                await self._run_hook()
            except Exception:
                # A bug here must not leave an unretrieved task error behind.
                log.exception("sink.hook_crashed", client=self.name)
            if not self._again:
                return

    async def _run_hook(self) -> None:
        assert self.command is not None
        writer = self._writer
        started = time.monotonic()
        # A file, not a pipe: a daemon the command leaves behind may keep
        # its output open, and a pipe would then never reach its end.
        with tempfile.TemporaryFile() as output:
            try:
                process = await asyncio.create_subprocess_exec(
                    *self.command,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=output,
                    stderr=asyncio.subprocess.STDOUT,
                    env=self._environment(),
                    start_new_session=True,
                )
            except OSError as exc:
                reason = f"cannot start {self.command[0]}: {why(exc)}"
                self._hook_done("failure", None, started, reason, "")
                return

            try:
                async with asyncio.timeout(writer.hook_timeout):
                    code = await process.wait()
            except TimeoutError:
                await _kill(process)
                reason = f"still running after {writer.hook_timeout:g}s; killed"
                self._hook_done("timeout", None, started, reason, _tail(output))
                return
            except asyncio.CancelledError:
                await _kill(process)
                raise

            if code == 0:
                self._hook_done("success", code, started, None, "")
            else:
                reason = f"exited with status {code}"
                self._hook_done("failure", code, started, reason, _tail(output))

    def _environment(self) -> dict[str, str]:
        return {
            **self._writer.environ,
            "TOKEN_BROKER_CLIENT": self.name,
            "TOKEN_BROKER_SINKS": os.pathsep.join(sink.path for sink in self.sinks),
            "TOKEN_BROKER_EXPIRES_AT": self._expires_iso,
        }

    def _hook_done(
        self,
        result: str,
        code: int | None,
        started: float,
        reason: str | None,
        output: str,
    ) -> None:
        self.hook_error = reason
        self._writer.metrics.hook_ran(self.name, result)
        fields = {
            "client": self.name,
            "command": self.command[0] if self.command else "",
            "exit_code": code,
            "duration": round(time.monotonic() - started, 3),
        }
        if reason is None:
            log.info("sink.hook_finished", **fields)
        else:
            log.warning(
                "sink.hook_failed",
                result=result,
                reason=reason,
                output=output,
                **fields,
            )


async def _kill(process: asyncio.subprocess.Process) -> None:
    """Kill the command and everything it started, and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    await process.wait()


def _tail(output: IO[bytes]) -> str:
    output.seek(0, os.SEEK_END)
    output.seek(max(0, output.tell() - HOOK_OUTPUT_TAIL))
    return output.read().decode(errors="replace").strip()


class SinkWriter:
    """Every client's token files: write them, run hooks, report health."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        hook_timeout: float = HOOK_TIMEOUT,
        environ: Mapping[str, str] | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.metrics = metrics
        self.hook_timeout = hook_timeout
        source = os.environ if environ is None else environ
        self.environ = {key: source[key] for key in HOOK_ENV_KEEP if key in source}
        self.wall = wall
        self._clients: dict[str, ClientSinks] = {}
        self._hooks: set[asyncio.Task[None]] = set()

    def hook(self, name: str, spec: Client) -> ClientSinks | None:
        """The ``on_token`` callback for client ``name``, ``None`` if it has
        neither sinks nor on_refresh. Replaces an earlier one of that name."""
        if not spec.sinks and spec.on_refresh is None:
            self.forget(name)
            return None

        earlier = self._clients.get(name)
        if earlier is not None:
            earlier.cancel_retry()
        sinks = ClientSinks(name, spec, self)
        self._clients[name] = sinks
        self.metrics.add_sinks(name, hook=spec.on_refresh is not None)

        return sinks

    def client(self, name: str) -> ClientSinks | None:
        """The token files of ``name``, if it has any."""
        return self._clients.get(name)

    def forget(self, name: str) -> None:
        """Stop reporting a removed client (its files stay as they are)."""
        sinks = self._clients.pop(name, None)
        if sinks is not None:
            sinks.cancel_retry()
            self.metrics.remove_sinks(name)

    def failing(self) -> list[str]:
        """Required clients whose last write left a sink unwritten, sorted."""
        return sorted(
            name
            for name, sinks in self._clients.items()
            if sinks.required and sinks.error is not None
        )

    def errors(self) -> dict[str, str]:
        """Every client whose last write failed, with the reason."""
        return {
            name: sinks.error
            for name, sinks in self._clients.items()
            if sinks.error is not None
        }

    def track(self, task: asyncio.Task[None]) -> None:
        """Hold a running command until it ends (for :meth:`idle`, :meth:`close`)."""
        self._hooks.add(task)
        task.add_done_callback(self._hooks.discard)

    async def idle(self) -> None:
        """Wait until no on_refresh command is running or queued."""
        while self._hooks:
            await asyncio.wait(set(self._hooks))

    async def close(self) -> None:
        """Kill running commands and wait for them (at shutdown)."""
        for sinks in self._clients.values():
            sinks.cancel_retry()
        for task in self._hooks:
            task.cancel()
        await asyncio.gather(*self._hooks, return_exceptions=True)
