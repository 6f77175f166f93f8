"""Issuer discovery: RFC 8414 metadata first, OpenID Connect as a fallback."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pytest_aiohttp import AiohttpServer

from broker import devissuer
from broker.config import Client, DevIssuer, Environment
from broker.discovery import (
    Discovery,
    Metadata,
    check_method,
    metadata_urls,
    read_metadata,
)
from broker.errors import IssuerError
from broker.issuer import IssuerClient
from broker.transport import client_session

TLS = ssl.create_default_context()


def test_well_known_urls_for_an_issuer_without_path() -> None:
    """RFC 8414 first, then OpenID Connect, for a bare host."""
    assert metadata_urls("https://auth.example.com") == [
        "https://auth.example.com/.well-known/oauth-authorization-server",
        "https://auth.example.com/.well-known/openid-configuration",
    ]


def test_well_known_urls_for_an_issuer_with_a_path() -> None:
    """RFC 8414 inserts the well-known segment before the path; OIDC appends."""
    assert metadata_urls("https://auth.example.com/tenant/a/") == [
        "https://auth.example.com/.well-known/oauth-authorization-server/tenant/a",
        "https://auth.example.com/tenant/a/.well-known/openid-configuration",
    ]


def document(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "issuer": "https://auth.example.com",
        "token_endpoint": "https://auth.example.com/oauth2/token",
        "token_endpoint_auth_methods_supported": [
            "client_secret_basic",
            "private_key_jwt",
        ],
        "token_endpoint_auth_signing_alg_values_supported": ["RS256"],
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def read(doc: dict[str, Any]) -> Metadata:
    return read_metadata(doc, "https://auth.example.com", "the document")


def test_a_good_document_is_read() -> None:
    """The token endpoint, methods and algorithms come from the document."""
    metadata = read(document())

    assert metadata.token_endpoint == "https://auth.example.com/oauth2/token"
    assert metadata.auth_methods == ("client_secret_basic", "private_key_jwt")
    assert metadata.signing_algs == ("RS256",)


@pytest.mark.parametrize(
    ("doc", "fragment"),
    [
        (document(issuer="https://evil.example.com"), "names issuer"),
        (document(issuer=None), "names issuer"),
        (document(token_endpoint=None), "has no token_endpoint"),
        (document(token_endpoint="http://auth.example.com/t"), "plain http"),
    ],
)
def test_unusable_documents_are_permanent_failures(
    doc: dict[str, Any], fragment: str
) -> None:
    """A document for another issuer, or without a safe endpoint, is refused."""
    with pytest.raises(IssuerError, match=fragment) as caught:
        read(doc)

    assert caught.value.reason == "discovery_failed"
    assert caught.value.permanent


def test_methods_default_to_client_secret_basic() -> None:
    """RFC 8414 2: no list means client_secret_basic only."""
    metadata = read(document(token_endpoint_auth_methods_supported=None))

    assert metadata.auth_methods == ("client_secret_basic",)
    with pytest.raises(IssuerError, match="offers: client_secret_basic"):
        check_method(metadata, "client_secret_post", None)


def test_an_unoffered_method_or_algorithm_is_refused() -> None:
    """The configured method, and a private_key_jwt algorithm, must be offered."""
    metadata = read(document())

    check_method(metadata, "private_key_jwt", "RS256")
    with pytest.raises(IssuerError, match="does not offer auth tls_client_auth"):
        check_method(metadata, "tls_client_auth", None)
    with pytest.raises(IssuerError, match="does not accept ES256"):
        check_method(metadata, "private_key_jwt", "ES256")


@dataclass
class MetadataServer:
    """Serves metadata documents at chosen paths and counts requests."""

    documents: dict[str, dict[str, Any]] = field(default_factory=dict)
    hits: list[str] = field(default_factory=list)
    gate: asyncio.Event | None = None
    url: str = ""


@pytest.fixture
async def metadata_server(
    aiohttp_server: AiohttpServer,
) -> AsyncIterator[MetadataServer]:
    state = MetadataServer()

    async def serve(request: web.Request) -> web.StreamResponse:
        state.hits.append(request.path)
        if state.gate is not None:
            await state.gate.wait()
        doc = state.documents.get(request.path)
        if doc is None:
            return web.json_response({"error": "not found"}, status=404)
        return web.json_response(doc)

    app = web.Application()
    app.router.add_get("/{tail:.*}", serve)
    server = await aiohttp_server(app)
    state.url = f"http://127.0.0.1:{server.port}"
    yield state
    if state.gate is not None:
        state.gate.set()


def local_document(url: str) -> dict[str, Any]:
    return document(issuer=url, token_endpoint=f"{url}/token")


@pytest.fixture
async def discovery() -> AsyncIterator[Discovery]:
    async with client_session() as session:
        yield Discovery(session)


async def test_rfc8414_document_is_found_and_cached(
    discovery: Discovery, metadata_server: MetadataServer
) -> None:
    """The RFC 8414 location is tried first; a second look uses the cache."""
    url = metadata_server.url
    metadata_server.documents["/.well-known/oauth-authorization-server"] = (
        local_document(url)
    )

    first = await discovery.metadata(url, TLS)
    second = await discovery.metadata(url, TLS)

    assert first == second
    assert first.token_endpoint == f"{url}/token"
    assert metadata_server.hits == ["/.well-known/oauth-authorization-server"]


async def test_openid_configuration_is_the_fallback(
    discovery: Discovery, metadata_server: MetadataServer
) -> None:
    """Without RFC 8414 metadata, the OpenID Connect document is used."""
    url = metadata_server.url
    metadata_server.documents["/.well-known/openid-configuration"] = local_document(url)

    metadata = await discovery.metadata(url, TLS)

    assert metadata.source == f"{url}/.well-known/openid-configuration"


async def test_no_document_explains_where_it_looked(
    discovery: Discovery, metadata_server: MetadataServer
) -> None:
    """When both locations fail, the error names each URL and its answer."""
    url = metadata_server.url

    with pytest.raises(IssuerError) as caught:
        await discovery.metadata(url, TLS)

    assert caught.value.reason == "discovery_failed"
    assert not caught.value.permanent
    assert f"{url}/.well-known/oauth-authorization-server: status 404" in str(
        caught.value
    )
    assert f"{url}/.well-known/openid-configuration: status 404" in str(caught.value)


async def test_concurrent_lookups_share_one_fetch(
    discovery: Discovery, metadata_server: MetadataServer
) -> None:
    """Many clients of one issuer starting together fetch its metadata once."""
    url = metadata_server.url
    metadata_server.documents["/.well-known/oauth-authorization-server"] = (
        local_document(url)
    )
    metadata_server.gate = asyncio.Event()

    lookups = [asyncio.create_task(discovery.metadata(url, TLS)) for _ in range(5)]
    await asyncio.sleep(0)
    metadata_server.gate.set()
    results = await asyncio.gather(*lookups)

    assert len(set(results)) == 1
    assert len(metadata_server.hits) == 1


async def test_a_stale_document_serves_while_the_issuer_is_down(
    metadata_server: MetadataServer,
) -> None:
    """Past its cache time, a failed refetch falls back to the old document."""
    url = metadata_server.url
    path = "/.well-known/oauth-authorization-server"
    metadata_server.documents[path] = local_document(url)
    now = [0.0]
    async with client_session() as session:
        discovery = Discovery(session, cache_seconds=60, clock=lambda: now[0])
        first = await discovery.metadata(url, TLS)
        del metadata_server.documents[path]
        now[0] = 90.0

        stale = await discovery.metadata(url, TLS)
        now[0] = 150.0
        with pytest.raises(IssuerError):
            await discovery.metadata(url, TLS)

    assert stale == first


async def test_tokens_through_discovery_of_the_dev_issuer() -> None:
    """An environment with ``issuer:`` gets tokens from the discovered endpoint."""
    settings = DevIssuer.model_validate(
        {"listen": "127.0.0.1:0", "clients": {"svc": {"secret": "s3cret-value"}}}
    )
    server = await devissuer.start(settings, port=0)
    env = Environment.model_validate({"issuer": server.url})
    post = Client.model_validate(
        {
            "environment": "dev",
            "client_id": "svc",
            "client_secret": "s3cret-value",
            "auth": "client_secret_post",
        }
    )
    mtls = post.model_copy(update={"auth": "tls_client_auth"})
    try:
        async with client_session() as session:
            issuer = IssuerClient(session)
            grant = await issuer.fetch(post, env, timeout=5.0)
            with pytest.raises(IssuerError, match="does not offer auth tls_client"):
                await issuer.fetch(mtls, env, timeout=5.0)
    finally:
        await server.close()

    assert grant.access_token.reveal().count(".") == 2


def test_an_https_issuer_may_not_point_to_plain_http() -> None:
    """No downgrade: an https issuer's token endpoint must be https."""
    with pytest.raises(IssuerError, match="must be https too"):
        read_metadata(
            document(token_endpoint="http://127.0.0.1:9/token"),
            "https://auth.example.com",
            "the document",
        )


