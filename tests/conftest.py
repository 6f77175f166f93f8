"""Fixtures shared by the whole suite."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests import process


@pytest.fixture(autouse=True)
async def _reap_brokers() -> AsyncIterator[None]:
    """Kill any broker process a test started and did not stop."""
    yield
    await process.reap()


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A short directory (Unix socket paths are limited to ~107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="tb-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def held_issuer() -> AsyncIterator[tuple[TestServer, asyncio.Event]]:
    """An issuer that answers only once the test releases it."""
    release = asyncio.Event()

    async def token(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({"access_token": "held-token", "expires_in": 600})

    app = web.Application()
    app.router.add_post("/token", token)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    yield server, release
    release.set()
    await server.close()
