"""Ask a running broker for a token (the ``token-broker token`` command)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from urllib.parse import quote

import aiohttp

from broker.guard import HEADER
from broker.transport import why


class BrokerUnreachable(Exception):
    """No broker answers at the given socket or URL."""


@dataclass(frozen=True)
class Answer:
    """The broker's answer: status and the decoded body."""

    status: int
    body: dict[str, object]
    raw: str


async def ask_token(
    client: str,
    *,
    socket_path: str | None = None,
    url: str | None = None,
    min_ttl: float | None = None,
    timeout: float = 15.0,
    key: str | None = None,
) -> Answer:
    """GET the client's token as JSON over the socket or the TCP URL.

    ``key`` is a caller key, for a client whose ``callers`` list keys.
    """
    params = {} if min_ttl is None else {"min_ttl": f"{min_ttl:g}"}
    path = f"/v1/tokens/{quote(client, safe='')}"
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}

    return await ask(
        path, params, socket_path=socket_path, url=url, timeout=timeout, headers=headers
    )


async def ask(
    path: str,
    params: dict[str, str] | None = None,
    *,
    socket_path: str | None = None,
    url: str | None = None,
    timeout: float = 15.0,
    headers: dict[str, str] | None = None,
) -> Answer:
    """GET ``path`` from a running broker over its socket or its TCP URL."""
    base = url.rstrip("/") if url else "http://localhost"
    connector: aiohttp.BaseConnector | None = None
    if url is None:
        assert socket_path is not None
        connector = aiohttp.UnixConnector(path=socket_path)
    where = url or socket_path

    try:
        async with (
            aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as session,
            session.get(
                f"{base}{path}",
                params=params or {},
                headers={HEADER: "1", "Accept": "application/json", **(headers or {})},
                allow_redirects=False,
            ) as response,
        ):
            text = await response.text()
            status = response.status
    except (aiohttp.ClientConnectionError, TimeoutError, OSError) as exc:
        raise BrokerUnreachable(f"no broker answers at {where} ({why(exc)})") from None

    try:
        body = json.loads(text)
    except ValueError:
        body = {}

    return Answer(status, body if isinstance(body, dict) else {}, text)
