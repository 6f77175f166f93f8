"""Time from ``token-broker serve`` to the first token served, per listener.

Starts the broker on a config (default: config.example.yaml, whose embedded
dev issuer answers at once) several times and prints, for each run, when the
broker logged ``broker.started`` and when the first token came back over TCP
and over the Unix socket. Run: ``python bench/startup.py [-c FILE] [-n RUNS]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import process


async def first_token(url: str, connector: aiohttp.BaseConnector | None) -> float:
    """Ask until a token comes back (at most 10 s); return when it did."""
    async with aiohttp.ClientSession(connector=connector) as session:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            async with session.get(url, headers={"Token-Broker": "1"}) as answer:
                if answer.status == 200:
                    return time.monotonic()
            await asyncio.sleep(0.005)
    raise RuntimeError(f"no token from {url} within 10 s")


async def one_run(config: Path) -> dict[str, float]:
    began = time.monotonic()
    broker = await process.start(config)
    started = time.monotonic()
    info = broker.started()
    client = info["clients"][0]
    tcp = await first_token(f"http://{info['http']}/v1/tokens/{client}", None)
    unix = await first_token(
        f"http://localhost/v1/tokens/{client}",
        aiohttp.UnixConnector(path=info["unix"]),
    )
    code = await broker.stop()
    if code != 0:
        raise RuntimeError(f"broker exited {code}")

    return {
        "started": started - began,
        "tcp_token": tcp - began,
        "unix_token": unix - began,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", default="config.example.yaml")
    parser.add_argument("-n", "--runs", type=int, default=5)
    args = parser.parse_args()

    runs = [await one_run(Path(args.config)) for _ in range(args.runs)]
    print(f"startup over {args.runs} runs of {args.config} (seconds from spawn):")
    for key in ("started", "tcp_token", "unix_token"):
        values = [run[key] for run in runs]
        print(
            f"  {key:<11} min {min(values):.3f}  median "
            f"{statistics.median(values):.3f}  max {max(values):.3f}"
        )
    print(json.dumps({"runs": runs}))


if __name__ == "__main__":
    asyncio.run(main())
