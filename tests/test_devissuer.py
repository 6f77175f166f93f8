"""The embedded dev issuer answers like a strict RFC 6749 token endpoint."""

from __future__ import annotations

import base64
import time
from typing import Any
from urllib.parse import quote_plus

import aiohttp
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient
from structlog.testing import capture_logs

from broker.config import DevClient, DevIssuer
from broker.devissuer import (
    JWKS_PATH,
    METADATA_PATHS,
    TOKEN_PATH,
    create_app,
    jwk_thumbprint,
    start,
)

Client = TestClient[web.Request, web.Application]

ISSUER = "http://127.0.0.1:8180"
NOW = float(int(time.time()))
SECRET = "svc-secret-5b1c"
SCOPES = ("chat:invoke", "chat:read", "files:write")
ODD_ID = "tool:ü b+c"
ODD_SECRET = "p:a ss+w%2Frd/é"
GRANT = {"grant_type": "client_credentials"}
CHALLENGE = 'Basic realm="token-broker-dev"'


def basic(client_id: str, secret: str) -> dict[str, str]:
    """Build client_secret_basic the RFC 6749 2.3.1 way: form-encode, then base64."""
    pair = f"{quote_plus(client_id)}:{quote_plus(secret)}"
    return {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}


SVC = basic("svc", SECRET)


@pytest.fixture
def settings() -> DevIssuer:
    return DevIssuer(
        token_lifetime=600.0,
        audience="dev-api",
        clients={
            "svc": DevClient(secret=SECRET, scopes=SCOPES),
            ODD_ID: DevClient(secret=ODD_SECRET, scopes=("misc:read",)),
        },
    )


@pytest.fixture
async def client(aiohttp_client: AiohttpClient, settings: DevIssuer) -> Client:
    return await aiohttp_client(
        create_app(settings, issuer_url=ISSUER, now=lambda: NOW)
    )


async def ask(
    client: Client, headers: dict[str, str] | None = SVC, **fields: str
) -> tuple[aiohttp.ClientResponse, dict[str, Any]]:
    """POST a form-encoded client_credentials request; return it and its JSON."""
    async with client.post(TOKEN_PATH, data=GRANT | fields, headers=headers) as resp:
        return resp, await resp.json()


async def served_keys(client: Client) -> dict[str, Any]:
    async with client.get(JWKS_PATH) as resp:
        keys: dict[str, Any] = await resp.json()
        return keys


def decode(
    token: str, keys: dict[str, Any], *, issuer: str = ISSUER, audience: str = "dev-api"
) -> dict[str, Any]:
    """Verify ``token`` with the key its ``kid`` names in ``keys``; return claims."""
    key = jwt.PyJWKSet.from_dict(keys)[jwt.get_unverified_header(token)["kid"]]
    required = ["iss", "sub", "aud", "iat", "exp", "jti"]
    return jwt.decode(
        token,
        key.key,
        algorithms=["RS256"],
        audience=audience,
        issuer=issuer,
        options={"require": required},
    )


async def test_basic_auth_token_verifies_against_jwks(client: Client) -> None:
    """client_secret_basic yields an RFC 9068 JWT that the served JWKS verifies."""
    resp, body = await ask(client)
    keys = await served_keys(client)

    assert resp.status == 200
    assert resp.headers["Cache-Control"] == "no-store"
    assert resp.headers["Pragma"] == "no-cache"
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 600
    assert body["scope"] == "chat:invoke chat:read files:write"

    header = jwt.get_unverified_header(body["access_token"])
    assert header["typ"] == "at+jwt"
    assert header["kid"] == keys["keys"][0]["kid"]

    claims = decode(body["access_token"], keys)
    assert claims["sub"] == claims["client_id"] == "svc"
    assert claims["scope"] == body["scope"]
    assert claims["iat"] == NOW
    assert claims["exp"] - claims["iat"] == 600


async def test_jwks_publishes_public_rsa_key(client: Client) -> None:
    """The JWKS holds one RS256 signing key, its kid the RFC 7638 thumbprint."""
    (key,) = (await served_keys(client))["keys"]

    assert key["kty"] == "RSA"
    assert key["alg"] == "RS256"
    assert key["use"] == "sig"
    assert key["kid"] == jwk_thumbprint(key)
    assert set(key) == {"kty", "n", "e", "kid", "alg", "use"}


