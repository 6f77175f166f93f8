"""private_key_jwt: client assertions made from a key file, and how they are checked."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from broker.assertion import (
    ASSERTION_LIFETIME,
    SeenIds,
    check_key,
    client_assertion,
    jwk_thumbprint,
    public_jwk,
)
from broker.config import Client
from broker.errors import ConfigError
from broker.loader import load
from broker.secret import PemFile

AUDIENCE = "https://auth.example.com/oauth2/token"
NOW = 1_700_000_000.5
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def pem(key: Any, form: str = "pkcs8", password: bytes | None = None) -> str:
    """Serialize a private key as PEM: PKCS#8 or traditional, maybe encrypted."""
    private_format = {
        "pkcs8": serialization.PrivateFormat.PKCS8,
        "traditional": serialization.PrivateFormat.TraditionalOpenSSL,
    }[form]
    encryption: serialization.KeySerializationEncryption = (
        serialization.NoEncryption()
        if password is None
        else serialization.BestAvailableEncryption(password)
    )
    data: bytes = key.private_bytes(
        serialization.Encoding.PEM, private_format, encryption
    )
    return data.decode()


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    """An RSA 2048 key, made once for the module."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    """An EC P-256 key, made once for the module."""
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(params=["RS256", "ES256"])
def keyed(
    request: pytest.FixtureRequest,
    rsa_key: rsa.RSAPrivateKey,
    ec_key: ec.EllipticCurvePrivateKey,
) -> tuple[PrivateKey, str]:
    """One signing key and the algorithm it implies."""
    key: PrivateKey = rsa_key if request.param == "RS256" else ec_key
    return key, request.param


def make_client(path: Path, **fields: Any) -> Client:
    """A validated private_key_jwt client whose key is the file at ``path``."""
    return Client(
        environment="prod",
        client_id="m2m-chat",
        auth="private_key_jwt",
        private_key=PemFile(str(path)),
        **fields,
    )


def verify(assertion: str, key: PrivateKey, alg: str) -> dict[str, Any]:
    """Check an assertion against ``key``'s public half, the way an issuer does."""
    claims: dict[str, Any] = jwt.decode(
        assertion,
        key.public_key(),
        algorithms=[alg],
        audience=AUDIENCE,
        issuer="m2m-chat",
        options={"require": ["iss", "sub", "aud", "iat", "exp", "jti"]},
    )
    return claims


def test_assertion_claims_and_header(
    tmp_path: Path, keyed: tuple[PrivateKey, str]
) -> None:
    """The JWT names the client as iss and sub, the audience, and lives 60 s."""
    key, alg = keyed
    (tmp_path / "key.pem").write_text(pem(key))
    client = make_client(tmp_path / "key.pem")

    token = client_assertion(client, AUDIENCE).reveal()
    header = jwt.get_unverified_header(token)
    claims = verify(token, key, alg)

    assert header == {
        "alg": alg,
        "typ": "JWT",
        "kid": jwk_thumbprint(public_jwk(key.public_key())),
    }
    assert claims["iss"] == claims["sub"] == "m2m-chat"
    assert claims["aud"] == AUDIENCE
    assert claims["exp"] - claims["iat"] == ASSERTION_LIFETIME == 60
    assert len(claims["jti"]) >= 22


