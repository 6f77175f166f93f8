"""The broker's clients against the real dev issuer, in one process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import jwt
import pytest

from broker import devissuer
from broker.config import DevIssuer
from broker.errors import TokenUnavailable
from broker.issuer import IssuerClient, client_session
from broker.loader import load_text
from broker.metrics import Metrics
from broker.registry import Registry, issuer_fetch
from tests.fakes import FakeClock

ISSUER = DevIssuer.model_validate(
    {
        "listen": "127.0.0.1:0",
        "token_lifetime": "15m",
        "clients": {
            "svc": {"secret": "svc secret:+%/é", "scopes": ["chat:invoke", "x:y"]},
        },
    }
)


@dataclass
class Running:
    registry: Registry
    metrics: Metrics
    issuer: devissuer.DevIssuerServer


def config_text(url: str) -> str:
    def client(name: str, **keys: str) -> str:
        body = ", ".join(f"{key}: {value}" for key, value in keys.items())
        return (
            f"  {name}: {{environment: dev, client_id: svc, "
            f"client_secret: {{env: SVC}}, {body}}}\n"
        )

    return (
        f"environments: {{dev: {{token_url: '{url}'}}}}\n"
        "clients:\n"
        + client("basic_form", scopes="[chat:invoke]")
        + client("post_form", scopes="[x:y]", auth="client_secret_post")
        + client("basic_json", scopes="[chat:invoke]", encoding="json")
        + client(
            "post_json",
            scopes="[chat:invoke, x:y]",
            auth="client_secret_post",
            encoding="json",
            audience="https://api.example.com",
        )
        + client("bad_scope", scopes="[admin]")
        + "  wrong_secret: {environment: dev, client_id: svc, "
        "client_secret: not-the-secret}\n"
    )


@pytest.fixture
async def running() -> AsyncIterator[Running]:
    issuer = await devissuer.start(ISSUER, port=0)
    config = load_text(
        config_text(issuer.token_url), "it.yaml", {"SVC": "svc secret:+%/é"}
    ).config
    metrics = Metrics()
    async with client_session() as session:
        registry = Registry(
            config,
            issuer_fetch(IssuerClient(session), config),
            clock=FakeClock(),
            metrics=metrics,
        )
        yield Running(registry, metrics, issuer)
        await registry.stop()
    await issuer.close()


async def keys(url: str) -> jwt.PyJWKSet:
    async with (
        aiohttp.ClientSession() as session,
        session.get(url + devissuer.JWKS_PATH) as answer,
    ):
        return jwt.PyJWKSet.from_dict(await answer.json())


@pytest.mark.parametrize(
    ("name", "scope", "audience"),
    [
        ("basic_form", "chat:invoke", "token-broker-dev"),
        ("post_form", "x:y", "token-broker-dev"),
        ("basic_json", "chat:invoke", "token-broker-dev"),
        ("post_json", "chat:invoke x:y", "https://api.example.com"),
    ],
)
async def test_every_auth_method_and_body_gets_a_verified_token(
    running: Running, name: str, scope: str, audience: str
) -> None:
    """Each auth method and body encoding gets a JWT that verifies."""
    refresher = running.registry.refreshers[name]

    token = await refresher.get()
    key_set = await keys(running.issuer.url)
    claims = jwt.decode(
        token.value.reveal(),
        key_set.keys[0],
        algorithms=["RS256"],
        audience=audience,
        issuer=running.issuer.url,
    )

    assert claims["sub"] == "svc"
    assert claims["scope"] == scope
    assert token.scope == scope
    assert token.lifetime == 900


@pytest.mark.parametrize(
    ("name", "reason"),
    [("bad_scope", "invalid_scope"), ("wrong_secret", "invalid_client")],
)
async def test_refusals_are_classified(
    running: Running, name: str, reason: str
) -> None:
    """The issuer's refusals end in their reason, permanent, and counted."""
    refresher = running.registry.refreshers[name]

    with pytest.raises(TokenUnavailable) as caught:
        await refresher.get()

    assert caught.value.reason == reason
    assert refresher.last_error is not None
    assert refresher.last_error.permanent
    counted = running.metrics.registry.get_sample_value(
        "token_broker_refresh_total",
        {
            "client": name,
            "environment": "dev",
            "result": "failure",
            "reason": reason,
        },
    )
    assert counted == 1
