"""TLS to issuers: private CAs, the dev issuer behind TLS, and mutual TLS."""

from __future__ import annotations

import os
import shutil
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from pydantic import ValidationError
from pytest_aiohttp import AiohttpServer

from broker import devissuer
from broker.config import Client, ClientCert, DevIssuer, Environment
from broker.errors import IssuerError
from broker.issuer import IssuerClient
from broker.transport import TlsContexts, client_session
from tests.pki import Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
async def tls_issuer(pki: Pki) -> AsyncIterator[devissuer.DevIssuerServer]:
    """The dev issuer serving https with a certificate from the test CA."""
    settings = DevIssuer.model_validate(
        {
            "listen": "127.0.0.1:0",
            "tls": {"cert": str(pki.cert_file), "key": str(pki.key_file)},
            "clients": {"svc": {"secret": "tls-secret-1"}},
        }
    )
    server = await devissuer.start(settings, port=0)
    yield server
    await server.close()


def secret_client(**fields: object) -> Client:
    data: dict[str, object] = {
        "environment": "dev",
        "client_id": "svc",
        "client_secret": "tls-secret-1",
    }
    return Client.model_validate(data | fields)


async def test_dev_issuer_behind_tls_with_its_ca(
    tls_issuer: devissuer.DevIssuerServer, pki: Pki
) -> None:
    """With the test CA as ca_file, the broker gets a token over https."""
    env = Environment.model_validate(
        {"token_url": tls_issuer.token_url, "ca_file": str(pki.ca_file)}
    )
    assert tls_issuer.token_url.startswith("https://127.0.0.1:")

    async with client_session() as session:
        grant = await IssuerClient(session).fetch(secret_client(), env, timeout=5.0)

    assert grant.access_token.reveal().count(".") == 2


async def test_an_unknown_ca_fails_with_a_clear_reason(
    tls_issuer: devissuer.DevIssuerServer,
) -> None:
    """Without the CA the handshake fails as ``tls``, and says what to do."""
    env = Environment.model_validate({"token_url": tls_issuer.token_url})

    async with client_session() as session:
        with pytest.raises(IssuerError) as caught:
            await IssuerClient(session).fetch(secret_client(), env, timeout=5.0)

    assert caught.value.reason == "tls"
    assert "unable to get local issuer certificate" in caught.value.message
    assert "set ca_file" in caught.value.message


async def test_discovery_over_tls(
    tls_issuer: devissuer.DevIssuerServer, pki: Pki
) -> None:
    """Discovery uses the environment's CA for the metadata too."""
    env = Environment.model_validate(
        {"issuer": tls_issuer.url, "ca_file": str(pki.ca_file)}
    )

    async with client_session() as session:
        grant = await IssuerClient(session).fetch(secret_client(), env, timeout=5.0)

    assert grant.expires_in == 3600


@pytest.fixture
async def mtls_issuer(pki: Pki, aiohttp_server: AiohttpServer) -> tuple[str, list[str]]:
    """An issuer that demands a client certificate and records its subject."""
    subjects: list[str] = []

    async def token(request: web.Request) -> web.StreamResponse:
        transport = request.transport
        assert transport is not None
        peer = transport.get_extra_info("peercert") or {}
        subject = dict(item[0] for item in peer.get("subject", ()))
        subjects.append(subject.get("commonName", ""))
        form = await request.post()
        assert "client_secret" not in form
        return web.json_response(
            {"access_token": f"mtls-{form.get('client_id')!s}", "expires_in": 300}
        )

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.cert_file, pki.key_file)
    context.load_verify_locations(cafile=pki.ca_file)
    context.verify_mode = ssl.CERT_REQUIRED
    app = web.Application()
    app.router.add_post("/token", token)
    server = await aiohttp_server(app, ssl=context)
    return f"https://127.0.0.1:{server.port}/token", subjects


