"""No secret and no token in any log line, metric or API answer, on every
failure path a real run can take."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpClient

from broker import api, logs
from broker.clock import SystemClock
from broker.issuer import IssuerClient
from broker.loader import load_text
from broker.metrics import Metrics
from broker.refresh import Refresher
from broker.registry import Registry, issuer_fetch
from broker.secret import MASK
from broker.token import Token
from broker.transport import client_session
from tests import process
from tests.process import run_cli

GOOD = "good-secret-7Hq2pLx9"
WRONG = "wrong-secret-K3vB8mZ1"
ECHOED = "echoed-secret-R5tY6uI7"
SECRETS = (GOOD, WRONG, ECHOED)


@pytest.fixture
async def hostile_issuer() -> AsyncIterator[TestServer]:
    """An issuer whose failures echo the request, secret and all."""
    never = asyncio.Event()

    async def echo_500(request: web.Request) -> web.Response:
        body = await request.text()
        auth = request.headers.get("Authorization", "")
        return web.Response(status=500, text=f"boom {body} {auth}")

    async def echo_401(request: web.Request) -> web.Response:
        body = await request.text()
        return web.json_response(
            {"error": "invalid_client", "error_description": f"bad: {body}"},
            status=401,
        )

    async def html_502(request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        page = f"<html><body><h1>Bad gateway</h1><p>{auth}</p></body></html>"
        return web.Response(status=502, text=page, content_type="text/html")

    async def hang(request: web.Request) -> web.Response:
        await never.wait()
        return web.Response()

    app = web.Application()
    app.router.add_post("/echo500", echo_500)
    app.router.add_post("/echo401", echo_401)
    app.router.add_post("/html502", html_502)
    app.router.add_post("/hang", hang)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    yield server
    never.set()
    await server.close()


def client(name: str, env: str, secret: str, auth: str = "client_secret_post") -> str:
    return (
        f"  {name}: {{environment: {env}, client_id: id-{name}, "
        f"client_secret: {{env: SECRET_{name.upper()}}}, auth: {auth}}}\n"
    )


async def test_no_secret_or_token_anywhere(
    workdir: Path,
    hostile_issuer: TestServer,
) -> None:
    """With DEBUG logs, every failure path leaves no secret or token behind."""
    issuer_port = process.free_port()
    hostile = f"http://127.0.0.1:{hostile_issuer.port}"
    config = workdir / "leaks.yaml"
    config.write_text(
        "listen: {http: 127.0.0.1:0, unix: "
        + f"{workdir}/b.sock"
        + ", metrics: 127.0.0.1:0}\n"
        "refresh: {timeout: 0.3s}\n"
        "environments:\n"
        f"  dev: {{token_url: 'http://127.0.0.1:{issuer_port}/oauth2/token'}}\n"
        f"  e500: {{token_url: '{hostile}/echo500'}}\n"
        f"  e401: {{token_url: '{hostile}/echo401'}}\n"
        f"  html: {{token_url: '{hostile}/html502'}}\n"
        f"  hang: {{token_url: '{hostile}/hang'}}\n"
        f"  down: {{token_url: 'http://127.0.0.1:{process.free_port()}/t'}}\n"
        "clients:\n"
        + client("good", "dev", GOOD, "client_secret_basic")
        + client("wrong", "dev", WRONG)
        + client("echo", "e500", ECHOED)
        + client("echob", "e500", ECHOED, "client_secret_basic")
        + client("reject", "e401", ECHOED)
        + client("page", "html", ECHOED, "client_secret_basic")
        + client("slow", "hang", ECHOED)
        + client("down", "down", ECHOED)
        + "dev_issuer:\n"
        f"  listen: 127.0.0.1:{issuer_port}\n"
        f"  clients: {{id-good: {{secret: {GOOD}}}}}\n"
    )
    env = {
        "SECRET_GOOD": GOOD,
        "SECRET_WRONG": WRONG,
        **{
            f"SECRET_{n.upper()}": ECHOED
            for n in ("echo", "echob", "reject", "page", "slow", "down")
        },
    }
    broker = await process.start(config, "--log-level", "debug", env=env)
    started = broker.started()
    answers: list[str] = []

    async with aiohttp.ClientSession() as session:
        base = f"http://{started['http']}"
        headers = {"Token-Broker": "1"}
        async with session.get(
            f"{base}/v1/tokens/good?format=raw", headers=headers
        ) as r:
            assert r.status == 200
            token = await r.text()
        for name in ("wrong", "echo", "echob", "reject", "page", "slow", "down"):
            async with session.get(f"{base}/v1/tokens/{name}", headers=headers) as r:
                assert r.status == 503, name
                answers.append(await r.text())
        async with session.get(f"{base}/v1/clients", headers=headers) as r:
            answers.append(await r.text())
        async with session.get(f"http://{started['metrics']}/metrics") as r:
            answers.append(await r.text())
    await broker.wait_for_event("token.refresh_failed")
    assert await broker.stop() == 0

    basic = base64.b64encode(f"id-good:{GOOD}".encode()).decode()
    everything = "\n".join([broker.output(), *answers])
    reasons = {e.get("reason") for e in broker.events if e.get("reason")}
    assert {"invalid_client", "http_5xx", "timeout", "connection"} <= reasons
    # The hostile answers did reach the messages, with the secret cut out.
    assert "boom" in everything
    assert "Bad gateway" in everything
    for needle in (*SECRETS, token, basic, token.split(".")[1]):
        assert needle not in everything


async def test_config_errors_never_show_the_secret(workdir: Path) -> None:
    """A secret at a bad key, or a bad secret, is not echoed in the error."""
    config = workdir / "bad.yaml"
    for bad in (
        f"client_secret: {{nope: {GOOD}}}",
        f'client_secret: "{GOOD}\\u0007"',
        f"client_secret: [{GOOD}]",
    ):
        config.write_text(
            "environments: {p: {token_url: 'https://a.example/t'}}\n"
            f"clients:\n  c: {{environment: p, client_id: x, {bad}}}\n"
        )

        code, out, err = await run_cli("check-config", "-c", str(config))

        assert code == 2
        assert "clients.c.client_secret" in err
        assert GOOD not in out + err


CRASH_SECRET = "crash-secret-Lm47vNq2"
# Opaque, not a JWT: only the chain's memory of held tokens can mask it.
CRASH_TOKEN = "opaque-token-Vb58wQe3Xz"
CALLER_KEY = "caller-key-Jr29sUd5Kc"


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    """The broker's log chain at debug, as JSON lines into a buffer, undone after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    access = logging.getLogger("aiohttp.access")
    access_level = access.level
    out = io.StringIO()
    logs.configure(level="debug", fmt="json", stream=out)

    yield out

    structlog.reset_defaults()
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    access.setLevel(access_level)