def test_now_sets_iat_and_exp(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    """An injected clock sets iat (whole seconds) and exp 60 s later."""
    (tmp_path / "key.pem").write_text(pem(rsa_key))
    token = client_assertion(make_client(tmp_path / "key.pem"), AUDIENCE, now=NOW)

    claims = jwt.decode(token.reveal(), options={"verify_signature": False})

    assert (claims["iat"], claims["exp"]) == (1_700_000_000, 1_700_000_060)


def test_assertion_is_a_masked_secret(
    tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    """The assertion is handed out as a Secret, so it cannot print by accident."""
    (tmp_path / "key.pem").write_text(pem(ec_key))
    token = client_assertion(make_client(tmp_path / "key.pem"), AUDIENCE)

    assert token.reveal() not in repr(token) + str(token)


def test_each_assertion_has_its_own_jti(
    tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    """Assertions made in the same second still differ in jti."""
    (tmp_path / "key.pem").write_text(pem(ec_key))
    client = make_client(tmp_path / "key.pem")

    tokens = [client_assertion(client, AUDIENCE).reveal() for _ in range(50)]
    ids = {verify(token, ec_key, "ES256")["jti"] for token in tokens}

    assert len(ids) == 50


def test_configured_key_id_and_alg(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    """key_id replaces the thumbprint as kid; a fitting signing_alg is used."""
    (tmp_path / "key.pem").write_text(pem(rsa_key, "traditional"))
    client = make_client(tmp_path / "key.pem", key_id="2024-key", signing_alg="RS256")

    token = client_assertion(client, AUDIENCE).reveal()

    assert jwt.get_unverified_header(token)["kid"] == "2024-key"
    assert verify(token, rsa_key, "RS256")["sub"] == "m2m-chat"


def test_rotated_key_file_is_used_at_once(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    """The key file is read per assertion: a new key signs the very next one."""
    path = tmp_path / "key.pem"
    path.write_text(pem(rsa_key))
    client = make_client(path)
    before = client_assertion(client, AUDIENCE).reveal()

    path.write_text(pem(ec_key))
    after = client_assertion(client, AUDIENCE).reveal()

    assert verify(before, rsa_key, "RS256")["sub"] == "m2m-chat"
    assert verify(after, ec_key, "ES256")["sub"] == "m2m-chat"
    assert jwt.get_unverified_header(after) == {
        "alg": "ES256",
        "typ": "JWT",
        "kid": jwk_thumbprint(public_jwk(ec_key.public_key())),
    }


@pytest.mark.parametrize("form", ["pkcs8", "traditional"])
def test_check_key_derives_the_algorithm(
    form: str, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    """RSA means RS256 and EC P-256 means ES256, in either PEM form."""
    assert check_key(pem(rsa_key, form), None) == "RS256"
    assert check_key(pem(ec_key, form), None) == "ES256"
    assert check_key(pem(ec_key, form), "ES256") == "ES256"


def unusable_keys() -> list[Any]:
    """Keys private_key_jwt cannot use, with the words the error must hold."""
    rsa_small = rsa.generate_private_key(65537, key_size=1024)  # noqa: S505
    p384 = ec.generate_private_key(ec.SECP384R1())
    edwards = ed25519.Ed25519PrivateKey.generate()
    rsa_ok = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    p256 = ec.generate_private_key(ec.SECP256R1())
    public = p256.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return [
        pytest.param(pem(rsa_small), None, "RSA key of 1024 bits", id="rsa-1024"),
        pytest.param(pem(p384), None, "curve secp384r1", id="p-384"),
        pytest.param(pem(edwards), None, "Ed25519", id="ed25519"),
        pytest.param(pem(rsa_ok), "ES256", "ES256 needs an EC P-256", id="rsa-es256"),
        pytest.param(pem(p256), "RS256", "RS256 needs an RSA key", id="ec-rs256"),
        pytest.param(pem(p256), "HS256", "HS256 is not supported", id="hs256"),
        pytest.param(pem(p256, password=b"pw"), None, "encrypted", id="encrypted"),
        pytest.param(public.decode(), None, "no readable private key", id="public"),
        pytest.param(
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            None,
            "no readable private key",
            id="garbage",
        ),
    ]


@pytest.mark.parametrize(("text", "alg", "match"), unusable_keys())
def test_unusable_key_is_refused_without_key_material(
    text: str, alg: str | None, match: str
) -> None:
    """A key that does not fit is a ValueError saying why, quoting no key line."""
    with pytest.raises(ValueError, match=match) as info:
        check_key(text, alg)

    message = str(info.value) + repr(info.value.__cause__)
    body = [line for line in text.splitlines() if line and "-----" not in line]
    assert not any(line[:16] in message for line in body)
    assert info.value.__cause__ is None


def test_unreadable_key_file_is_a_clear_error(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    """A key file gone or broken since start fails the assertion with its path."""
    path = tmp_path / "key.pem"
    path.write_text(pem(rsa_key))
    client = make_client(path)

    path.unlink()
    with pytest.raises(ValueError, match=re.escape(f"cannot read {path}")):
        client_assertion(client, AUDIENCE)

    path.write_text(
        "-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----"
    )
    with pytest.raises(ValueError, match="no readable private key") as info:
        client_assertion(client, AUDIENCE)
    assert "not base64" not in str(info.value)


def write_config(folder: Path, key_text: str, alg: str | None = None) -> Path:
    """Write a config with one private_key_jwt client ``chat`` and its key file."""
    (folder / "chat.pem").write_text(key_text)
    client = {
        "environment": "prod",
        "client_id": "m2m-chat",
        "auth": "private_key_jwt",
        "private_key": {"file": "chat.pem"},
    }
    if alg is not None:
        client["signing_alg"] = alg
    document = {
        "environments": {"prod": {"token_url": AUDIENCE}},
        "clients": {"chat": client},
        "listen": {"http": None, "metrics": None, "unix": str(folder / "tb.sock")},
    }
    path = folder / "broker.yaml"
    path.write_text(json.dumps(document))
    return path


def test_bad_key_fails_at_config_load(
    tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    """A key that does not fit its client is a ConfigError at clients.NAME."""
    path = write_config(tmp_path, pem(ec_key), alg="RS256")

    with pytest.raises(ConfigError, match="RS256 needs an RSA key") as info:
        load(path, {})

    assert info.value.key_path == "clients.chat"
    assert pem(ec_key).splitlines()[1][:16] not in str(info.value)


def test_good_key_loads(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey) -> None:
    """A fitting key loads, and the client reads it from the named file."""
    path = write_config(tmp_path, pem(ec_key, "traditional"))

    client = load(path, {}).config.clients["chat"]

    assert client.private_key == PemFile(str(tmp_path / "chat.pem"))


def test_crypto_is_imported_only_for_private_key_jwt(
    tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    """Loading a secret-only config leaves PyJWT and cryptography unimported."""
    key_config = write_config(tmp_path, pem(ec_key))
    secret_config = tmp_path / "secret.yaml"
    secret_config.write_text(
        key_config.read_text()
        .replace('"private_key_jwt"', '"client_secret_basic"')
        .replace('"private_key": {"file": "chat.pem"}', '"client_secret": "s3cret"')
    )
    probe = (
        "import sys; from broker.loader import load; load(sys.argv[1], {}); "
        "print(sorted({'jwt', 'cryptography'} & set(sys.modules)))"
    )

    def imported(config: Path) -> str:
        return subprocess.run(
            [sys.executable, "-c", probe, str(config)],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()

    assert imported(secret_config) == "[]"
    assert imported(key_config) == "['cryptography', 'jwt']"


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


def b64(number: int, size: int) -> str:
    """Encode an integer as base64url of exactly ``size`` bytes, unpadded."""
    return base64.urlsafe_b64encode(number.to_bytes(size, "big")).rstrip(b"=").decode()


def test_ec_thumbprint_keeps_leading_zero_bytes() -> None:
    """An EC JWK's x and y are 32 bytes even when x starts with a zero byte."""
    for _ in range(4000):
        key = ec.generate_private_key(ec.SECP256R1()).public_key()
        numbers = key.public_numbers()
        if numbers.x < 1 << 248:
            break
    else:
        pytest.fail("no key with a short x coordinate turned up")

    expected = {"crv": "P-256", "kty": "EC", "x": b64(numbers.x, 32)}
    expected["y"] = b64(numbers.y, 32)
    canonical = json.dumps(expected, separators=(",", ":"), sort_keys=True)
    digest = hashlib.sha256(canonical.encode()).digest()

    assert public_jwk(key) == expected
    assert jwk_thumbprint(public_jwk(key)) == (
        base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    )


@pytest.mark.parametrize(
    ("jwk", "match"),
    [
        ({"kty": "oct", "k": "abc"}, "only RSA and EC"),
        ({"kty": "EC", "crv": "P-256", "x": "abc"}, "lacks y"),
    ],
)
def test_thumbprint_refuses_other_keys(jwk: dict[str, str], match: str) -> None:
    """Only complete RSA and EC public JWKs have a thumbprint."""
    with pytest.raises(ValueError, match=match):
        jwk_thumbprint(jwk)


def test_seen_ids_refuse_a_repeat_until_expiry() -> None:
    """A jti is refused while kept, per client, and forgotten after its time."""
    seen = SeenIds()
    seen.add("a", "jti-1", until=100.0, now=10.0)
    seen.add("b", "jti-1", until=100.0, now=10.0)

    with pytest.raises(ValueError, match="used before"):
        seen.add("a", "jti-1", until=100.0, now=99.0)
    seen.add("a", "jti-1", until=200.0, now=100.0)


def test_seen_ids_are_bounded() -> None:
    """A full cache refuses new ids rather than forget live ones, until they expire."""
    seen = SeenIds(size=2)
    seen.add("a", "1", until=50.0, now=0.0)
    seen.add("a", "2", until=60.0, now=0.0)

    with pytest.raises(ValueError, match="too many"):
        seen.add("a", "3", until=70.0, now=10.0)
    seen.add("a", "3", until=70.0, now=50.0)
    with pytest.raises(ValueError, match="used before"):
        seen.add("a", "2", until=70.0, now=55.0)
