"""A broker process with given limits, talked to over raw sockets.

For tests about what happens to connections that a well-behaved HTTP client
would never make: held open, trickled, oversized, by the thousand.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests import process

SECRET = "limits-secret-Hy62mPq"
GUARD = b"Host: 127.0.0.1\r\nToken-Broker: 1\r\n"
# A bound on every wait for the broker, so a hang fails instead of blocking.
DEADLINE = 10.0
MANY = 10_000
BATCH = 250
RSS_BOUND_KIB = 1024 * 1024

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def write_config(workdir: Path, issuer_port: int, limits: str) -> Path:
    """A broker on port 0 and a socket, with ``limits`` as listen.limits."""
    (workdir / "secret").write_text(SECRET + "\n")
    config = workdir / "broker.yaml"
    config.write_text(
        f"""
listen:
  http: 127.0.0.1:0
  unix: {workdir}/b.sock
  metrics: 127.0.0.1:0
  limits: {limits}
environments:
  dev: {{token_url: "http://127.0.0.1:{issuer_port}/oauth2/token"}}
clients:
  chat: {{environment: dev, client_id: lim, client_secret: {{file: secret}}}}
dev_issuer:
  listen: 127.0.0.1:{issuer_port}
  clients:
    lim: {{secret: {SECRET}}}
"""
    )
    return config


@dataclass
class Running:
    """A started broker and where it listens."""

    broker: process.Broker
    host: str
    port: int
    socket: str
    metrics: str
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    @property
    def pid(self) -> int:
        """The broker's process id."""
        return self.broker.process.pid

    async def open(self, listener: str) -> Streams:
        """A new connection to the token API over ``listener``."""
        if listener == "unix":
            streams = await asyncio.open_unix_connection(self.socket)
        else:
            streams = await asyncio.open_connection(self.host, self.port)
        self.writers.append(streams[1])

        return streams

    async def hang_up(self) -> None:
        """Close every connection :meth:`open` made, whatever state it is in."""
        for writer in self.writers:
            writer.close()
        await asyncio.gather(
            *(writer.wait_closed() for writer in self.writers), return_exceptions=True
        )
        self.writers.clear()

    async def token(self, listener: str) -> int:
        """Ask for a token on a new connection; the answer's status."""
        reader, writer = await self.open(listener)
        try:
            writer.write(request("/v1/tokens/chat?format=raw"))
            status, _, body = await read_answer(reader)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        if status == 200:
            assert body.startswith(b"ey")
        return status

    async def refused(
        self, listener: str, reason: str = "too_many_connections"
    ) -> float:
        """The broker's count of refusals for ``reason`` on ``listener``."""
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://{self.metrics}/metrics") as answer,
        ):
            assert answer.status == 200
            text = await answer.text()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "token_broker_requests_refused_total" and (
                    sample.labels == {"listener": listener, "reason": reason}
                ):
                    return sample.value
        raise AssertionError(f"no refusal series for {listener}")


Launch = Callable[[str], Awaitable[Running]]


async def start(workdir: Path, limits: str) -> Running:
    """Start a broker with ``limits`` and wait until it serves."""
    config = write_config(workdir, process.free_port(), limits)
    broker = await process.start(config)
    started = broker.started()
    host, _, port = started["http"].rpartition(":")

    return Running(broker, host, int(port), started["unix"], started["metrics"])


def request(path: str, *, extra: bytes = b"", close: bool = True) -> bytes:
    """A raw GET that passes the TCP guard (and is harmless on the socket)."""
    connection = b"Connection: close\r\n" if close else b""
    line = b"GET %s HTTP/1.1\r\n" % path.encode()

    return b"".join([line, GUARD, connection, extra, b"\r\n"])


async def read_answer(
    reader: asyncio.StreamReader,
) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP answer: status, headers (lower-case names), body."""
    async with asyncio.timeout(DEADLINE):
        head = await reader.readuntil(b"\r\n\r\n")
        status, headers = parse_head(head)
        body = await reader.readexactly(int(headers.get("content-length", "0")))

    return status, headers, body


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    """The status and the headers (lower-case names) of an answer's head."""
    status_line, *lines = head.decode("latin-1").strip().split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()

    return int(status_line.split(" ")[1]), headers


async def closed_by_peer(reader: asyncio.StreamReader) -> bytes:
    """Everything the broker still sends until it closes the connection."""
    async with asyncio.timeout(DEADLINE):
        try:
            return await reader.read()
        except ConnectionResetError:
            return b""


async def release(held: list[Streams]) -> None:
    """Close connections and wait until the broker has closed its ends too."""
    for _, writer in held:
        writer.write_eof()
    for reader, writer in held:
        assert await closed_by_peer(reader) == b""
        writer.close()


def assert_too_many(status: int, headers: dict[str, str], body: bytes) -> None:
    """The answer to a connection past the cap: a JSON 503, then a close."""
    assert status == 503
    assert headers["connection"] == "close"
    assert headers["content-type"] == "application/json"
    assert headers["retry-after"] == "1"
    assert json.loads(body)["error"] == "too_many_connections"
