"""The broker against npm ``oidc-provider``, a real third-party OAuth server.

One peer serves the whole module; each test uses client ids of its own, so
what the peer recorded for a client id is that test's traffic alone.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from prometheus_client.parser import text_string_to_metric_families

from broker.errors import TokenUnavailable
from broker.issuer import IssuerClient, client_session
from broker.loader import load_text
from broker.metrics import Metrics
from broker.registry import Registry, issuer_fetch
from tests import peer as oidc
from tests import process
from tests.fakes import FakeClock

TTL = 900
API = "https://api.example.com"
FILES = "https://files.example.com"
# Declared scopes: only then is a client's own `scope` an allow-list.
SCOPES = ["chat:invoke", "chat:read", "files:write", "admin"]
# Characters RFC 6749 2.3.1 form-encodes before Base64. oidc-provider takes
# printable ASCII only in a secret, so nothing beyond it is tried here.
BASIC_SECRET = "basic s3cret:+%/&=~Q1"
POST_SECRET = "post-s3cret+%&=~W2"
REAL_SECRET = "the-registered-secret-E3"
WRONG_SECRET = "not-the-registered-secret-R4"
FORM = "application/x-www-form-urlencoded"
GUARD = {"Token-Broker": "1"}

BASIC = "client_secret_basic"
POST = "client_secret_post"
KEY_JWT = "private_key_jwt"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# client_id: (registered method, allowed scopes, registered secret)
PEER_CLIENTS = {
    "it-basic": (BASIC, "chat:invoke chat:read", BASIC_SECRET),
    "it-post": (POST, "chat:invoke files:write", POST_SECRET),
    "it-json": (POST, "chat:invoke", POST_SECRET),
    "it-wrong": (BASIC, "chat:read", REAL_SECRET),
    "it-scope": (BASIC, "chat:read", BASIC_SECRET),
    "it-target": (BASIC, "chat:read", BASIC_SECRET),
    "it-undeclared": (BASIC, "chat:read", BASIC_SECRET),
    "e2e-basic": (BASIC, "chat:invoke", BASIC_SECRET),
    "e2e-post": (POST, "files:write", POST_SECRET),
    "e2e-wrong": (BASIC, "chat:read", REAL_SECRET),
    "e2e-scope": (BASIC, "chat:read", BASIC_SECRET),
}
SECRETS = {"BASIC": BASIC_SECRET, "POST": POST_SECRET, "WRONG": WRONG_SECRET}
# private_key_jwt clients: client_id -> the public key registered for it.
# it-key-wrong signs with the "rsa" key, which the peer does not know it by.
KEY_CLIENTS = {
    "it-rs256": "rsa",
    "it-es256": "ec",
    "it-key-wrong": "other",
    "e2e-es256": "ec",
}
# The RSA key is registered under this kid and the broker told to send it;
# the EC key under its RFC 7638 thumbprint, the kid the broker sends unless
# told otherwise. oidc-provider matches a kid in the assertion strictly: a
# key registered without one is not found.
RSA_KID = "rsa-2026"


def thumbprint(jwk: dict[str, Any]) -> str:
    """The RFC 7638 SHA-256 thumbprint of an EC public JWK."""
    members = {name: jwk[name] for name in ("crv", "kty", "x", "y")}
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True)
    digest = hashlib.sha256(canonical.encode()).digest()

    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


@dataclass(frozen=True)
class Keys:
    """Client key pairs: private PEM files, and public JWKs for the peer."""

    directory: Path
    public: dict[str, dict[str, Any]]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    """An RSA 2048 and an EC P-256 client key, and one the peer never trusts."""
    directory = tmp_path_factory.mktemp("keys")
    made: dict[str, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey] = {
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ec": ec.generate_private_key(ec.SECP256R1()),
        "other": rsa.generate_private_key(public_exponent=65537, key_size=2048),
    }
    public: dict[str, dict[str, Any]] = {}
    for name, key in made.items():
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        (directory / f"{name}.pem").write_bytes(pem)
        if isinstance(key, rsa.RSAPrivateKey):
            jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
            public[name] = {**jwk, "kid": RSA_KID, "alg": "RS256", "use": "sig"}
        else:
            jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
            public[name] = {**jwk, "kid": thumbprint(jwk), "alg": "ES256", "use": "sig"}

    return Keys(directory, public)


def peer_config(keys: Keys) -> dict[str, Any]:
    """What server.mjs is started with: every client any test uses."""
    clients: list[dict[str, Any]] = [
        {
            "client_id": client_id,
            "client_secret": secret,
            "token_endpoint_auth_method": method,
            "scope": scope,
        }
        for client_id, (method, scope, secret) in PEER_CLIENTS.items()
    ]
    clients += [
        {
            "client_id": client_id,
            "token_endpoint_auth_method": KEY_JWT,
            "jwks": {"keys": [keys.public[registered]]},
            "scope": "chat:invoke",
        }
        for client_id, registered in KEY_CLIENTS.items()
    ]

    return {"ttl": TTL, "scopes": SCOPES, "resources": [API, FILES], "clients": clients}


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Iterator[oidc.Peer]:
    """One oidc-provider for the module, stopped by PID at the end."""
    try:
        running = oidc.start(peer_config(keys), tmp_path_factory.mktemp("peer"))
    except oidc.PeerUnavailable as exc:
        pytest.fail(str(exc))
    yield running
    assert running.stop() == 0, running.log()


@dataclass
class Running:
    registry: Registry
    metrics: Metrics


IN_PROCESS = """
environments: {{peer: {{token_url: "{url}"}}}}
clients:
  basic:
    environment: peer
    client_id: it-basic
    client_secret: {{env: BASIC}}
    scopes: [chat:invoke, chat:read]
    resource: {files}
  post:
    environment: peer
    client_id: it-post
    client_secret: {{env: POST}}
    auth: client_secret_post
    scopes: [files:write]
    resource: {api}
  json:
    environment: peer
    client_id: it-json
    client_secret: {{env: POST}}
    auth: client_secret_post
    encoding: json
    scopes: [chat:invoke]
  wrong_secret:
    environment: peer
    client_id: it-wrong
    client_secret: {{env: WRONG}}
    scopes: [chat:read]
  bad_scope:
    environment: peer
    client_id: it-scope
    client_secret: {{env: BASIC}}
    scopes: [admin]
  bad_resource:
    environment: peer
    client_id: it-target
    client_secret: {{env: BASIC}}
    resource: https://elsewhere.example.com
  undeclared:
    environment: peer
    client_id: it-undeclared
    client_secret: {{env: BASIC}}
    scopes: [chat:read, nonsense:x]
  rs256:
    environment: peer
    client_id: it-rs256
    auth: private_key_jwt
    private_key: {{file: {keys}/rsa.pem}}
    signing_alg: RS256
    key_id: {kid}
    scopes: [chat:invoke]
  es256:
    environment: peer
    client_id: it-es256
    auth: private_key_jwt
    private_key: {{file: {keys}/ec.pem}}
    signing_alg: ES256
    scopes: [chat:invoke]
  key_wrong:
    environment: peer
    client_id: it-key-wrong
    auth: private_key_jwt
    private_key: {{file: {keys}/rsa.pem}}
    key_id: {kid}
    scopes: [chat:invoke]
