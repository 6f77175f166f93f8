"""The whole path: ``token-broker serve`` as a process, real dev issuer."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
from pathlib import Path

import aiohttp
import jwt
import pytest
from aiohttp.test_utils import TestServer

import broker
from broker.grant import basic_credentials
from broker.secret import Secret
from tests import process
from tests.process import run_cli

SECRET = "e2e-secret-Zq81"


def write_config(workdir: Path, issuer_port: int, **extra: str) -> Path:
    (workdir / "secret").write_text(SECRET + "\n")
    config = workdir / "broker.yaml"
    config.write_text(
        f"""
listen:
  http: 127.0.0.1:0
  unix: {workdir}/broker.sock
  metrics: 127.0.0.1:0
environments:
  dev: {{token_url: "http://127.0.0.1:{issuer_port}/oauth2/token"}}
clients:
  chat:
    environment: dev
    client_id: e2e
    client_secret: {{file: secret}}
    scopes: [chat:invoke]
  models:
    environment: dev
    client_id: e2e
    client_secret: {{file: secret}}
    scopes: [models:read]
    auth: client_secret_post
    encoding: json
log: {{level: {extra.get("level", "info")}}}
dev_issuer:
  listen: 127.0.0.1:{issuer_port}
  token_lifetime: 10m
  clients:
    e2e: {{secret: {SECRET}, scopes: [chat:invoke, models:read]}}
"""
    )
    return config


async def test_serve_fetch_metrics_and_clean_stop(workdir: Path) -> None:
    """Tokens over TCP, the socket and the CLI match; SIGTERM exits 0 and
    removes the socket."""
    issuer_port = process.free_port()
    broker = await process.start(write_config(workdir, issuer_port))
    started = broker.started()
    socket_path = str(workdir / "broker.sock")
    http = f"http://{started['http']}"
    headers = {"Token-Broker": "1"}

    async with aiohttp.ClientSession() as session:
        async with session.get(f"{http}/v1/tokens/chat", headers=headers) as answer:
            assert answer.status == 200
            assert answer.headers["Cache-Control"] == "no-store"
            tcp_token = await answer.json()
        async with session.get(f"http://127.0.0.1:{issuer_port}/jwks.json") as keys:
            jwks = await keys.json()
        async with session.get(f"http://{started['metrics']}/metrics") as scrape:
            metrics_text = await scrape.text()
        async with session.get(f"http://{started['metrics']}/readyz") as ready:
            assert ready.status == 200

    unix = aiohttp.UnixConnector(path=socket_path)
    async with aiohttp.ClientSession(connector=unix) as session:
        async with session.get("http://broker/v1/tokens/chat?format=raw") as answer:
            assert answer.status == 200
            unix_token = await answer.text()
        async with session.get("http://broker/v1/tokens/models/header") as answer:
            assert answer.status == 204
            assert answer.headers["Authorization"].startswith("Bearer ey")

    code, printed, _ = await run_cli("token", "chat", "--socket", socket_path)
    assert code == 0
    code, header, _ = await run_cli(
        "token", "models", "--url", http, "--format", "header", "--min-ttl", "60"
    )
    assert code == 0
    assert header.startswith("Authorization: Bearer ey")
    code, _, err = await run_cli("token", "nope", "--socket", socket_path)
    assert code == 1
    assert "no client named 'nope'" in err
    code, out, err = await run_cli("token", "../clients", "--socket", socket_path)
    assert (code, out) == (1, "")
    assert "no client named '../clients'" in err

    assert tcp_token["token_type"] == "Bearer"
    assert 590 <= tcp_token["expires_in"] <= 600
    assert 0 < tcp_token["refresh_in"] < tcp_token["expires_in"]
    assert tcp_token["scope"] == "chat:invoke"
    assert unix_token == tcp_token["access_token"] == printed.strip()
    key = jwt.PyJWK(jwks["keys"][0])
    claims = jwt.decode(
        unix_token, key, algorithms=["RS256"], audience="token-broker-dev"
    )
    assert claims["sub"] == "e2e"
    assert claims["scope"] == "chat:invoke"
    assert (
        'token_broker_refresh_total{client="chat",environment="dev",'
        'reason="none",result="success"} 1.0'
    ) in metrics_text
    assert stat.S_IMODE(os.stat(socket_path).st_mode) == 0o660

    assert await broker.stop() == 0
    assert not os.path.exists(socket_path)
    assert any(e["event"] == "broker.stopped" for e in broker.events)


async def test_bad_config_exits_2_and_starts_nothing(workdir: Path) -> None:
    """A config error names file, key path and reason; exit code 2."""
    config = write_config(workdir, process.free_port())
    config.write_text(config.read_text().replace("scopes: [chat:invoke]", "scope: x"))

    code, _, err = await run_cli("serve", "-c", str(config))

    assert code == 2
    assert f"{config}: clients.chat.scope: unknown key" in err
    assert not (workdir / "broker.sock").exists()


async def test_token_cli_without_broker_says_so(workdir: Path) -> None:
    """``token-broker token`` with no broker running exits 3 with a message."""
    code, out, err = await run_cli(
        "token", "chat", "--socket", str(workdir / "none.sock")
    )

    assert code == 3
    assert "no broker answers" in err
    assert out == ""


async def test_a_live_brokers_socket_is_not_stolen(workdir: Path) -> None:
    """A second broker on the same socket refuses to start (exit 1)."""
    config = write_config(workdir, process.free_port())
    first = await process.start(config)
    second = workdir / "second.yaml"
    second.write_text(config.read_text().split("dev_issuer:")[0])

    code, out, _ = await run_cli("serve", "-c", str(second))

    assert code == 1
    assert "start_failed" in out
    assert "another process is listening on" in out
    assert (workdir / "broker.sock").exists()
    assert await first.stop() == 0


def held_config(workdir: Path, port: int, drain: str = "30s") -> Path:
    config = workdir / "held.yaml"
    config.write_text(
        f"""