async def test_each_trust_setting_looks_the_issuer_up_itself(
    discovery: Discovery, metadata_server: MetadataServer
) -> None:
    """Environments with different CA bundles do not share a look-up."""
    url = metadata_server.url
    metadata_server.documents["/.well-known/oauth-authorization-server"] = (
        local_document(url)
    )

    await discovery.metadata(url, TLS, trust="/etc/a.pem")
    await discovery.metadata(url, TLS, trust=None)
    await discovery.metadata(url, TLS, trust="/etc/a.pem")

    assert len(metadata_server.hits) == 2


async def test_deeply_nested_metadata_is_not_a_crash(
    discovery: Discovery, metadata_server: MetadataServer, aiohttp_server: AiohttpServer
) -> None:
    """A document nested past Python's stack is "not JSON", not a bug."""

    async def nested(request: web.Request) -> web.Response:
        return web.Response(text='{"a":' + "[" * 200_000)

    app = web.Application()
    app.router.add_get("/{tail:.*}", nested)
    server = await aiohttp_server(app)

    with pytest.raises(IssuerError, match="not JSON") as caught:
        await discovery.metadata(f"http://127.0.0.1:{server.port}", TLS)

    assert caught.value.reason == "discovery_failed"


async def test_a_moved_token_endpoint_is_discovered_again(
    metadata_server: MetadataServer, aiohttp_server: AiohttpServer
) -> None:
    """A 404 from the discovered endpoint drops the cached metadata."""
    calls: list[str] = []

    async def token(request: web.Request) -> web.Response:
        calls.append(request.path)
        if request.path == "/old":
            return web.json_response({"error": "gone"}, status=404)
        return web.json_response({"access_token": "moved", "expires_in": 60})

    app = web.Application()
    app.router.add_post("/{tail:.*}", token)
    endpoint = await aiohttp_server(app)
    url = metadata_server.url
    path = "/.well-known/oauth-authorization-server"
    metadata_server.documents[path] = document(
        issuer=url, token_endpoint=f"http://127.0.0.1:{endpoint.port}/old"
    )
    env = Environment.model_validate({"issuer": url})
    client = Client.model_validate(
        {"environment": "d", "client_id": "c", "client_secret": "s3cret-value"}
    )

    async with client_session() as session:
        issuer = IssuerClient(session)
        with pytest.raises(IssuerError):
            await issuer.fetch(client, env, timeout=5.0)
        metadata_server.documents[path] = document(
            issuer=url, token_endpoint=f"http://127.0.0.1:{endpoint.port}/new"
        )
        grant = await issuer.fetch(client, env, timeout=5.0)

    assert grant.access_token.reveal() == "moved"
    assert calls == ["/old", "/new"]
    assert len(metadata_server.hits) == 2


async def test_the_keys_own_algorithm_is_checked_against_the_issuer(
    metadata_server: MetadataServer, tmp_path: Path
) -> None:
    """With signing_alg unset, an EC key makes ES256, which the issuer must list."""
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "k.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    url = metadata_server.url
    metadata_server.documents["/.well-known/oauth-authorization-server"] = (
        local_document(url)
    )
    env = Environment.model_validate({"issuer": url})
    client = Client.model_validate(
        {
            "environment": "d",
            "client_id": "c",
            "auth": "private_key_jwt",
            "private_key": {"file": str(tmp_path / "k.pem")},
        }
    )

    async with client_session() as session:
        with pytest.raises(IssuerError, match="does not accept ES256"):
            await IssuerClient(session).fetch(client, env, timeout=5.0)