"""


@pytest.fixture
async def running(peer: oidc.Peer, keys: Keys) -> AsyncIterator[Running]:
    """The broker's registry and issuer client, in this process."""
    text = IN_PROCESS.format(
        url=peer.token_url, api=API, files=FILES, keys=keys.directory, kid=RSA_KID
    )
    config = load_text(text, "peer.yaml", SECRETS).config
    metrics = Metrics()

    async with client_session() as session:
        registry = Registry(
            config,
            issuer_fetch(IssuerClient(session), config),
            clock=FakeClock(),
            metrics=metrics,
        )
        yield Running(registry, metrics)
        await registry.stop()


async def verified(peer: oidc.Peer, token: str, audience: str) -> dict[str, Any]:
    """Check ``token`` against the peer's JWKS; return its claims."""
    header = jwt.get_unverified_header(token)
    key_set = await peer.key_set()
    claims: dict[str, Any] = jwt.decode(
        token,
        key_set[header["kid"]],
        algorithms=["RS256"],
        audience=audience,
        issuer=peer.issuer,
        options={"require": ["exp", "iat", "jti", "sub", "client_id"]},
    )

    assert header["typ"] == "at+jwt"
    return claims


def sent(
    method: str, client_id: str, scope: str | None, resource: str | None
) -> dict[str, Any]:
    """One token request as the peer records it, with exactly one method."""
    return {
        "method": method,
        "methods": [method],
        "client_id": client_id,
        "content_type": FORM,
        "scope": scope,
        "resource": resource,
    }


