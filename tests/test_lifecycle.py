"""Ending and restarting: quit over the socket, an exit file, a restart."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from tests import process
from tests.test_e2e import write_config


async def get_token(socket: Path) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(socket))) as s,
        s.get("http://broker/v1/tokens/chat?format=raw") as answer,
    ):
        return answer.status, await answer.text()


async def test_quit_over_the_socket_ends_the_broker_with_0(workdir: Path) -> None:
    """POST /v1/quit on the socket: graceful stop, exit 0, socket removed."""
    broker = await process.start(write_config(workdir, process.free_port()))
    socket = workdir / "broker.sock"

    async with (
        aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(socket))) as s,
        s.post("http://broker/v1/quit") as answer,
    ):
        assert answer.status == 202

    assert await broker.stop(signum=None) == 0
    assert not socket.exists()
    assert any(e["event"] == "broker.quit_requested" for e in broker.events)


async def test_an_exit_file_ends_the_broker_with_0(workdir: Path) -> None:
    """exit_when_file_exists: the file appears, the broker stops cleanly."""
    config = write_config(workdir, process.free_port())
    config.write_text(config.read_text() + "exit_when_file_exists: done\n")
    broker = await process.start(config)
    assert (await get_token(workdir / "broker.sock"))[0] == 200

    (workdir / "done").touch()

    assert await broker.stop(signum=None) == 0
    assert any(e["event"] == "broker.exit_file_seen" for e in broker.events)


async def test_a_restarted_broker_serves_again(workdir: Path) -> None:
    """Stop and start on the same config: the socket is taken over and a
    token is served again at once."""
    config = write_config(workdir, process.free_port())
    first = await process.start(config)
    before = await get_token(workdir / "broker.sock")
    assert await first.stop() == 0

    second = await process.start(config)
    async with asyncio.timeout(5):
        after = await get_token(workdir / "broker.sock")

    assert before[0] == after[0] == 200
    assert before[1] != after[1]
    assert await second.stop() == 0