def mtls_client(pki: Pki, folder: Path | None = None) -> Client:
    cert, key = pki.client_cert_file, pki.client_key_file
    if folder is not None:
        cert = Path(shutil.copy(cert, folder / "tls.crt"))
        key = Path(shutil.copy(key, folder / "tls.key"))
    return Client.model_validate(
        {
            "environment": "dev",
            "client_id": "m2m-client",
            "auth": "tls_client_auth",
            "client_cert": {"cert": {"file": str(cert)}, "key": {"file": str(key)}},
        }
    )


async def test_tls_client_auth_presents_the_certificate(
    mtls_issuer: tuple[str, list[str]], pki: Pki
) -> None:
    """RFC 8705: the certificate authenticates, client_id in the body, no secret."""
    url, subjects = mtls_issuer
    env = Environment.model_validate({"token_url": url, "ca_file": str(pki.ca_file)})

    async with client_session() as session:
        grant = await IssuerClient(session).fetch(mtls_client(pki), env, timeout=5.0)

    assert grant.access_token.reveal() == "mtls-m2m-client"
    assert subjects == ["m2m-client"]


async def test_without_a_client_certificate_the_handshake_is_refused(
    mtls_issuer: tuple[str, list[str]], pki: Pki
) -> None:
    """A server demanding a certificate refuses a client without one."""
    url, subjects = mtls_issuer
    env = Environment.model_validate({"token_url": url, "ca_file": str(pki.ca_file)})

    async with client_session() as session:
        with pytest.raises(IssuerError) as caught:
            await IssuerClient(session).fetch(secret_client(), env, timeout=5.0)

    assert caught.value.reason in ("tls", "connection")
    assert subjects == []


def test_a_rotated_client_certificate_gets_a_new_context(
    pki: Pki, tmp_path: Path
) -> None:
    """When the certificate's content changes, the TLS context is rebuilt."""
    client = mtls_client(pki, tmp_path)
    assert client.client_cert is not None
    contexts = TlsContexts()

    first = contexts.get(str(pki.ca_file), client.client_cert)
    again = contexts.get(str(pki.ca_file), client.client_cert)
    (tmp_path / "newer").mkdir()
    newer = make_pki(tmp_path / "newer")
    stamp = os.stat(tmp_path / "tls.crt").st_mtime_ns
    shutil.copy(newer.client_cert_file, tmp_path / "tls.crt")
    shutil.copy(newer.client_key_file, tmp_path / "tls.key")
    # A volume swap may keep the old times: the content decides.
    os.utime(tmp_path / "tls.crt", ns=(stamp, stamp))
    rotated = contexts.get(str(pki.ca_file), client.client_cert)

    assert first is again
    assert rotated is not first


def test_a_broken_client_certificate_names_the_file(pki: Pki, tmp_path: Path) -> None:
    """A certificate replaced by garbage fails as a TLS error naming it."""
    client = mtls_client(pki, tmp_path)
    assert client.client_cert is not None
    (tmp_path / "tls.crt").write_text("-----BEGIN CERTIFICATE-----\nnope\n")

    with pytest.raises(Exception, match=r"cannot load the client certificate"):
        TlsContexts().get(None, client.client_cert)


def test_a_rotated_ca_bundle_gets_a_new_context(pki: Pki, tmp_path: Path) -> None:
    """A CA bundle replaced on disk (same path) is trusted at the next request."""
    bundle = tmp_path / "ca.pem"
    shutil.copy(pki.ca_file, bundle)
    contexts = TlsContexts()
    first = contexts.get(str(bundle))
    (tmp_path / "other").mkdir()
    shutil.copy(make_pki(tmp_path / "other").ca_file, bundle)

    assert contexts.get(str(bundle)) is not first


def test_an_encrypted_client_key_is_a_config_error(pki: Pki, tmp_path: Path) -> None:
    """An encrypted key fails at load, and never prompts for a passphrase."""
    key = serialization.load_pem_private_key(
        pki.client_key_file.read_bytes(), password=None
    )
    (tmp_path / "enc.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )

    with pytest.raises(ValidationError, match="matching unencrypted PEM key"):
        ClientCert.model_validate(
            {"cert": str(pki.client_cert_file), "key": str(tmp_path / "enc.key")}
        )
