"""The embedded dev issuer answers like a strict RFC 6749 token endpoint."""

from __future__ import annotations

import base64
import datetime
import secrets
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import aiohttp
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from pydantic import ValidationError
from pytest_aiohttp import AiohttpClient
from structlog.testing import capture_logs

from broker.assertion import ASSERTION_TYPE, client_assertion, jwk_thumbprint
from broker.config import Client as BrokerClient
from broker.devconfig import DevClient, DevIssuer, DevTls
from broker.devissuer import (
    JWKS_PATH,
    METADATA_PATHS,
    TOKEN_PATH,
    create_app,
    start,
)
from broker.secret import PemFile
from tests.pki import make_pki

Client = TestClient[web.Request, web.Application]

ISSUER = "http://127.0.0.1:8180"
NOW = float(int(time.time()))
SECRET = "svc-secret-5b1c"
SCOPES = ("chat:invoke", "chat:read", "files:write")
ODD_ID = "tool:ü b+c"
ODD_SECRET = "p:a ss+w%2Frd/é"
GRANT = {"grant_type": "client_credentials"}
CHALLENGE = 'Basic realm="token-broker-dev"'
TOKEN_URL = ISSUER + TOKEN_PATH
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def basic(client_id: str, secret: str) -> dict[str, str]:
    """Build client_secret_basic the RFC 6749 2.3.1 way: form-encode, then base64."""
    pair = f"{quote_plus(client_id)}:{quote_plus(secret)}"
    return {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}


SVC = basic("svc", SECRET)


@dataclass(frozen=True)
class Keys:
    """Client keys made for the tests, and where their PEM files are."""

    folder: Path
    rsa: rsa.RSAPrivateKey
    ec: ec.EllipticCurvePrivateKey
    rsa_private: Path
    ec_private: Path
    rsa_public: Path
    ec_certificate: Path


def private_pem(key: PrivateKey) -> bytes:
    """Serialize a private key as unencrypted PKCS#8 PEM."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_pem(key: PrivateKey) -> bytes:
    """Serialize the public half of a key as SubjectPublicKeyInfo PEM."""
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def self_signed(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A self-signed certificate carrying ``key``'s public half."""
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ec-svc")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    """An RSA and an EC client key, shared by the module (RSA takes a while)."""
    folder = tmp_path_factory.mktemp("keys")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    made = Keys(
        folder,
        rsa_key,
        ec_key,
        folder / "rsa.pem",
        folder / "ec.pem",
        folder / "rsa.pub.pem",
        folder / "ec.crt",
    )
    made.rsa_private.write_bytes(private_pem(rsa_key))
    made.ec_private.write_bytes(private_pem(ec_key))
    made.rsa_public.write_bytes(public_pem(rsa_key))
    made.ec_certificate.write_bytes(self_signed(ec_key))
    return made


@pytest.fixture
def settings(keys: Keys) -> DevIssuer:
    return DevIssuer(
        token_lifetime=600.0,
        audience="dev-api",
        clients={
            "svc": DevClient(secret=SECRET, scopes=SCOPES),
            ODD_ID: DevClient(secret=ODD_SECRET, scopes=("misc:read",)),
            "rsa-svc": DevClient(public_key=str(keys.rsa_public), scopes=SCOPES),
            "ec-svc": DevClient(public_key=str(keys.ec_certificate)),
            "both": DevClient(secret=SECRET, public_key=str(keys.rsa_public)),
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
            "private_key_jwt",
        ],
        "token_endpoint_auth_signing_alg_values_supported": ["RS256", "ES256"],
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


# private_key_jwt (RFC 7523 section 2.2)


def signed(key: PrivateKey, client_id: str, **changes: Any) -> str:
    """A client assertion for ``client_id`` signed by ``key``; None drops a claim."""
    claims: dict[str, Any] = {
        "iss": client_id,
        "sub": client_id,
        "aud": TOKEN_URL,
        "iat": int(NOW),
        "exp": int(NOW) + 60,
        "jti": secrets.token_urlsafe(16),
    }
    claims.update(changes)
    alg = "RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256"
    present = {name: value for name, value in claims.items() if value is not None}
    return jwt.encode(present, key, algorithm=alg)


async def present(
    client: Client,
    assertion: str,
    *,
    headers: dict[str, str] | None = None,
    fields: dict[str, str] | None = None,
) -> tuple[aiohttp.ClientResponse, dict[str, Any]]:
    """POST a client_credentials request authenticated by ``assertion``."""
    form = GRANT | {"client_assertion_type": ASSERTION_TYPE}
    form |= {"client_assertion": assertion} | (fields or {})
    async with client.post(TOKEN_PATH, data=form, headers=headers) as resp:
        return resp, await resp.json()


@pytest.mark.parametrize(
    ("client_id", "kind"),
    [("rsa-svc", "rsa"), ("ec-svc", "ec")],
    ids=["RS256", "ES256"],
)
async def test_broker_assertion_is_accepted(
    client: Client, keys: Keys, client_id: str, kind: str
) -> None:
    """An assertion made by the broker's own code earns a token for its sub."""
    path = keys.rsa_private if kind == "rsa" else keys.ec_private
    broker_client = BrokerClient(
        environment="dev",
        client_id=client_id,
        auth="private_key_jwt",
        private_key=PemFile(str(path)),
    )
    assertion = client_assertion(broker_client, TOKEN_URL, now=NOW).reveal()

    with capture_logs() as logs:
        resp, body = await present(client, assertion)

    assert resp.status == 200, body
    assert decode(body["access_token"], await served_keys(client))["sub"] == client_id
    assert [(log["event"], log["auth"]) for log in logs] == [
        ("dev_issuer.token_issued", "private_key_jwt")
    ]
    assert assertion not in repr(logs)