listen: {{http: null, unix: {workdir}/h.sock, metrics: null, drain_timeout: {drain}}}
refresh: {{timeout: 30s}}
environments:
  slow: {{token_url: "http://127.0.0.1:{port}/token"}}
clients:
  slow: {{environment: slow, client_id: s, client_secret: x-secret-value}}
"""
    )
    return config


async def ask_over_socket(path: Path) -> tuple[int, str]:
    unix = aiohttp.UnixConnector(path=str(path))
    async with (
        aiohttp.ClientSession(connector=unix) as session,
        session.get("http://broker/v1/tokens/slow?format=raw") as answer,
    ):
        return answer.status, await answer.text()


async def draining(
    workdir: Path, server: TestServer, drain: str = "30s"
) -> tuple[process.Broker, asyncio.Task[tuple[int, str]]]:
    """A broker told to stop while a caller waits for its first token."""
    broker = await process.start(
        held_config(workdir, server.port or 0, drain), "--log-level", "debug"
    )
    caller = asyncio.create_task(ask_over_socket(workdir / "h.sock"))
    await broker.wait_for_event("token.waiting")

    broker.process.terminate()
    await broker.wait_for_event("broker.stopping")

    return broker, caller


async def test_sigterm_lets_requests_in_flight_finish(
    workdir: Path, held_issuer: tuple[TestServer, asyncio.Event]
) -> None:
    """A caller waiting for the first token still gets it after SIGTERM."""
    server, release = held_issuer
    broker, caller = await draining(workdir, server)
    release.set()

    assert await caller == (200, "held-token")
    assert await broker.stop(signum=None) == 0
    assert not (workdir / "h.sock").exists()


async def test_second_signal_exits_at_once(
    workdir: Path, held_issuer: tuple[TestServer, asyncio.Event]
) -> None:
    """While draining, a second SIGTERM ends the process immediately."""
    broker, caller = await draining(workdir, held_issuer[0])

    code = await broker.stop(timeout=10)

    assert code == 1
    assert any(e["event"] == "broker.forced_exit" for e in broker.events)
    with pytest.raises(aiohttp.ClientError):
        await caller


async def test_dev_issuer_command_serves_tokens(workdir: Path) -> None:
    """``token-broker dev-issuer`` alone issues tokens to its clients."""
    port = process.free_port()
    config = write_config(workdir, port)
    issuer = await process.start(config, command="dev-issuer")
    await issuer.wait_for_event("dev_issuer.started")

    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"http://127.0.0.1:{port}/oauth2/token",
            data={"grant_type": "client_credentials"},
            headers={"Authorization": basic_credentials("e2e", Secret(SECRET))},
        ) as answer,
    ):
        body = await answer.json()

    assert answer.status == 200
    assert body["token_type"] == "Bearer"
    assert await issuer.stop() == 0


async def test_python_dash_m_and_version() -> None:
    """``python -m broker`` is the same program as the console script."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "broker",
        "--version",
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()

    assert proc.returncode == 0
    assert out.decode().strip() == broker.__version__


async def test_check_config_describes_without_secrets(workdir: Path) -> None:
    """check-config lists each client and where its secret lives, not it."""
    config = write_config(workdir, process.free_port())

    code, out, _ = await run_cli("check-config", "-c", str(config))

    assert code == 0
    assert "client_secret_post" in out
    assert f"file {workdir}/secret" in out
    assert SECRET not in out


async def test_callers_still_waiting_at_the_drain_deadline_get_503(
    workdir: Path, held_issuer: tuple[TestServer, asyncio.Event]
) -> None:
    """A caller whose token never comes is answered before the drain ends."""
    broker, caller = await draining(workdir, held_issuer[0], drain="1s")

    status, body = await caller

    assert status == 503
    assert json.loads(body)["reason"] == "stopping"
    assert await broker.stop(signum=None) == 0
