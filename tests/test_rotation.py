"""Secret rotation without a restart, the way Kubernetes updates a volume."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from broker import devissuer
from broker.config import DevIssuer
from broker.errors import IssuerError, TokenUnavailable
from broker.issuer import IssuerClient
from broker.loader import load_text
from broker.metrics import Metrics
from broker.refresh import CREDENTIAL_CHECK_EVERY
from broker.registry import Registry, issuer_fetch
from broker.transport import client_session
from tests.fakes import FakeClock, settle


class SecretVolume:
    """A directory laid out as kubelet lays out a secret volume.

    ``client-secret -> ..data/client-secret`` and ``..data -> ..<version>``;
    an update writes a new version directory and swaps ``..data`` in one
    rename, so readers see the old file or the new one, never a mix.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.version = 0

    def write(self, secret: str) -> None:
        self.version += 1
        target = self.root / f"..v{self.version}"
        target.mkdir()
        (target / "client-secret").write_text(secret + "\n")
        staged = self.root / "..data_tmp"
        staged.symlink_to(target.name)
        os.replace(staged, self.root / "..data")
        link = self.root / "client-secret"
        if not link.is_symlink():
            link.symlink_to("..data/client-secret")

    @property
    def path(self) -> Path:
        return self.root / "client-secret"


@pytest.fixture
def volume(tmp_path: Path) -> SecretVolume:
    return SecretVolume(tmp_path)


def config_for(url: str, volume: SecretVolume) -> str:
    return (
        f"environments: {{dev: {{token_url: '{url}'}}}}\n"
        "clients:\n"
        f"  svc: {{environment: dev, client_id: svc, "
        f"client_secret: {{file: {volume.path}}}}}\n"
    )


@pytest.fixture
async def issuer_server() -> AsyncIterator[devissuer.DevIssuerServer]:
    """The dev issuer, already knowing only the new secret."""
    settings = DevIssuer.model_validate(
        {"listen": "127.0.0.1:0", "clients": {"svc": {"secret": "new-secret-2"}}}
    )
    server = await devissuer.start(settings, port=0)
    yield server
    await server.close()


async def test_a_refused_client_retries_as_soon_as_the_volume_swaps(
    volume: SecretVolume, issuer_server: devissuer.DevIssuerServer
) -> None:
    """invalid_client waits long, but a rotated secret is tried within seconds."""
    volume.write("old-secret-1")
    config = load_text(config_for(issuer_server.token_url, volume), "r.yaml", {})
    clock = FakeClock()
    async with client_session() as session:
        registry = Registry(
            config.config,
            issuer_fetch(IssuerClient(session), config.config),
            clock=clock,
            metrics=Metrics(),
        )
        refresher = registry.refreshers["svc"]
        registry.start()
        try:
            with pytest.raises(TokenUnavailable) as refused:
                await refresher.get()
            assert refused.value.reason == "invalid_client"
            assert refresher.next_attempt - clock.now() >= 500

            await clock.advance(CREDENTIAL_CHECK_EVERY)
            assert refresher.state() == "expired"
            volume.write("new-secret-2")
            await clock.advance(CREDENTIAL_CHECK_EVERY)
            await settle()
            token = await refresher.get()
        finally:
            await registry.stop()

    assert token.value.reveal().count(".") == 2
    assert refresher.failures == 0


async def test_a_rotation_during_the_request_is_retried_at_once(
    volume: SecretVolume, aiohttp_server: AiohttpServer
) -> None:
    """A refusal of a secret that changed meanwhile is retried immediately."""
    volume.write("old-secret-1")
    seen: list[str] = []

    async def token(request: web.Request) -> web.StreamResponse:
        form = await request.post()
        seen.append(str(form["client_secret"]))
        if form["client_secret"] != "new-secret-2":
            volume.write("new-secret-2")
            return web.json_response({"error": "invalid_client"}, status=401)
        return web.json_response({"access_token": "rotated", "expires_in": 60})

    app = web.Application()
    app.router.add_post("/token", token)
    server = await aiohttp_server(app)
    text = config_for(f"http://127.0.0.1:{server.port}/token", volume).replace(
        "client_id: svc,", "client_id: svc, auth: client_secret_post,"
    )
    client = load_text(text, "r.yaml", {}).config.clients["svc"]
    env = load_text(text, "r.yaml", {}).config.environments["dev"]

    async with client_session() as session:
        grant = await IssuerClient(session).fetch(client, env, timeout=5.0)

    assert grant.access_token.reveal() == "rotated"
    assert seen == ["old-secret-1", "new-secret-2"]


async def test_an_unchanged_secret_is_not_retried(
    volume: SecretVolume, aiohttp_server: AiohttpServer
) -> None:
    """A refusal with the same secret still on disk is final for this round."""
    volume.write("old-secret-1")
    calls: list[int] = []

    async def token(request: web.Request) -> web.StreamResponse:
        calls.append(1)
        return web.json_response({"error": "invalid_client"}, status=401)

    app = web.Application()
    app.router.add_post("/token", token)
    server = await aiohttp_server(app)
    loaded = load_text(
        config_for(f"http://127.0.0.1:{server.port}/token", volume), "r.yaml", {}
    ).config

    async with client_session() as session:
        with pytest.raises(IssuerError, match="invalid_client"):
            await IssuerClient(session).fetch(
                loaded.clients["svc"], loaded.environments["dev"], timeout=5.0
            )

    assert calls == [1]
