"""Serve an app on a real Unix socket, where peer credentials exist."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from aiohttp import web


@contextlib.asynccontextmanager
async def unix_session(
    app: web.Application, path: Path
) -> AsyncIterator[aiohttp.ClientSession]:
    """Run ``app`` on a socket at ``path``; yield a session that talks to it.

    aiohttp's test client speaks TCP, where a caller has no uid to check.
    """
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.UnixSite(runner, str(path)).start()
        connector = aiohttp.UnixConnector(path=str(path))
        async with aiohttp.ClientSession(
            "http://broker", connector=connector
        ) as session:
            yield session
    finally:
        await runner.cleanup()
