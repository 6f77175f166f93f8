"""Fixtures shared by the whole suite."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

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
