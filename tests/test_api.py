"""The token API and metrics listener through aiohttp's test client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from broker import api, metrics_app
from broker.errors import IssuerError
from broker.loader import load_text
from broker.metrics import Metrics
from broker.registry import Registry
from tests.fakes import FakeClock, ScriptedFetch, grant, settle

CONFIG = """
environments:
  prod: {token_url: "https://auth.example.com/token"}
clients:
  chat: {environment: prod, client_id: c, client_secret: s3cr3t-value, scopes: [a]}
  spare:
    environment: prod
    client_id: d
    client_secret: s3cr3t-value
    required: false
refresh: {jitter: 0}
"""
GUARD = {"Token-Broker": "1"}

Client = TestClient[web.Request, web.Application]


class Setup:
    """A registry with scripted issuers, and clients for both listeners."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.metrics = Metrics()
        self.fetches = {"chat": ScriptedFetch(), "spare": ScriptedFetch()}
        config = load_text(CONFIG, "test.yaml", {}).config
        self.registry = Registry(
            config, self.fetches.__getitem__, clock=self.clock, metrics=self.metrics
        )

    def app(self, listener: str) -> web.Application:
        return api.create_app(
            self.registry, self.metrics, self.clock, listener=listener
        )


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    built = Setup()
    yield built
    await built.registry.stop()


@pytest.fixture
async def tcp(setup: Setup, aiohttp_client: AiohttpClient) -> Client:
    return await aiohttp_client(setup.app("tcp"))


@pytest.fixture
async def unix(setup: Setup, aiohttp_client: AiohttpClient) -> Client:
    return await aiohttp_client(setup.app("unix"))


async def started(setup: Setup) -> None:
    setup.registry.start()
    await settle()


async def test_token_json_shape(setup: Setup, tcp: Client) -> None:
    """The JSON answer has every documented field and no-store caching."""
    setup.fetches["chat"].outcomes.append(grant("tok-chat", 3600.0))
    await started(setup)
    await setup.clock.advance(100)

    answer = await tcp.get("/v1/tokens/chat", headers=GUARD)
    body = await answer.json()

    assert answer.status == 200
    assert answer.headers["Cache-Control"] == "no-store"
    assert body == {
        "access_token": "tok-chat",
        "token_type": "Bearer",
        "expires_in": 3500,
        "expires_at": "2027-01-15T09:00:00Z",
        "refresh_in": 2880 - 100,
        "scope": "a b",
    }


@pytest.mark.parametrize(
    ("query", "accept"),
    [("?format=raw", "application/json"), ("", "text/plain")],
)
async def test_bare_token(
    setup: Setup,
    tcp: Client,
    query: str,
    accept: str,
) -> None:
    """``format=raw`` or ``Accept: text/plain`` gives the bare token."""
    setup.fetches["chat"].outcomes.append(grant("tok-raw"))
    await started(setup)

    answer = await tcp.get(
        f"/v1/tokens/chat{query}", headers={**GUARD, "Accept": accept}
    )

    assert answer.status == 200
    assert answer.content_type == "text/plain"
    assert await answer.text() == "tok-raw"


async def test_header_route(setup: Setup, unix: Client) -> None:
    """The header route answers 204 with the Authorization header set."""
    setup.fetches["chat"].outcomes.append(grant("tok-h"))
    await started(setup)

    answer = await unix.get("/v1/tokens/chat/header")

    assert answer.status == 204
    assert answer.headers["Authorization"] == "Bearer tok-h"


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, "missing_header"),
        ({"Token-Broker": "yes"}, "missing_header"),
        ({**GUARD, "Host": "evil.example.com"}, "host"),
        ({**GUARD, "X-Forwarded-For": "10.1.1.1"}, "forwarded"),
        ({**GUARD, "Forwarded": "for=10.1.1.1"}, "forwarded"),
    ],
)
async def test_tcp_guard_refuses(
    setup: Setup,
    tcp: Client,
    headers: dict[str, str],
    reason: str,
) -> None:
    """Each guard rule refuses with 403 and names its reason."""
    await started(setup)

    answer = await tcp.get("/v1/tokens/chat", headers=headers)
    body = await answer.json()

    assert answer.status == 403
    assert body["error"] == "forbidden"
    assert body["reason"] == reason
    assert "access_token" not in body


async def test_unix_listener_needs_no_header(
    setup: Setup,
    unix: Client,
) -> None:
    """The socket is guarded by its file mode, not by the header."""
    await started(setup)

    answer = await unix.get("/v1/tokens/chat")

    assert answer.status == 200


async def test_unknown_client_is_404(setup: Setup, tcp: Client) -> None:
    """An unknown name gives 404 unknown_client in the error shape."""
    answer = await tcp.get("/v1/tokens/nope", headers=GUARD)

    assert answer.status == 404
    assert await answer.json() == {
        "error": "unknown_client",
        "message": "no client named 'nope'",
        "client": "nope",
    }


@pytest.mark.parametrize(
    ("query", "fragment"),
    [
        ("min_ttl=abc", "min_ttl must be a number"),
        ("min_ttl=-1", "min_ttl must be a number"),
        ("min_ttl=inf", "min_ttl must be a number"),
        ("min_ttl=1_000", "min_ttl must be a number"),
        ("min_ttl=1e3", "min_ttl must be a number"),
        ("min_ttl=%D9%A1", "min_ttl must be a number"),
        ("min_ttl=99999", "exceeds the lifetime"),
        ("format=xml", "format must be json or raw"),
        ("foo=1", "unknown query parameter 'foo'"),
        ("scope=", "scope is empty"),
    ],
)
async def test_bad_query_is_400(
    setup: Setup,
    unix: Client,
    query: str,
    fragment: str,
) -> None:
    """Bad query parameters get 400 invalid_request with a reason."""
    await started(setup)

    answer = await unix.get(f"/v1/tokens/chat?{query}")
    body = await answer.json()

    assert answer.status == 400
    assert body["error"] == "invalid_request"
    assert fragment in body["message"]
    assert answer.headers["Cache-Control"] == "no-store"


