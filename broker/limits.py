"""Connection limits: a cap per listener, and enough descriptors to reach it.

aiohttp bounds header sizes and closes a connection that has not sent a
whole request within its keep-alive time of opening or of its last answer
(a slow client trickling headers included). What it does not bound is the
number of connections, each of which holds a descriptor and a parser: that
is done here, before aiohttp sees the connection.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import socket
from collections.abc import Callable
from typing import Any, cast

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from broker.config import Limits

log = structlog.get_logger("broker.limits")

_REFUSED = json.dumps(
    {
        "error": "too_many_connections",
        "message": "the broker holds as many connections as it allows; retry",
        "client": None,
    }
).encode()
_REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: application/json\r\n"
    b"Cache-Control: no-store\r\n"
    b"Retry-After: 1\r\n"
    b"Connection: close\r\n"
    b"Content-Length: " + str(len(_REFUSED)).encode() + b"\r\n\r\n" + _REFUSED
)


# How long an unread request body is drained after the answer, so the
# caller reads the answer rather than a reset; short, or a caller that
# promises a body and never sends it would hold the connection.
LINGER = 1.0


def runner_options(
    limits: Limits, listener: str, on_bad_request: Callable[[], None]
) -> dict[str, Any]:
    """aiohttp's per-connection bounds, from the ``listen.limits`` block.

    Requests aiohttp's parser rejects (400) are counted with
    ``on_bad_request`` and never logged: the traceback aiohttp writes for
    them quotes the raw request, headers (and caller keys) included.
    """
    logger = logging.getLogger(f"broker.http.{listener}")
    if not any(isinstance(f, _BadRequests) for f in logger.filters):
        logger.addFilter(_BadRequests(on_bad_request))
    return {
        "keepalive_timeout": limits.idle_timeout,
        "max_line_size": limits.header_bytes,
        "max_field_size": limits.header_bytes,
        "max_headers": limits.headers,
        "lingering_time": min(LINGER, limits.idle_timeout),
        "logger": logger,
    }


class _BadRequests(logging.Filter):
    """Drops aiohttp's reports of malformed requests, counting each one."""

    def __init__(self, on_bad_request: Callable[[], None]) -> None:
        super().__init__()
        self._count = on_bad_request

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            self._count()
            return False
        return True


class Gate:
    """Counts a listener's open connections and turns away those past ``cap``."""

    def __init__(self, cap: int, on_refused: Callable[[], None]) -> None:
        self.cap = cap
        self.open = 0
        self.refused = on_refused

    def protocol(self, make: Callable[[], asyncio.Protocol]) -> asyncio.Protocol:
        """A protocol that admits the connection or answers 503 and closes it."""
        return _Gated(self, make)


class _Gated(asyncio.Protocol):
    """Stands in front of aiohttp's protocol, which is made only if admitted."""

    def __init__(self, gate: Gate, make: Callable[[], asyncio.Protocol]) -> None:
        self._gate = gate
        self._make = make
        self._inner: asyncio.Protocol | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        gate = self._gate
        if gate.open >= gate.cap:
            # An answer the caller can read beats a reset it cannot explain.
            # (uvloop's transports are not asyncio's classes, but write alike.)
            writer = cast(asyncio.WriteTransport, transport)
            writer.write(_REFUSAL)
            writer.close()
            gate.refused()
            return

        gate.open += 1
        self._inner = self._make()
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._inner is not None:
            self._gate.open -= 1
            self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return None if self._inner is None else self._inner.eof_received()

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()


class GatedTCPSite(web.TCPSite):
    """A TCP site whose connections pass through a :class:`Gate`."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, gate: Gate):
        super().__init__(runner, host, port, backlog=512)
        self._gate = gate

    async def start(self) -> None:
        self._server = await _start(self, self._gate, host=self._host, port=self._port)


class GatedSockSite(web.SockSite):
    """A site on a ready socket (the Unix one) behind a :class:`Gate`."""

    def __init__(self, runner: web.AppRunner, sock: socket.socket, gate: Gate):
        super().__init__(runner, sock, backlog=512)
        self._gate = gate

    async def start(self) -> None:
        self._server = await _start(self, self._gate, sock=self._sock)


async def _start(site: web.BaseSite, gate: Gate, **where: Any) -> asyncio.Server:
    """What aiohttp's own sites do, with the gate in front of the protocol."""
    await web.BaseSite.start(site)
    server = site._runner.server
    assert server is not None

    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: gate.protocol(server), backlog=site._backlog, **where
    )


def raise_descriptor_limit(wanted: int) -> int:
    """Lift the soft limit on open files toward the hard one; return it.

    The usual soft default, 1024, is below one listener's connection cap.
    Raising it to the hard limit needs no privilege. A limit still short
    of ``wanted`` is logged: connections past it fail in accept().
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, wanted)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warning(
            "broker.descriptor_limit_low",
            limit=soft,
            wanted=wanted,
            hint="raise the open-files limit (ulimit -n) or lower listen.limits",
        )
    return soft