@pytest.mark.parametrize(
    ("name", "client_id", "method", "scope", "resource"),
    [
        ("basic", "it-basic", BASIC, "chat:invoke chat:read", FILES),
        ("post", "it-post", POST, "files:write", API),
    ],
)
async def test_each_secret_method_gets_a_verified_jwt(
    peer: oidc.Peer,
    running: Running,
    name: str,
    client_id: str,
    method: str,
    scope: str,
    resource: str,
) -> None:
    """The configured method alone is sent, and the JWT names scope and resource."""
    token = await running.registry.refreshers[name].get()

    claims = await verified(peer, token.value.reveal(), audience=resource)
    assert claims["client_id"] == claims["sub"] == client_id
    assert claims["scope"] == scope
    assert claims["exp"] - claims["iat"] == TTL
    assert (token.scope, token.lifetime) == (scope, TTL)
    assert await peer.requests(client_id) == [sent(method, client_id, scope, resource)]


@pytest.mark.parametrize(
    ("name", "reason", "status"),
    [
        ("wrong_secret", "invalid_client", 401),
        ("bad_scope", "invalid_scope", 400),
        ("bad_resource", "invalid_target", 400),
        ("key_wrong", "invalid_client", 401),
    ],
)
async def test_refusals_keep_the_peers_reason(
    running: Running, name: str, reason: str, status: int
) -> None:
    """A wrong secret or key, a scope not allowed and an unknown resource are
    permanent failures under oidc-provider's own error code."""
    refresher = running.registry.refreshers[name]

    with pytest.raises(TokenUnavailable) as caught:
        await refresher.get()

    assert caught.value.reason == reason
    failure = refresher.last_error
    assert failure is not None
    assert (failure.status, failure.permanent) == (status, True)
    for secret in SECRETS.values():
        assert secret not in failure.message
    labels = {"client": name, "environment": "peer", "result": "failure"}
    counted = running.metrics.registry.get_sample_value(
        "token_broker_refresh_total", {**labels, "reason": reason}
    )
    assert counted == 1


async def test_a_json_body_is_refused_as_invalid_request(
    peer: oidc.Peer, running: Running
) -> None:
    """oidc-provider takes form bodies only: a JSON body is a permanent
    invalid_request that says so, and was sent with the post method once."""
    refresher = running.registry.refreshers["json"]

    with pytest.raises(TokenUnavailable) as caught:
        await refresher.get()

    assert caught.value.reason == "invalid_request"
    assert refresher.last_error is not None
    assert refresher.last_error.permanent
    assert "x-www-form-urlencoded" in refresher.last_error.message
    recorded = await peer.requests("it-json")
    assert recorded == [
        {
            **sent(POST, "it-json", "chat:invoke", None),
            "content_type": "application/json",
        }
    ]


