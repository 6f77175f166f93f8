"""Connection and request bounds of a real broker: ``listen.limits``.

The broker runs as a process (``token-broker serve``) with the embedded dev
issuer, and the tests talk to it over raw sockets, since the point is what
happens to connections that a well-behaved HTTP client would never make.
"""

from __future__ import annotations

import asyncio
import resource
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from broker.limits import raise_descriptor_limit
from tests.wire import (
    Launch,
    Running,
    assert_too_many,
    closed_by_peer,
    read_answer,
    release,
    request,
    start,
)


@pytest.fixture
async def launch(workdir: Path) -> AsyncIterator[Launch]:
    """Start brokers with given limits; close what the test left open."""
    started: list[Running] = []

    async def launch(limits: str) -> Running:
        running = await start(workdir, limits)
        started.append(running)
        return running

    yield launch

    for running in started:
        await running.hang_up()


@pytest.mark.parametrize("listener", ["tcp", "unix"])
async def test_connections_past_the_cap_get_a_503_and_are_closed(
    launch: Launch, listener: str
) -> None:
    """With connections: 5 held open, a sixth is answered 503
    too_many_connections and closed, and counted; once they go, requests
    are served again."""
    broker = await launch("{connections: 5}")
    held = [await broker.open(listener) for _ in range(5)]

    reader, _ = await broker.open(listener)
    assert_too_many(*await read_answer(reader))
    assert await closed_by_peer(reader) == b""
    assert await broker.refused(listener) == 1
    other = "unix" if listener == "tcp" else "tcp"
    assert await broker.refused(other) == 0
    assert await broker.token(other) == 200

    await release(held)
    assert await broker.token(listener) == 200
    assert await broker.refused(listener) == 1
    assert await broker.broker.stop() == 0


IDLE = "{idle_timeout: 1s}"


def assert_about_the_idle_timeout(elapsed: float) -> None:
    # The timer starts when the broker accepts, a hair after our clock did.
    assert 0.8 <= elapsed < 4.0, elapsed


async def test_a_slow_sender_is_cut_off_at_the_idle_timeout(launch: Launch) -> None:
    """A client trickling a request a byte every 0.2 s is closed about 1 s
    (idle_timeout) after it connected, however busy it keeps the line."""
    broker = await launch(IDLE)
    loop = asyncio.get_running_loop()
    reader, writer = await broker.open("tcp")
    opened = loop.time()
    sent = 0

    async def trickle() -> None:
        nonlocal sent
        # About 12 s worth of bytes: the request could never complete in time.
        for byte in request("/v1/tokens/chat", extra=b"X-Pad: " + b"p" * 20 + b"\r\n"):
            writer.write(bytes([byte]))
            await writer.drain()
            sent += 1
            await asyncio.sleep(0.2)

    trickler = asyncio.create_task(trickle())
    try:
        rest = await closed_by_peer(reader)
        elapsed = loop.time() - opened
    finally:
        trickler.cancel()
        await asyncio.gather(trickler, return_exceptions=True)
        writer.close()

    assert rest == b""
    assert_about_the_idle_timeout(elapsed)
    assert sent >= 3
    assert await broker.token("tcp") == 200


async def test_a_silent_connection_is_closed_at_the_idle_timeout(
    launch: Launch,
) -> None:
    """A connection that never sends a byte is closed after idle_timeout."""
    broker = await launch(IDLE)
    loop = asyncio.get_running_loop()

    reader, writer = await broker.open("tcp")
    opened = loop.time()
    rest = await closed_by_peer(reader)
    elapsed = loop.time() - opened
    writer.close()

    assert rest == b""
    assert_about_the_idle_timeout(elapsed)


async def test_an_idle_keep_alive_is_closed_after_its_last_answer(
    launch: Launch,
) -> None:
    """A keep-alive connection serves request after request, and is closed
    idle_timeout after its last answer."""
    broker = await launch(IDLE)
    loop = asyncio.get_running_loop()
    reader, writer = await broker.open("tcp")

    statuses = []
    for _ in range(2):
        writer.write(request("/v1/tokens/chat?format=raw", close=False))
        status, headers, _ = await read_answer(reader)
        statuses.append((status, headers.get("connection", "keep-alive")))
    answered = loop.time()
    rest = await closed_by_peer(reader)
    elapsed = loop.time() - answered
    writer.close()

    assert statuses == [(200, "keep-alive")] * 2
    assert rest == b""
    assert_about_the_idle_timeout(elapsed)