async def test_unavailable_is_503_with_retry_after(
    setup: Setup,
    unix: Client,
) -> None:
    """With the issuer failing, callers get 503, the reason and Retry-After."""
    setup.fetches["chat"].outcomes.append(
        IssuerError("invalid_client", "status 401: invalid_client", permanent=True)
    )
    await started(setup)

    answer = await unix.get("/v1/tokens/chat")
    body = await answer.json()

    assert answer.status == 503
    assert body["error"] == "token_unavailable"
    assert body["reason"] == "invalid_client"
    assert body["client"] == "chat"
    assert int(answer.headers["Retry-After"]) > 60


async def test_clients_lists_state_without_tokens(
    setup: Setup,
    unix: Client,
) -> None:
    """/v1/clients shows each client's state and never a token."""
    setup.fetches["chat"].outcomes.append(grant("tok-secret-xyz"))
    setup.fetches["spare"].outcomes.append(IssuerError("timeout", "no answer"))
    await started(setup)

    answer = await unix.get("/v1/clients")
    text = await answer.text()
    body = await answer.json()

    assert "tok-secret-xyz" not in text
    assert "s3cr3t-value" not in text
    states = {c["name"]: c for c in body["clients"]}
    assert states["chat"]["state"] == "fresh"
    assert states["chat"]["consecutive_failures"] == 0
    assert states["spare"]["state"] == "expired"
    assert states["spare"]["last_error"] == {
        "reason": "timeout",
        "message": "no answer",
    }


async def test_readiness_waits_for_required_clients(
    setup: Setup,
    unix: Client,
) -> None:
    """/readyz is 503 until every required client holds a token; optional
    clients do not count."""
    setup.fetches["chat"].outcomes.append(IssuerError("timeout", "no answer"))
    setup.fetches["spare"].outcomes.append(IssuerError("timeout", "no answer"))
    await started(setup)

    not_ready = await unix.get("/readyz")
    assert not_ready.status == 503
    assert (await not_ready.json())["waiting_for"] == ["chat"]
    await setup.clock.advance(5)

    ready = await unix.get("/readyz")
    assert ready.status == 200
    assert (await unix.get("/healthz")).status == 200


async def test_wrong_method_and_path_are_json(
    setup: Setup,
    unix: Client,
) -> None:
    """405 and 404 from routing come back as JSON errors too."""
    wrong_method = await unix.post("/v1/tokens/chat")
    wrong_path = await unix.get("/v2/nothing")

    assert wrong_method.status == 405
    assert wrong_method.headers["Allow"] == "GET,HEAD"
    assert (await wrong_method.json()) == {
        "error": "method_not_allowed",
        "message": "Method Not Allowed",
        "client": None,
    }
    assert wrong_path.status == 404
    assert (await wrong_path.json())["error"] == "not_found"


async def test_served_requests_are_counted(
    setup: Setup,
    unix: Client,
    aiohttp_client: AiohttpClient,
) -> None:
    """Each token handed out counts in token_requests_total on /metrics."""
    await started(setup)
    for _ in range(3):
        await unix.get("/v1/tokens/chat")
    scraper = await aiohttp_client(
        metrics_app.create_app(setup.registry, setup.metrics)
    )

    scrape = await scraper.get("/metrics")
    text = await scrape.text()

    assert scrape.headers["Cache-Control"] == "no-store"
    assert (
        'token_broker_token_requests_total{caller="any",client="chat",'
        'listener="unix",result="ok"} 3.0'
    ) in text
    assert "auto-1" not in text


async def test_absolute_form_request_is_refused_on_the_wire(
    setup: Setup, tcp: Client
) -> None:
    """A proxy-style request line is refused even with good headers."""
    await started(setup)
    assert tcp.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", tcp.server.port)
    writer.write(
        b"GET http://evil.example/v1/tokens/chat HTTP/1.1\r\n"
        b"Host: 127.0.0.1\r\nToken-Broker: 1\r\nConnection: close\r\n\r\n"
    )
    await writer.drain()

    answer = await reader.read()
    writer.close()

    assert answer.startswith(b"HTTP/1.1 403")
    assert b'"reason": "forwarded"' in answer
    assert b"auto-1" not in answer


async def test_readiness_waits_for_token_files(
    tmp_path: Path, aiohttp_client: AiohttpClient
) -> None:
    """A required client whose token file cannot be written is not ready."""
    (tmp_path / "token").mkdir()
    text = CONFIG.replace(
        "scopes: [a]}",
        f"scopes: [a], sinks: [{{path: {tmp_path / 'token'}}}]}}",
    )
    clock = FakeClock()
    registry = Registry(
        load_text(text, "t.yaml", {}).config,
        lambda name: ScriptedFetch(),
        clock=clock,
        metrics=Metrics(),
    )
    client = await aiohttp_client(
        api.create_app(registry, Metrics(), clock, listener="unix")
    )
    registry.start()
    try:
        await registry.refreshers["chat"].get()  # the sink write is part of it
        answer = await client.get("/readyz")
        body = await answer.json()
    finally:
        await registry.stop()

    assert answer.status == 503
    assert body == {"status": "not_ready", "waiting_for": [], "sinks_failing": ["chat"]}