async def test_a_scope_the_peer_never_declared_is_dropped_not_refused(
    peer: oidc.Peer, running: Running
) -> None:
    """An undeclared scope is silently left out; the broker keeps the granted
    scope, not the requested one."""
    token = await running.registry.refreshers["undeclared"].get()

    claims = await verified(peer, token.value.reveal(), audience=API)
    assert claims["scope"] == token.scope == "chat:read"
    recorded = await peer.requests("it-undeclared")
    assert [entry["scope"] for entry in recorded] == ["chat:read nonsense:x"]


@pytest.mark.parametrize(
    ("name", "client_id", "alg", "key"),
    [("rs256", "it-rs256", "RS256", "rsa"), ("es256", "it-es256", "ES256", "ec")],
)
async def test_private_key_jwt_is_verified_by_the_peer(
    peer: oidc.Peer,
    running: Running,
    keys: Keys,
    name: str,
    client_id: str,
    alg: str,
    key: str,
) -> None:
    """oidc-provider verifies the broker's RS256 and ES256 assertions, each
    request with a new one (it refuses a jti it has seen)."""
    refresher = running.registry.refreshers[name]

    tokens = [await refresher.get(), await refresher.refresh()]

    for token in tokens:
        claims = await verified(peer, token.value.reveal(), audience=API)
        assert claims["client_id"] == claims["sub"] == client_id
        assert claims["scope"] == token.scope == "chat:invoke"
    recorded = await peer.requests(client_id)
    assert [entry["methods"] for entry in recorded] == [[KEY_JWT], [KEY_JWT]]
    assertions = [entry["assertion"] for entry in recorded]
    for sent_assertion in assertions:
        header, claims = sent_assertion["header"], sent_assertion["claims"]
        assert sent_assertion["type"] == JWT_BEARER
        assert (header["alg"], header["kid"]) == (alg, keys.public[key]["kid"])
        assert claims["iss"] == claims["sub"] == client_id
        assert claims["aud"] == peer.token_url
        assert 0 < claims["exp"] - claims["iat"] <= 120
    assert assertions[0]["claims"]["jti"] != assertions[1]["claims"]["jti"]


E2E = """
listen: {{http: 127.0.0.1:0, unix: null, metrics: 127.0.0.1:0}}
environments:
  peer: {{token_url: "{url}"}}
clients:
  chat:
    environment: peer
    client_id: e2e-basic
    client_secret: {{file: basic.secret}}
    scopes: [chat:invoke]
    resource: {api}
  files:
    environment: peer
    client_id: e2e-post
    client_secret: {{env: E2E_POST}}
    auth: client_secret_post
    scopes: [files:write]
    resource: {files}
  wrong:
    environment: peer
    client_id: e2e-wrong
    client_secret: {{file: wrong.secret}}
    scopes: [chat:read]
  scope:
    environment: peer
    client_id: e2e-scope
    client_secret: {{file: basic.secret}}
    scopes: [admin]
  keyed:
    environment: peer
    client_id: e2e-es256
    auth: private_key_jwt
    private_key: {{file: {keys}/ec.pem}}
    scopes: [chat:invoke]
"""


async def ask(
    session: aiohttp.ClientSession, url: str
) -> tuple[int, dict[str, Any], str | None]:
    """GET ``url``: the status, the JSON body and any ``Retry-After``."""
    async with session.get(url) as answer:
        return answer.status, await answer.json(), answer.headers.get("Retry-After")


def refreshes(metrics: str, client: str, reason: str) -> float | None:
    """The ``token_broker_refresh_total`` sample for ``client`` and ``reason``."""
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if (
                sample.name == "token_broker_refresh_total"
                and sample.labels["client"] == client
                and sample.labels["reason"] == reason
            ):
                return sample.value
    return None