@pytest.fixture
async def opaque_issuer() -> AsyncIterator[TestServer]:
    """An issuer that hands out one opaque token."""

    async def token(request: web.Request) -> web.Response:
        return web.json_response({"access_token": CRASH_TOKEN, "expires_in": 600})

    app = web.Application()
    app.router.add_post("/token", token)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    yield server
    await server.close()


async def test_a_crashing_handler_leaks_neither_secret_nor_token(
    aiohttp_client: AiohttpClient,
    opaque_issuer: TestServer,
    captured_logs: io.StringIO,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An exception carrying the secret and the token, raised inside a request
    handler, gives a 500 internal_error and a debug log with both masked."""
    config = load_text(
        f"""
environments: {{dev: {{token_url: "http://127.0.0.1:{opaque_issuer.port}/token"}}}}
clients:
  chat: {{environment: dev, client_id: crash, client_secret: {CRASH_SECRET}}}
""",
        "crash.yaml",
        {},
    ).config
    clock = SystemClock()
    metrics = Metrics()
    guard = {"Token-Broker": "1"}
    crash = RuntimeError(
        f"refresher failed holding {CRASH_SECRET} and {CRASH_TOKEN}",
        CRASH_SECRET,
        CRASH_TOKEN,
    )

    async def crashing_get(self: Refresher, min_ttl: float = 0.0) -> Token:
        raise crash

    async with client_session() as session:
        registry = Registry(
            config,
            issuer_fetch(IssuerClient(session), config),
            clock=clock,
            metrics=metrics,
        )
        app = api.create_app(registry, metrics, clock, listener="tcp")
        client = await aiohttp_client(app)
        try:
            registry.start()
            async with client.get("/v1/tokens/chat?format=raw", headers=guard) as r:
                assert (r.status, await r.text()) == (200, CRASH_TOKEN)
            monkeypatch.setattr(Refresher, "get", crashing_get)
            async with client.get("/v1/tokens/chat", headers=guard) as r:
                status, answer = r.status, await r.text()
        finally:
            await registry.stop()

    assert status == 500
    assert json.loads(answer)["error"] == "internal_error"
    text = captured_logs.getvalue()
    [crashed] = [
        json.loads(line) for line in text.splitlines() if '"api.crashed"' in line
    ]
    assert crashed["path"] == "/v1/tokens/chat"
    assert "RuntimeError: " in crashed["exception"]
    assert MASK in crashed["exception"]
    for needle in (CRASH_SECRET, CRASH_TOKEN, repr(crash), str(crash)):
        assert needle not in text
        assert needle not in answer


def test_a_config_with_caller_keys_never_shows_a_key(workdir: Path) -> None:
    """A loaded config's repr names caller key files, never the keys in them."""
    key_file = workdir / "app.key"
    key_file.write_text(CALLER_KEY + "\n")
    config = load_text(
        f"""
environments: {{p: {{token_url: "https://auth.example.com/token"}}}}
clients:
  chat:
    environment: p
    client_id: c
    client_secret: {CRASH_SECRET}
    callers: {{keys: [{{name: app, file: {key_file}}}]}}
""",
        str(workdir / "broker.yaml"),
        {},
    ).config
    callers = config.clients["chat"].callers
    assert callers is not None

    shown = [repr(config), str(config), repr(callers), callers.describe()]

    assert str(key_file) in repr(callers)
    for text in shown:
        assert CALLER_KEY not in text
        assert CRASH_SECRET not in text