@pytest.mark.parametrize("aud", [ISSUER, ["urn:elsewhere", TOKEN_URL]])
async def test_aud_may_name_the_issuer_or_list_the_endpoint(
    client: Client, keys: Keys, aud: str | list[str]
) -> None:
    """aud may be the issuer identifier, or a list holding the token endpoint."""
    resp, body = await present(client, signed(keys.rsa, "rsa-svc", aud=aud))

    assert resp.status == 200, body


async def test_expiry_has_thirty_seconds_of_leeway(client: Client, keys: Keys) -> None:
    """An assertion 29 s past exp still passes; 30 s past it does not."""
    late = signed(keys.ec, "ec-svc", iat=int(NOW) - 89, exp=int(NOW) - 29)
    later = signed(keys.ec, "ec-svc", iat=int(NOW) - 90, exp=int(NOW) - 30)

    assert (await present(client, late))[0].status == 200
    assert (await present(client, later))[0].status == 401


REFUSALS = [
    pytest.param("stranger", "rsa-svc", {}, {}, "signature", id="bad-signature"),
    pytest.param("ec", "rsa-svc", {}, {}, "not signed with RS256", id="wrong-alg"),
    pytest.param(
        "rsa",
        "rsa-svc",
        {"aud": "https://other.example/token"},
        {},
        "aud",
        id="wrong-aud",
    ),
    pytest.param(
        "rsa", "rsa-svc", {"exp": int(NOW) - 30}, {}, "has expired", id="expired"
    ),
    pytest.param(
        "rsa", "rsa-svc", {"iss": "both"}, {}, "iss and sub", id="iss-not-sub"
    ),
    pytest.param(
        "rsa", "rsa-svc", {}, {"client_id": "both"}, "iss and sub", id="body-id-differs"
    ),
    pytest.param("rsa", "ghost", {}, {}, "no client with this id", id="unknown"),
    pytest.param("rsa", "svc", {}, {}, "no client with this id", id="secret-only"),
    pytest.param(
        "rsa", "rsa-svc", {"exp": int(NOW) + 601}, {}, "longer than 600", id="too-long"
    ),
    pytest.param(
        "rsa",
        "rsa-svc",
        {"iat": int(NOW) + 31, "exp": int(NOW) + 90},
        {},
        "iat is in the future",
        id="iat-ahead",
    ),
    pytest.param(
        "rsa", "rsa-svc", {"exp": "soon"}, {}, "exp is not a number", id="exp-text"
    ),
    pytest.param("rsa", "rsa-svc", {"jti": None}, {}, "no jti claim", id="no-jti"),
    pytest.param("rsa", "rsa-svc", {"sub": None}, {}, "no sub", id="no-sub"),
    pytest.param(
        "rsa",
        "rsa-svc",
        {},
        {"client_assertion": "not.a-jwt"},
        "well-formed",
        id="malformed",
    ),
    pytest.param(
        "rsa",
        "rsa-svc",
        {},
        {"client_assertion_type": "urn:x"},
        "client_assertion_type must be",
        id="wrong-type",
    ),
]


@pytest.mark.parametrize(("kind", "client_id", "changes", "fields", "says"), REFUSALS)
async def test_bad_assertion_is_401_invalid_client(
    client: Client,
    keys: Keys,
    kind: str,
    client_id: str,
    changes: dict[str, Any],
    fields: dict[str, str],
    says: str,
) -> None:
    """Each flaw is 401 invalid_client naming the flaw, never echoing the JWT."""
    choices: dict[str, PrivateKey] = {"rsa": keys.rsa, "ec": keys.ec}
    if kind == "stranger":
        choices[kind] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key = choices[kind]
    assertion = signed(key, client_id, **changes)

    resp, body = await present(client, assertion, fields=fields)

    assert resp.status == 401
    assert body["error"] == "invalid_client"
    assert says in body["error_description"]
    assert assertion not in body["error_description"]
    assert resp.headers["WWW-Authenticate"] == CHALLENGE


async def test_replayed_assertion_is_refused(client: Client, keys: Keys) -> None:
    """The second use of one assertion (same jti) is refused; a fresh one is not."""
    assertion = signed(keys.rsa, "rsa-svc")

    first, _ = await present(client, assertion)
    second, body = await present(client, assertion)
    fresh, _ = await present(client, signed(keys.rsa, "rsa-svc"))

    assert (first.status, second.status, fresh.status) == (200, 401, 200)
    assert body["error"] == "invalid_client"
    assert "jti was used before" in body["error_description"]