async def test_serve_against_the_peer(
    peer: oidc.Peer, keys: Keys, workdir: Path
) -> None:
    """``token-broker serve`` serves the peer's tokens for each auth method, and
    a refused secret or scope shows its reason in the 503, /v1/clients and
    the metrics."""
    (workdir / "basic.secret").write_text(BASIC_SECRET + "\n")
    (workdir / "wrong.secret").write_text(WRONG_SECRET)
    config = workdir / "broker.yaml"
    text = E2E.format(url=peer.token_url, api=API, files=FILES, keys=keys.directory)
    config.write_text(text)
    broker = await process.start(config, env={"E2E_POST": POST_SECRET})
    started = broker.started()
    api = f"http://{started['http']}"

    async with aiohttp.ClientSession(headers=GUARD) as session:
        answers = {
            name: await ask(session, f"{api}/v1/tokens/{name}")
            for name in ("chat", "files", "keyed", "wrong", "scope")
        }
        _, listed, _ = await ask(session, f"{api}/v1/clients")
        async with session.get(f"http://{started['metrics']}/metrics") as scrape:
            metrics = await scrape.text()
    assert await broker.stop() == 0

    served = [
        ("chat", "e2e-basic", BASIC, "chat:invoke", API),
        ("files", "e2e-post", POST, "files:write", FILES),
        ("keyed", "e2e-es256", KEY_JWT, "chat:invoke", API),
    ]
    for name, client_id, method, scope, audience in served:
        status, body, _ = answers[name]
        assert status == 200, body
        claims = await verified(peer, body["access_token"], audience)
        assert claims["client_id"] == client_id
        assert claims["scope"] == body["scope"] == scope
        assert refreshes(metrics, name, "none") == 1
        assert body["access_token"] not in broker.output()
        recorded = await peer.requests(client_id)
        assert [entry["methods"] for entry in recorded] == [[method]]

    states = {entry["name"]: entry for entry in listed["clients"]}
    for name, reason in [("wrong", "invalid_client"), ("scope", "invalid_scope")]:
        status, body, retry_after = answers[name]
        assert (status, body["error"], body["reason"]) == (
            503,
            "token_unavailable",
            reason,
        )
        assert retry_after is not None
        assert int(retry_after) >= 1
        assert states[name]["state"] == "expired"
        assert states[name]["consecutive_failures"] == 1
        assert states[name]["last_error"]["reason"] == reason
        assert refreshes(metrics, name, reason) == 1
    assert states["chat"]["state"] == "fresh"
    for secret in (BASIC_SECRET, POST_SECRET, WRONG_SECRET):
        assert secret not in broker.output()


def test_a_missing_node_fails_with_the_install_steps(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without node on PATH the peer refuses to start and says what to do."""
    monkeypatch.setenv("PATH", str(tmp_path))

    with pytest.raises(oidc.PeerUnavailable, match="node is not installed"):
        oidc.check_installed()


@pytest.mark.parametrize(
    ("installed", "says"),
    [(None, "oidc-provider is not installed"), ("9.0.0", "9.0.0 is installed")],
)
def test_a_missing_or_stale_package_names_npm_ci(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    installed: str | None,
    says: str,
) -> None:
    """No node_modules, or another version than the pin, asks for npm ci."""
    (tmp_path / "package.json").write_bytes((oidc.HERE / "package.json").read_bytes())
    if installed is not None:
        package = tmp_path / "node_modules" / "oidc-provider"
        package.mkdir(parents=True)
        (package / "package.json").write_text(json.dumps({"version": installed}))
    monkeypatch.setattr(oidc, "HERE", tmp_path)

    with pytest.raises(oidc.PeerUnavailable, match=says) as caught:
        oidc.check_installed()

    assert "`npm ci --prefix tests/peer`" in str(caught.value)


def test_a_peer_that_cannot_start_says_why(tmp_path: Path) -> None:
    """A peer that dies before listening fails at once, quoting its stderr."""
    with pytest.raises(RuntimeError, match="exited with code 1") as caught:
        oidc.start({"ttl": TTL}, tmp_path)

    assert "TypeError" in str(caught.value)
