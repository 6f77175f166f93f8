"""npm ``oidc-provider`` as a real third-party issuer, run by ``node``.

``tests/peer/server.mjs`` wraps it; ``npm ci --prefix tests/peer`` installs
the pinned version. A missing ``node`` or ``node_modules`` fails the tests
with that instruction: the peer is part of the suite, never skipped.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt

HERE = Path(__file__).parent / "peer"
SERVER = HERE / "server.mjs"
INSTALL = "npm ci --prefix tests/peer"
STARTUP_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


class PeerUnavailable(RuntimeError):
    """The peer cannot run here; the message says what to install."""


@dataclass
class Peer:
    """A running oidc-provider process and where it listens."""

    process: subprocess.Popen[bytes]
    issuer: str
    log_path: Path

    @property
    def token_url(self) -> str:
        """Its token endpoint."""
        return self.issuer + "/token"

    def log(self) -> str:
        """Everything it wrote on stderr so far (warnings, refusals)."""
        return self.log_path.read_text(errors="replace")

    async def requests(self, client_id: str) -> list[dict[str, Any]]:
        """What it recorded of every token request naming ``client_id``."""
        async with (
            aiohttp.ClientSession() as session,
            session.get(self.issuer + "/_test/requests") as answer,
        ):
            answer.raise_for_status()
            seen: list[dict[str, Any]] = await answer.json()

        return [entry for entry in seen if entry["client_id"] == client_id]

    async def key_set(self) -> jwt.PyJWKSet:
        """Its signing keys, from the JWKS it publishes."""
        async with (
            aiohttp.ClientSession() as session,
            session.get(self.issuer + "/jwks") as answer,
        ):
            answer.raise_for_status()
            return jwt.PyJWKSet.from_dict(await answer.json())

    def stop(self) -> int:
        """Stop it by its PID (SIGTERM, then SIGKILL); return its exit code."""
        return _stop(self.process)


def check_installed() -> str:
    """Return the ``node`` executable; raise :class:`PeerUnavailable` if unusable."""
    node = shutil.which("node")
    if node is None:
        raise PeerUnavailable(f"node is not installed; install Node.js, then {INSTALL}")

    wanted = json.loads((HERE / "package.json").read_text())["dependencies"]
    for name, version in wanted.items():
        manifest = HERE / "node_modules" / name / "package.json"
        if not manifest.is_file():
            raise PeerUnavailable(f"{name} is not installed: run `{INSTALL}`")
        found = json.loads(manifest.read_text())["version"]
        if found != version:
            raise PeerUnavailable(
                f"{name} {found} is installed, the tests pin {version}: run `{INSTALL}`"
            )

    return node


def start(config: dict[str, Any], workdir: Path) -> Peer:
    """Start the peer with ``config`` (see server.mjs) and wait until it listens.

    Raises :class:`PeerUnavailable` when node or the package is missing and
    ``RuntimeError`` when it exits or stays silent for
    :data:`STARTUP_TIMEOUT` seconds.
    """
    node = check_installed()
    config_path = workdir / "peer.json"
    config_path.write_text(json.dumps(config))
    log_path = workdir / "peer.log"

    with log_path.open("wb") as log:
        # Its stdin stays open while the test runs: when this process dies
        # the pipe closes and the peer exits on its own.
        process = subprocess.Popen(
            [node, str(SERVER), str(config_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
        )

    try:
        ready = _first_line(process, STARTUP_TIMEOUT)
    except RuntimeError as exc:
        _stop(process)
        said = log_path.read_text(errors="replace")
        raise RuntimeError(f"{exc}; its stderr:\n{said}") from None
    except BaseException:
        _stop(process)
        raise

    return Peer(process, ready["issuer"], log_path)


def _stop(process: subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        process.terminate()
    try:
        code = process.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        code = process.wait()
    for pipe in (process.stdin, process.stdout):
        if pipe is not None:
            pipe.close()

    return code


def _first_line(process: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    """Read stdout until the ``peer.listening`` line, woken by the selector."""
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    pending = b""

    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while b"\n" not in pending:
            left = deadline - time.monotonic()
            if left <= 0 or not selector.select(left):
                raise RuntimeError(f"the peer did not start within {timeout:g}s")
            chunk = os.read(process.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError(f"the peer exited with code {process.wait()}")
            pending += chunk

    line = json.loads(pending.split(b"\n", 1)[0])
    if not isinstance(line, dict) or line.get("event") != "peer.listening":
        raise RuntimeError(f"the peer said {line!r} instead of peer.listening")

    return line
