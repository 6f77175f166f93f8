"""IssuerClient talks to real token endpoints and classifies every failure."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer
from structlog.testing import capture_logs

from broker.config import Client, Environment
from broker.errors import IssuerError
from broker.issuer import (
    MAX_BODY,
    IssuerClient,
    client_session,
    proxy_for,
    skew_observer,
)
from broker.metrics import Metrics
from tests.pki import Pki, make_pki

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SECRET = "s3cr3t:value+1"
TOKEN_PATH = "/oauth2/token"
ANSWER = {"access_token": "tok-1", "token_type": "Bearer", "expires_in": 3600}


@dataclass
class Seen:
    """What the fake issuer received."""

    headers: list[dict[str, str]]
    bodies: list[bytes]


class Start(Protocol):
    """Serve a handler as the token endpoint; return the environment for it."""

    def __call__(
        self,
        handler: Handler,
        *,
        tls: ssl.SSLContext | None = None,
        ca_file: Path | None = None,
    ) -> Awaitable[Environment]: ...


def make_client(secret: object = SECRET, **fields: Any) -> Client:
    """A client of the fake issuer using client_secret_basic by default."""
    data = {"environment": "dev", "client_id": "svc", "client_secret": secret}
    return Client.model_validate(data | fields)


def basic_secret(headers: dict[str, str]) -> str:
    """The secret half of a recorded Basic Authorization header."""
    encoded = headers["Authorization"].removeprefix("Basic ")
    return base64.b64decode(encoded).decode().partition(":")[2]


@pytest.fixture
async def issuer() -> AsyncIterator[IssuerClient]:
    """An IssuerClient on the session the broker itself uses."""
    async with client_session() as session:
        yield IssuerClient(session)


@pytest.fixture
async def release() -> AsyncIterator[asyncio.Event]:
    """An event that stalled handlers wait on; set when the test ends."""
    event = asyncio.Event()
    yield event
    event.set()


@pytest.fixture
def seen() -> Seen:
    """An empty record of the requests the fake issuer gets."""
    return Seen([], [])


@pytest.fixture
def start(aiohttp_server: AiohttpServer, seen: Seen) -> Start:
    """Serve ``handler`` at the token path on 127.0.0.1, recording requests."""

    async def go(
        handler: Handler,
        *,
        tls: ssl.SSLContext | None = None,
        ca_file: Path | None = None,
    ) -> Environment:
        async def recording(request: web.Request) -> web.StreamResponse:
            seen.headers.append(dict(request.headers))
            seen.bodies.append(await request.read())
            return await handler(request)

        app = web.Application()
        app.router.add_post(TOKEN_PATH, recording)
        app.router.add_route("*", "/elsewhere", recording)
        server = await aiohttp_server(app, ssl=tls)
        scheme = "https" if tls else "http"
        url = f"{scheme}://127.0.0.1:{server.port}{TOKEN_PATH}"
        return Environment.model_validate(
            {"token_url": url, "ca_file": str(ca_file) if ca_file else None}
        )

    return go


async def answer(request: web.Request) -> web.StreamResponse:
    """A well-behaved issuer: one bearer token for an hour."""
    return web.json_response(ANSWER)


async def fail(
    issuer: IssuerClient, env: Environment, client: Client | None = None
) -> IssuerError:
    """Fetch and return the IssuerError it must raise."""
    with pytest.raises(IssuerError) as caught:
        await issuer.fetch(client or make_client(), env, timeout=5.0)
    return caught.value


# plain HTTP


async def test_success(issuer: IssuerClient, start: Start, seen: Seen) -> None:
    """A 200 JSON answer becomes a Grant; the request is a proper RFC 6749 POST."""
    env = await start(answer)

    grant = await issuer.fetch(make_client(scopes=["chat:invoke"]), env, timeout=5.0)

    assert grant.access_token.reveal() == "tok-1"
    assert grant.expires_in == 3600.0
    (headers,) = seen.headers
    assert basic_secret(headers) == "s3cr3t%3Avalue%2B1"
    assert headers["Accept"] == "application/json"
    assert headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert seen.bodies == [b"grant_type=client_credentials&scope=chat%3Ainvoke"]


async def test_json_body_is_sent_as_json(
    issuer: IssuerClient, start: Start, seen: Seen
) -> None:
    """encoding json posts a JSON object with client_secret_post credentials."""
    env = await start(answer)
    client = make_client(auth="client_secret_post", encoding="json")

    await issuer.fetch(client, env, timeout=5.0)

    assert json.loads(seen.bodies[0]) == {
        "grant_type": "client_credentials",
        "client_id": "svc",
        "client_secret": SECRET,
    }
    assert "Authorization" not in seen.headers[0]


async def test_error_answer_is_classified_and_redacted(
    issuer: IssuerClient, start: Start
) -> None:
    """A 401 that echoes the secret is invalid_client, the secret masked."""

    async def refuse(request: web.Request) -> web.StreamResponse:
        body = {"error": "invalid_client", "error_description": f"not {SECRET}"}
        return web.json_response(body, status=401)

    error = await fail(issuer, await start(refuse))

    assert error.reason == "invalid_client"
    assert error.permanent
    assert SECRET not in error.message
    assert "[redacted]" in error.message


async def test_echoed_basic_credentials_are_redacted(
    issuer: IssuerClient, start: Start
) -> None:
    """An issuer quoting the Authorization header back leaks no Base64 form."""

    async def refuse(request: web.Request) -> web.StreamResponse:
        echoed = request.headers["Authorization"]
        body = {"error": "invalid_client", "error_description": f"bad {echoed}"}
        return web.json_response(body, status=401)

    error = await fail(issuer, await start(refuse))
    encoded = base64.b64encode(f"svc:{SECRET}".encode()).decode()

    assert encoded not in error.message
    assert "[redacted]" in error.message


async def test_http_proxy_never_carries_a_loopback_request(
    issuer: IssuerClient,
    start: Start,
    seen: Seen,
    monkeypatch: pytest.MonkeyPatch,
    aiohttp_server: AiohttpServer,
) -> None:
    """HTTP_PROXY is ignored: plain http goes straight to the loopback host."""
    proxied: list[str] = []

    async def proxy(request: web.Request) -> web.StreamResponse:
        proxied.append(str(request.url))
        return web.Response(status=502)

    proxy_app = web.Application()
    proxy_app.router.add_route("*", "/{tail:.*}", proxy)
    proxy_server = await aiohttp_server(proxy_app)
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{proxy_server.port}")

    grant = await issuer.fetch(make_client(), await start(answer), timeout=5.0)

    assert grant.access_token.reveal() == ANSWER["access_token"]
    assert proxied == []
    assert len(seen.bodies) == 1


@pytest.mark.parametrize(
    ("url", "env", "expected"),
    [
        (
            "https://auth.example.com/t",
            {"HTTPS_PROXY": "http://p:3128"},
            "http://p:3128",
        ),
        (
            "https://auth.example.com/t",
            {"https_proxy": "http://p:3128"},
            "http://p:3128",
        ),
        ("https://auth.example.com/t", {"HTTP_PROXY": "http://p:3128"}, None),
        (
            "https://auth.example.com/t",
            {"HTTPS_PROXY": "http://p:3128", "NO_PROXY": "example.com"},
            None,
        ),
        ("https://127.0.0.1/t", {"HTTPS_PROXY": "http://p:3128"}, None),
        ("http://127.0.0.1/t", {"HTTPS_PROXY": "http://p:3128"}, None),
    ],
)
def test_proxy_choice(
    url: str,
    env: dict[str, str],
    expected: str | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only https requests to non-loopback hosts use HTTPS_PROXY / NO_PROXY."""
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    assert proxy_for(url) == expected


