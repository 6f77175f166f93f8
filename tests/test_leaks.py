"""No secret and no token in any log line, metric or API answer, on every
failure path a real run can take."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

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
