"""Thousands of connections against a real broker: it keeps serving.

Bounded: 10,000 idle connections held, then released; 2,000 against the
default cap. Loopback only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from tests.wire import (
    BATCH,
    DEADLINE,
    MANY,
    RSS_BOUND_KIB,
    Running,
    assert_too_many,
    parse_head,
    request,
    start,
)


@pytest.fixture
def many_descriptors() -> Iterator[int]:
    """This process's soft open-files limit raised to its hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < MANY + 500:
        pytest.fail(
            f"the hard open-files limit is {hard}; this test needs {MANY + 500} "
            "(raise it with ulimit -Hn or the container's nofile limit)"
        )
    target = hard if hard != resource.RLIM_INFINITY else 65536
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    try:
        yield target
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@dataclass
class Crowd:
    """Plain sockets held open to the broker's TCP listener."""

    sockets: list[socket.socket]
    # Those the broker answered 503 (barriers past the cap among them).
    turned_away: set[socket.socket]


async def answer_of(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP answer from a plain non-blocking socket."""
    loop = asyncio.get_running_loop()
    data = b""
    async with asyncio.timeout(DEADLINE):
        while b"\r\n\r\n" not in data:
            chunk = await loop.sock_recv(sock, 65536)
            assert chunk, f"closed before an answer: {data!r}"
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status, headers = parse_head(head + b"\r\n\r\n")
        while len(body) < int(headers.get("content-length", "0")):
            body += await loop.sock_recv(sock, 65536)

    return status, headers, body


async def until_closed(sock: socket.socket) -> bytes:
    """All the broker sends on ``sock`` until it closes its end."""
    loop = asyncio.get_running_loop()
    data = b""
    async with asyncio.timeout(DEADLINE):
        while chunk := await loop.sock_recv(sock, 65536):
            data += chunk
    return data


@contextlib.asynccontextmanager
async def crowd(broker: Running, count: int) -> AsyncIterator[Crowd]:
    """Open ``count`` idle connections in batches, then close them all.

    After each batch a barrier connection asks for /healthz and stays open:
    the broker accepts in arrival order, so its answer means the whole
    batch was accepted, and the accept queue never overflows.
    """
    loop = asyncio.get_running_loop()
    held = Crowd([], set())
    try:
        for first in range(0, count, BATCH):
            batch = [_nonblocking() for _ in range(min(BATCH, count - first))]
            held.sockets.extend(batch)
            address = (broker.host, broker.port)
            async with asyncio.timeout(DEADLINE):
                await asyncio.gather(*(loop.sock_connect(s, address) for s in batch))
            barrier = _nonblocking()
            held.sockets.append(barrier)
            await loop.sock_connect(barrier, address)
            await loop.sock_sendall(barrier, request("/healthz", close=False))
            status, _, _ = await answer_of(barrier)
            if status == 503:
                held.turned_away.add(barrier)
            else:
                assert status == 200
        yield held
        await _hang_up(held)
    finally:
        for sock in held.sockets:
            sock.close()


def _nonblocking() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    return sock


async def _hang_up(held: Crowd) -> None:
    """Half-close every admitted socket and wait for the broker's close."""
    admitted = [s for s in held.sockets if s not in held.turned_away]
    for first in range(0, len(admitted), 1000):
        chunk = admitted[first : first + 1000]
        for sock in chunk:
            sock.shutdown(socket.SHUT_WR)
        closing = await asyncio.gather(*(until_closed(s) for s in chunk))
        assert set(closing) <= {b""}


def descriptors_of(pid: int) -> int:
    """How many descriptors process ``pid`` has open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    """The resident memory of process ``pid``, in KiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS line")


async def metrics_answer(broker: Running) -> int:
    """The status of a /metrics scrape."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://{broker.metrics}/metrics") as answer,
    ):
        await answer.read()
        return answer.status


async def test_ten_thousand_idle_connections(
    workdir: Path, many_descriptors: int
) -> None:
    """While 10,000 idle connections are held, the broker serves tokens on
    both listeners and metrics, in bounded memory; it serves on after they
    close, and gives their descriptors back."""
    broker = await start(workdir, "{connections: 12000, idle_timeout: 60s}")
    loop = asyncio.get_running_loop()
    began = loop.time()

    async with crowd(broker, MANY) as held:
        opened = loop.time() - began
        holding = descriptors_of(broker.pid)
        statuses = [await broker.token("tcp"), await broker.token("unix")]
        scraped = await metrics_answer(broker)
        refused = await broker.refused("tcp")
        rss = rss_kib(broker.pid)
        print(
            f"\n{len(held.sockets)} connections opened in {opened:.1f}s; broker "
            f"VmRSS {rss / 1024:.0f} MiB, {holding} descriptors"
        )
        assert broker.broker.process.returncode is None

    assert held.turned_away == set()
    assert holding >= MANY
    assert statuses == [200, 200]
    assert scraped == 200
    assert refused == 0
    assert rss < RSS_BOUND_KIB
    assert descriptors_of(broker.pid) < 1000
    assert await broker.token("tcp") == 200
    assert await broker.token("unix") == 200
    assert await broker.broker.stop() == 0


async def _answer_or_none(
    sock: socket.socket,
) -> tuple[int, dict[str, str], bytes] | None:
    """The 503 a turned-away socket got (and its close), or None if admitted.

    The barrier that followed it was answered, so a turned-away socket
    already holds its answer; an admitted one holds nothing.
    """
    try:
        data = sock.recv(65536)
    except BlockingIOError:
        return None
    data += await until_closed(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    status, headers = parse_head(head + b"\r\n\r\n")

    return status, headers, body


async def test_past_the_default_cap_connections_are_turned_away(
    workdir: Path, many_descriptors: int
) -> None:
    """With the default cap of 1024, of 2,000 connections the ones past it
    get the 503 answer and are closed, the rest stay open and are served,
    and the socket listener serves throughout."""
    broker = await start(workdir, "{}")
    loop = asyncio.get_running_loop()

    async with crowd(broker, 2000) as held:
        total = len(held.sockets)
        refused = await broker.refused("tcp")
        others = [s for s in held.sockets if s not in held.turned_away]
        answers = await asyncio.gather(*(_answer_or_none(s) for s in others))
        turned = [a for a in answers if a is not None]
        kept = [s for s, a in zip(others, answers, strict=True) if a is None]
        held.turned_away.update(s for s, a in zip(others, answers, strict=True) if a)
        for sock in kept[:16]:
            await loop.sock_sendall(sock, request("/v1/tokens/chat", close=False))
        sample = [(await answer_of(s))[0] for s in kept[:16]]
        over_tcp = await broker.token("tcp")
        over_socket = await broker.token("unix")

    assert refused == total - 1024
    assert len(kept) == 1024
    for answer in turned:
        assert_too_many(*answer)
    assert sample == [200] * 16
    assert (over_tcp, over_socket) == (503, 200)
    assert await broker.token("tcp") == 200
    assert await broker.broker.stop() == 0