async def test_redirect_is_not_followed(
    issuer: IssuerClient, start: Start, seen: Seen
) -> None:
    """A 3xx is reported, never followed with the secret."""

    async def redirect(request: web.Request) -> web.StreamResponse:
        raise web.HTTPTemporaryRedirect("/elsewhere")

    error = await fail(issuer, await start(redirect))

    assert error.reason == "http_3xx"
    assert error.permanent
    assert len(seen.headers) == 1


async def test_body_in_pieces_is_read_whole(issuer: IssuerClient, start: Start) -> None:
    """A response streamed in several writes is read to its end."""
    document = json.dumps(ANSWER | {"padding": "x" * 50_000}).encode()

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        for start_at in range(0, len(document), 4096):
            await response.write(document[start_at : start_at + 4096])
        await response.write_eof()
        return response

    grant = await issuer.fetch(make_client(), await start(stream), timeout=5.0)

    assert grant.access_token.reveal() == "tok-1"


async def test_body_cut_short_is_awaited_not_parsed(
    issuer: IssuerClient, start: Start, release: asyncio.Event
) -> None:
    """A body whose rest never comes times out; its first part is not parsed."""

    async def stall(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        await response.write(b'{"access_token": "tok-1", ')
        await release.wait()
        return response

    with pytest.raises(IssuerError) as caught:
        await issuer.fetch(make_client(), await start(stall), timeout=0.2)

    assert caught.value.reason == "timeout"


async def test_connection_refused(issuer: IssuerClient) -> None:
    """A port nobody listens on gives reason connection, naming the URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}{TOKEN_PATH}"

    error = await fail(issuer, Environment.model_validate({"token_url": url}))

    assert error.reason == "connection"
    assert error.message.startswith(f"cannot reach {url}: ")
    assert not error.permanent


async def test_no_answer_within_the_timeout(
    issuer: IssuerClient, start: Start, release: asyncio.Event
) -> None:
    """An issuer that never answers gives reason timeout after ``timeout``."""

    async def hang(request: web.Request) -> web.StreamResponse:
        await release.wait()
        return web.json_response(ANSWER)

    env = await start(hang)

    with pytest.raises(IssuerError) as caught:
        await issuer.fetch(make_client(), env, timeout=0.2)

    assert caught.value.reason == "timeout"
    assert caught.value.message.endswith("within 0.2s")


async def test_oversized_body_is_malformed(issuer: IssuerClient, start: Start) -> None:
    """An answer larger than MAX_BODY is refused unread."""

    async def huge(request: web.Request) -> web.StreamResponse:
        return web.Response(body=b"x" * (MAX_BODY + 10), content_type="text/plain")

    error = await fail(issuer, await start(huge))

    assert error.reason == "malformed_response"
    assert f"larger than {MAX_BODY} bytes" in error.message


async def test_oversized_stream_without_length_is_malformed(
    issuer: IssuerClient, start: Start
) -> None:
    """A chunked answer that goes past MAX_BODY is cut off and refused."""

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(MAX_BODY // 8192 + 2):
            await response.write(b" " * 8192)
        return response

    error = await fail(issuer, await start(endless))

    assert error.reason == "malformed_response"
    assert error.status == 200


# secret files


async def test_rotated_secret_file_is_used_by_the_next_request(
    issuer: IssuerClient, start: Start, seen: Seen, tmp_path: Path
) -> None:
    """The secret file is read per request, so a rotation needs no restart."""
    path = tmp_path / "client-secret"
    path.write_text("old-secret\n")
    client = make_client({"file": str(path)})
    env = await start(answer)

    await issuer.fetch(client, env, timeout=5.0)
    path.write_text("new-secret\n")
    await issuer.fetch(client, env, timeout=5.0)

    assert [basic_secret(h) for h in seen.headers] == ["old-secret", "new-secret"]


async def test_removed_secret_file_is_secret_unreadable(
    issuer: IssuerClient, start: Start, seen: Seen, tmp_path: Path
) -> None:
    """A secret file gone since start-up fails the request before it is sent."""
    path = tmp_path / "client-secret"
    path.write_text("old-secret\n")
    client = make_client({"file": str(path)})
    path.unlink()

    error = await fail(issuer, await start(answer), client)

    assert error.reason == "secret_unreadable"
    assert str(path) in error.message
    assert seen.headers == []


async def test_secret_path_turned_directory_is_secret_unreadable(
    issuer: IssuerClient, start: Start, tmp_path: Path
) -> None:
    """A secret path that is no longer a regular file is secret_unreadable."""
    path = tmp_path / "client-secret"
    path.write_text("old-secret\n")
    client = make_client({"file": str(path)})
    path.unlink()
    path.mkdir()

    error = await fail(issuer, await start(answer), client)

    assert error.reason == "secret_unreadable"
    assert error.message == f"cannot read {path}: Is a directory"


# TLS


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA and a server certificate for 127.0.0.1, made for this module."""
    return make_pki(tmp_path_factory.mktemp("pki"))


async def test_private_ca_without_ca_file_is_a_tls_error(
    issuer: IssuerClient, start: Start, pki: Pki, seen: Seen
) -> None:
    """An issuer behind a CA we do not trust fails as tls, saying what to do."""
    env = await start(answer, tls=pki.server)

    error = await fail(issuer, env)

    assert error.reason == "tls"
    assert error.message.startswith(f"TLS with {env.token_url} failed: ")
    assert "unable to get local issuer certificate" in error.message
    assert "set ca_file" in error.message
    assert seen.headers == []


async def test_private_ca_with_ca_file_succeeds(
    issuer: IssuerClient, start: Start, pki: Pki, seen: Seen
) -> None:
    """The environment's ca_file makes the private CA trusted."""
    env = await start(answer, tls=pki.server, ca_file=pki.ca_file)

    grant = await issuer.fetch(make_client(), env, timeout=5.0)

    assert grant.access_token.reveal() == "tok-1"
    assert len(seen.headers) == 1


async def test_broken_ca_file_is_a_tls_error(
    issuer: IssuerClient, start: Start, pki: Pki, tmp_path: Path
) -> None:
    """A CA bundle replaced by garbage since start-up fails as tls, not a crash."""
    bundle = tmp_path / "ca.pem"
    shutil.copy(pki.ca_file, bundle)
    env = await start(answer, tls=pki.server, ca_file=bundle)
    bundle.write_text("not a certificate\n")

    error = await fail(issuer, env)

    assert error.reason == "tls"
    assert f"cannot load the CA bundle {bundle}" in error.message


def test_a_steady_skew_is_logged_once() -> None:
    """A skew that wobbles by the Date header's second is not news again."""
    metrics = Metrics()
    observe = skew_observer(metrics, warn_at=30.0)

    with capture_logs() as logs:
        for skew in (45.2, 44.6, 45.4, 44.9, 51.0, 10.0, -40.0):
            observe("prod", skew)

    warned = [entry["skew"] for entry in logs if entry["event"] == "issuer.clock_skew"]
    assert warned == [45, 51, -40]
    assert (
        metrics.registry.get_sample_value(
            "token_broker_issuer_clock_skew_seconds", {"environment": "prod"}
        )
        == -40.0
    )