OVERSIZED = {
    "header_line": request("/healthz", extra=b"X-Long: " + b"a" * 1500 + b"\r\n"),
    "request_line": request("/healthz?pad=" + "b" * 1500),
    "header_count": request(
        "/healthz", extra=b"".join(b"X-H%d: 1\r\n" % n for n in range(40))
    ),
}


@pytest.mark.parametrize("case", sorted(OVERSIZED))
async def test_requests_past_the_header_limits_get_a_4xx(
    launch: Launch, case: str
) -> None:
    """A header or request line longer than header_bytes, or more header
    lines than headers, is refused with a 4xx; the broker keeps serving."""
    broker = await launch("{header_bytes: 1024, headers: 8}")
    assert await broker.token("tcp") == 200

    reader, writer = await broker.open("tcp")
    writer.write(OVERSIZED[case])
    status, _, _ = await read_answer(reader)
    writer.close()

    assert 400 <= status < 500, status
    assert await broker.token("tcp") == 200
    assert await broker.token("unix") == 200


async def test_a_malformed_request_is_counted_and_never_logged(
    launch: Launch,
) -> None:
    """aiohttp's report of a request it cannot parse quotes the raw headers
    (a caller key among them): it is dropped, and counted as bad_request."""
    broker = await launch("{header_bytes: 1024}")
    key = b"Odd!Caller#Key-QQQQ7777\r"
    reader, writer = await broker.open("tcp")
    writer.write(
        request(
            "/v1/tokens/chat",
            extra=b"Authorization: Bearer "
            + key
            + b"\r\nX-Pad: "
            + b"a" * 1500
            + b"\r\n",
        )
    )
    status, _, _ = await read_answer(reader)
    writer.close()

    assert status == 400
    assert await broker.refused("tcp", "bad_request") == 1
    assert await broker.broker.stop() == 0
    output = broker.broker.output()
    assert "Odd!Caller" not in output
    assert "Error handling request" not in output


def test_the_soft_descriptor_limit_is_lifted_to_the_hard_one() -> None:
    """raise_descriptor_limit lifts a low soft limit to the hard limit, and
    says nothing when that is enough."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard != resource.RLIM_INFINITY, "an unlimited hard limit: untestable"
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        with capture_logs() as logs:
            lifted = raise_descriptor_limit(min(hard, 1024))
        now = resource.getrlimit(resource.RLIMIT_NOFILE)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    assert lifted == hard
    assert now == (hard, hard)
    assert logs == []


def test_a_hard_limit_below_the_wanted_count_is_logged() -> None:
    """When even the hard limit is short of what the caps need, the broker
    logs broker.descriptor_limit_low with both numbers."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard != resource.RLIM_INFINITY, "an unlimited hard limit: untestable"
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        with capture_logs() as logs:
            lifted = raise_descriptor_limit(hard + 1)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    assert lifted == hard
    [event] = logs
    assert event["event"] == "broker.descriptor_limit_low"
    assert event["log_level"] == "warning"
    assert (event["limit"], event["wanted"]) == (hard, hard + 1)


def limits_of(pid: int) -> tuple[int, int]:
    """A process's open-files limits, read from /proc."""
    with open(f"/proc/{pid}/limits") as limits:
        for line in limits:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
    raise AssertionError("no open-files line")


async def test_a_started_broker_lifts_its_own_soft_limit(workdir: Path) -> None:
    """A broker started with a low soft open-files limit runs with its hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard != resource.RLIM_INFINITY, "an unlimited hard limit: untestable"
    # The broker inherits the limits this process has when it is spawned.
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 1000), hard))
    try:
        broker = await start(workdir, "{connections: 16}")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    assert limits_of(broker.pid) == (hard, hard)
    events = {e["event"] for e in broker.broker.events}
    assert "broker.descriptor_limit_low" not in events
    assert await broker.broker.stop() == 0