def test_thumbprint_matches_rfc7638_example() -> None:
    """jwk_thumbprint reproduces the worked example of RFC 7638 section 3.1."""
    n = (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aP"
        "FFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl9"
        "3lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdA"
        "ZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3"
        "XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
    )
    jwk = {"kty": "RSA", "n": n, "e": "AQAB", "alg": "RS256", "kid": "2011-04-29"}

    assert jwk_thumbprint(jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


async def test_post_auth_succeeds(client: Client) -> None:
    """client_secret_post in a form body is accepted."""
    resp, body = await ask(client, headers=None, client_id="svc", client_secret=SECRET)

    assert resp.status == 200
    assert decode(body["access_token"], await served_keys(client))["sub"] == "svc"


async def test_json_body_succeeds(client: Client) -> None:
    """A JSON body with client_secret_post is accepted, as vendor issuers do."""
    request = GRANT | {
        "client_id": "svc",
        "client_secret": SECRET,
        "scope": "chat:read",
    }
    async with client.post(TOKEN_PATH, json=request) as resp:
        body = await resp.json()

    assert resp.status == 200
    assert body["scope"] == "chat:read"


async def test_basic_credentials_are_form_decoded(client: Client) -> None:
    """Basic id and secret are unquoted after the split, so ':' '+' '%' survive."""
    resp, body = await ask(client, headers=basic(ODD_ID, ODD_SECRET))
    raw = base64.b64encode(f"{ODD_ID}:{ODD_SECRET}".encode()).decode()
    unencoded, _ = await ask(client, headers={"Authorization": f"Basic {raw}"})

    assert resp.status == 200
    assert decode(body["access_token"], await served_keys(client))["sub"] == ODD_ID
    assert unencoded.status == 401


@pytest.mark.parametrize(
    ("headers", "fields"),
    [
        pytest.param(basic("svc", "wrong"), {}, id="wrong-secret"),
        pytest.param(
            None, {"client_id": "ghost", "client_secret": SECRET}, id="unknown"
        ),
        pytest.param(None, {}, id="no-credentials"),
        pytest.param({"Authorization": "Basic !!"}, {}, id="malformed-basic"),
        pytest.param({"Authorization": "Bearer abc"}, {}, id="other-scheme"),
    ],
)
async def test_bad_client_is_401_invalid_client(
    client: Client, headers: dict[str, str] | None, fields: dict[str, str]
) -> None:
    """Failed client authentication is 401 invalid_client with a Basic challenge."""
    resp, body = await ask(client, headers=headers, **fields)

    assert resp.status == 401
    assert body["error"] == "invalid_client"
    assert body["error_description"]
    assert resp.headers["WWW-Authenticate"] == CHALLENGE


@pytest.mark.parametrize(
    "request_kwargs",
    [
        pytest.param({"data": GRANT | {"client_secret": SECRET}}, id="both-methods"),
        pytest.param({"data": {"grant_type": ""}}, id="empty-grant-type"),
        pytest.param(
            {"data": [*GRANT.items(), ("scope", "chat:read"), ("scope", "chat:read")]},
            id="repeated-parameter",
        ),
        pytest.param(
            {
                "data": "grant_type=client_credentials",
                "headers": {"Content-Type": "a/b"},
            },
            id="other-content-type",
        ),
        pytest.param(
            {"data": b"{", "headers": {"Content-Type": "application/json"}},
            id="broken-json",
        ),
        pytest.param({"json": ["client_credentials"]}, id="json-not-object"),
        pytest.param({"data": GRANT | {"client_id": "other"}}, id="id-differs"),
    ],
)
async def test_malformed_request_is_invalid_request(
    client: Client, request_kwargs: dict[str, Any]
) -> None:
    """Two auth methods or ids, a missing or repeated parameter, a bad body: 400."""
    headers = SVC | request_kwargs.pop("headers", {})
    async with client.post(TOKEN_PATH, headers=headers, **request_kwargs) as resp:
        body = await resp.json()

    assert resp.status == 400
    assert body["error"] == "invalid_request"


async def test_unsupported_grant_type(client: Client) -> None:
    """Any grant but client_credentials is 400 unsupported_grant_type."""
    resp, body = await ask(client, grant_type="password")

    assert resp.status == 400
    assert body["error"] == "unsupported_grant_type"


@pytest.mark.parametrize(
    "scope", ["chat:read misc:read", "chat:read  chat:invoke", 'chat:"read"']
)
async def test_bad_scope_is_invalid_scope(client: Client, scope: str) -> None:
    """Another client's scope, or a malformed scope string, is refused."""
    resp, body = await ask(client, scope=scope)

    assert resp.status == 400
    assert body["error"] == "invalid_scope"


async def test_subset_scope_is_granted(client: Client) -> None:
    """Asking for part of the client's scopes grants exactly that part."""
    resp, body = await ask(client, scope="files:write chat:read")
    claims = decode(body["access_token"], await served_keys(client))

    assert resp.status == 200
    assert body["scope"] == claims["scope"] == "files:write chat:read"


@pytest.mark.parametrize(
    ("fields", "aud"),
    [
        ({}, "dev-api"),
        ({"audience": "billing"}, "billing"),
        ({"resource": "https://api.example/v1"}, "https://api.example/v1"),
        ({"audience": "billing", "resource": "urn:svc:files"}, "urn:svc:files"),
    ],
)
async def test_audience_and_resource_set_aud(
    client: Client, fields: dict[str, str], aud: str
) -> None:
    """aud is the resource if given, else the audience, else the default."""
    async with client.post(TOKEN_PATH, data=GRANT | fields, headers=SVC) as resp:
        body = await resp.json()
    claims = decode(body["access_token"], await served_keys(client), audience=aud)

    assert claims["aud"] == aud


async def test_several_resources_make_an_aud_list(client: Client) -> None:
    """Repeated resource parameters (RFC 8707) all land in aud."""
    form = [*GRANT.items(), ("resource", "urn:a"), ("resource", "urn:b")]
    async with client.post(TOKEN_PATH, data=form, headers=SVC) as resp:
        body = await resp.json()

    claims = decode(body["access_token"], await served_keys(client), audience="urn:b")
    assert claims["aud"] == ["urn:a", "urn:b"]


@pytest.mark.parametrize("resource", ["https://api.example/v1#top", "relative/path"])
async def test_bad_resource_is_invalid_target(client: Client, resource: str) -> None:
    """A resource that is not an absolute URI without fragment is refused."""
    resp, body = await ask(client, resource=resource)

    assert resp.status == 400
    assert body["error"] == "invalid_target"


async def test_each_token_has_its_own_jti(client: Client) -> None:
    """Two tokens issued in the same second still differ in jti."""
    keys = await served_keys(client)
    first = decode((await ask(client))[1]["access_token"], keys)
    second = decode((await ask(client))[1]["access_token"], keys)

    assert first["jti"] != second["jti"]


@pytest.mark.parametrize("path", METADATA_PATHS)
async def test_metadata_document(client: Client, path: str) -> None:
    """Both well-known paths serve the RFC 8414 metadata of this issuer."""
    async with client.get(path) as resp:
        document = await resp.json()

    assert document == {
        "issuer": ISSUER,
        "token_endpoint": ISSUER + TOKEN_PATH,
        "jwks_uri": ISSUER + JWKS_PATH,
        "grant_types_supported": ["client_credentials"],
        "token_endpoint_auth_methods_supported": [
            "client_secret_basic",
            "client_secret_post",
        ],
        "scopes_supported": ["chat:invoke", "chat:read", "files:write", "misc:read"],
        "response_types_supported": [],
    }


async def test_secrets_stay_out_of_bodies_and_logs(client: Client) -> None:
    """No answer or log event repeats a submitted secret or an issued token."""
    wrong = "wrong-secret-9d2e"
    with capture_logs() as logs:
        issued, body = await ask(client)
        answers = [
            body,
            (await ask(client, headers=basic("svc", wrong)))[1],
            (await ask(client, headers=None, client_id="svc", client_secret=wrong))[1],
            (await ask(client, client_secret=SECRET))[1],
            (await ask(client, grant_type="password"))[1],
            (await ask(client, scope="root"))[1],
        ]

    shown = repr(answers[1:]) + repr(logs)
    assert issued.status == 200
    assert SECRET not in repr(answers) + repr(logs)
    assert wrong not in shown
    assert body["access_token"] not in shown
    assert [(log["event"], log["client"]) for log in logs] == [
        ("dev_issuer.token_issued", "svc"),
        ("dev_issuer.token_refused", "svc"),
        ("dev_issuer.token_refused", "svc"),
        ("dev_issuer.token_refused", None),
        ("dev_issuer.token_refused", "svc"),
        ("dev_issuer.token_refused", "svc"),
    ]


async def test_start_serves_on_a_bound_port(settings: DevIssuer) -> None:
    """start() binds loopback, learns its port, and issues tokens over real HTTP."""
    with capture_logs() as logs:
        server = await start(settings, port=0)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(server.token_url, data=GRANT, headers=SVC) as resp:
                body = await resp.json()
            async with session.get(server.url + METADATA_PATHS[0]) as resp:
                document = await resp.json()
            async with session.get(document["jwks_uri"]) as resp:
                keys = await resp.json()
    finally:
        await server.close()

    assert server.url.startswith("http://127.0.0.1:")
    assert not server.url.endswith(":0")
    assert document["issuer"] == server.url
    assert document["token_endpoint"] == server.token_url
    assert decode(body["access_token"], keys, issuer=server.url)["sub"] == "svc"
    assert [(log["event"], log["url"]) for log in logs] == [
        ("dev_issuer.started", server.url)
    ]
