"""Run ``token-broker`` as a real subprocess, the way users start it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STARTUP_TIMEOUT = 20.0

# Every process started here, so a failing test cannot leave one running.
STARTED: list[asyncio.subprocess.Process] = []


def program() -> list[str]:
    """The installed console script beside this Python, else ``-m broker``."""
    script = Path(sys.executable).parent / "token-broker"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "broker"]


async def reap() -> None:
    """Kill whatever a test left running and wait for it."""
    while STARTED:
        process = STARTED.pop()
        if process.returncode is None:
            process.kill()
            await process.wait()


async def run_cli(*args: str) -> tuple[int, str, str]:
    """Run one ``token-broker`` command to its end: code, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        *program(),
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    STARTED.append(proc)
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def free_port() -> int:
    """A port that is free now, below the ephemeral range (see TOOLING)."""
    for _ in range(200):
        port = random.randint(20000, 32000)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found")


@dataclass
class Broker:
    """A running broker process and everything it printed."""

    process: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    _readers: list[asyncio.Task[None]] = field(default_factory=list)
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def started(self) -> dict[str, Any]:
        return next(e for e in self.events if e.get("event") == "broker.started")

    def output(self) -> str:
        return "\n".join(self.lines + self.stderr)

    async def wait_for_event(self, name: str, timeout: float = STARTUP_TIMEOUT) -> None:
        """Wait until the broker logs event ``name`` (woken per output line)."""
        async with asyncio.timeout(timeout):
            while not any(e.get("event") == name for e in self.events):
                if all(reader.done() for reader in self._readers):
                    raise AssertionError(f"broker exited early:\n{self.output()}")
                self._arrived.clear()
                await self._arrived.wait()

    async def stop(
        self, signum: int | None = signal.SIGTERM, timeout: float = 15.0
    ) -> int:
        """Send ``signum`` (unless ``None``), wait for the exit, return its code."""
        if signum is not None and self.process.returncode is None:
            self.process.send_signal(signum)
        async with asyncio.timeout(timeout):
            code = await self.process.wait()
        await asyncio.gather(*self._readers, return_exceptions=True)
        return code


async def _pump(stream: asyncio.StreamReader, sink: list[str], broker: Broker) -> None:
    try:
        while line := await stream.readline():
            text = line.decode(errors="replace").rstrip("\n")
            sink.append(text)
            if text.startswith("{"):
                with contextlib.suppress(ValueError):
                    broker.events.append(json.loads(text))
            broker._arrived.set()
    finally:
        broker._arrived.set()


async def start(
    config: Path,
    *args: str,
    env: dict[str, str] | None = None,
    command: str = "serve",
) -> Broker:
    """Start ``token-broker COMMAND -c config`` and wait until it is up."""
    process = await asyncio.create_subprocess_exec(
        *program(),
        command,
        "-c",
        str(config),
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    assert process.stdout is not None
    assert process.stderr is not None
    STARTED.append(process)
    broker = Broker(process)
    broker._readers = [
        asyncio.create_task(_pump(process.stdout, broker.lines, broker)),
        asyncio.create_task(_pump(process.stderr, broker.stderr, broker)),
    ]
    ready = "broker.started" if command == "serve" else "dev_issuer.started"
    try:
        await broker.wait_for_event(ready)
    except BaseException:
        if process.returncode is None:
            process.kill()
        await process.wait()
        raise
    return broker