async def test_refused_assertion_does_not_burn_its_jti(
    client: Client, keys: Keys
) -> None:
    """A jti is kept only once its assertion passed every other check."""
    forged = signed(keys.ec, "rsa-svc", jti="shared-id")
    genuine = signed(keys.rsa, "rsa-svc", jti="shared-id")

    assert (await present(client, forged))[0].status == 401
    assert (await present(client, genuine))[0].status == 200


@pytest.mark.parametrize(
    "fields", [{}, {"client_id": "rsa-svc", "client_secret": "guess"}]
)
async def test_key_only_client_cannot_use_a_secret(
    client: Client, fields: dict[str, str]
) -> None:
    """A client registered with only a public key fails secret authentication."""
    headers = basic("rsa-svc", "guess") if not fields else None

    resp, body = await ask(client, headers=headers, **fields)

    assert resp.status == 401
    assert body["error"] == "invalid_client"


async def test_client_with_both_may_use_either(client: Client, keys: Keys) -> None:
    """A client with a secret and a key authenticates with either one."""
    by_secret, _ = await ask(client, headers=basic("both", SECRET))
    by_key, _ = await present(client, signed(keys.rsa, "both"))

    assert (by_secret.status, by_key.status) == (200, 200)


async def test_assertion_and_basic_together_are_invalid_request(
    client: Client, keys: Keys
) -> None:
    """An assertion beside HTTP Basic is two methods in one request: 400."""
    resp, body = await present(
        client, signed(keys.rsa, "both"), headers=basic("both", SECRET)
    )

    assert resp.status == 400
    assert body["error"] == "invalid_request"


async def test_public_key_file_is_read_per_request(
    aiohttp_client: AiohttpClient, keys: Keys, tmp_path: Path
) -> None:
    """Replacing a client's public key file takes effect on the next request."""
    path = tmp_path / "client.pem"
    path.write_bytes(keys.rsa_public.read_bytes())
    settings = DevIssuer(clients={"rot": DevClient(public_key=str(path))})
    client = await aiohttp_client(
        create_app(settings, issuer_url=ISSUER, now=lambda: NOW)
    )

    before = (await present(client, signed(keys.rsa, "rot")))[0].status
    path.write_bytes(keys.ec_certificate.read_bytes())
    old_key = (await present(client, signed(keys.rsa, "rot")))[0].status
    new_key = (await present(client, signed(keys.ec, "rot")))[0].status

    assert (before, old_key, new_key) == (200, 401, 200)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (
            b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
            "no readable",
        ),
        (
            rsa.generate_private_key(65537, key_size=1024)  # noqa: S505
            .public_key()
            .public_bytes(
                serialization.Encoding.PEM,
                serialization.PublicFormat.SubjectPublicKeyInfo,
            ),
            "RSA key of 1024 bits",
        ),
    ],
    ids=["garbage", "rsa-1024"],
)
def test_unusable_public_key_fails_at_start(
    tmp_path: Path, text: bytes, says: str
) -> None:
    """A client public key that cannot verify anything is a config error."""
    path = tmp_path / "client.pem"
    path.write_bytes(text)

    with pytest.raises(ValidationError, match=says) as info:
        DevClient(public_key=str(path))

    assert str(path) in str(info.value)


# TLS


async def test_tls_issuer_serves_https(settings: DevIssuer, tmp_path: Path) -> None:
    """With tls set, the issuer is https, trusted through the CA that signed it."""
    pki = make_pki(tmp_path)
    tls = DevTls(cert=str(pki.cert_file), key=str(pki.key_file))
    trusted = ssl.create_default_context(cafile=str(pki.ca_file))

    with capture_logs() as logs:
        server = await start(settings.model_copy(update={"tls": tls}), port=0)
    try:
        connector = aiohttp.TCPConnector(ssl=trusted)
        async with aiohttp.ClientSession(connector=connector) as session:
            async with session.post(server.token_url, data=GRANT, headers=SVC) as resp:
                body = await resp.json()
            async with session.get(server.url + METADATA_PATHS[0]) as resp:
                document = await resp.json()
        async with aiohttp.ClientSession() as untrusting:
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await untrusting.get(server.token_url)
    finally:
        await server.close()

    assert server.url.startswith("https://127.0.0.1:")
    assert document["issuer"] == server.url
    assert document["token_endpoint"] == server.token_url
    assert body["token_type"] == "Bearer"
    assert [log["url"] for log in logs] == [server.url]


async def test_tls_key_that_does_not_match_fails_at_start(
    settings: DevIssuer, keys: Keys, tmp_path: Path
) -> None:
    """A certificate with someone else's key is a config error naming both files."""
    pki = make_pki(tmp_path)

    with pytest.raises(ValidationError, match="not a certificate chain") as info:
        DevTls(cert=str(pki.cert_file), key=str(keys.ec_private))

    assert str(keys.ec_private) in str(info.value)
