"""Client assertions for private_key_jwt (RFC 7523 section 2.2).

The client proves who it is with a short-lived JWT signed by its own private
key, as OpenID Connect Core section 9 describes. The broker makes them; the
dev issuer checks them. PyJWT and cryptography cost about 10 MB, so only
clients that use this method make the broker import this module.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import json
import secrets
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jwt
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from broker.secret import PemFile, Secret

if TYPE_CHECKING:
    from broker.config import Client

__all__ = [
    "ASSERTION_LIFETIME",
    "ASSERTION_TYPE",
    "SIGNING_ALGS",
    "SeenIds",
    "check_key",
    "client_assertion",
    "jwk_thumbprint",
    "load_public_key",
    "public_jwk",
    "verify_assertion",
]

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# Seconds. The assertion is made for one request and sent at once; a short
# life narrows what a captured one is good for.
ASSERTION_LIFETIME = 60
SIGNING_ALGS = ("RS256", "ES256")
MIN_RSA_BITS = 2048
# What a verifier accepts: seconds of clock difference forgiven, and the
# longest life an assertion may claim.
LEEWAY = 30
MAX_LIFETIME = 600

# RFC 7638 section 3.2: the required members of each key type.
_THUMBPRINT_MEMBERS = {"RSA": ("e", "kty", "n"), "EC": ("crv", "kty", "x", "y")}
_NEEDS = {
    "RS256": f"an RSA key of at least {MIN_RSA_BITS} bits",
    "ES256": "an EC P-256 key",
}

SigningKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey
_RSA = rsa.RSAPrivateKey | rsa.RSAPublicKey
_EC = ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey


def client_assertion(
    client: Client, audience: str, *, now: float | None = None
) -> Secret:
    """Return a new signed client assertion for ``client``, addressed to ``audience``.

    The key file is read on every call, so a rotated key is used at once.
    ``now`` is seconds since the Unix epoch (the wall clock by default).
    Raises ``ValueError``, never quoting the key, when the key is unusable.
    """
    if client.private_key is None:
        raise ValueError(f"client {client.client_id} has no private_key")
    key, alg = _load(client.private_key.read().reveal(), client.signing_alg)

    issued_at = int(time.time() if now is None else now)
    claims = {
        "iss": client.client_id,
        "sub": client.client_id,
        "aud": audience,
        "iat": issued_at,
        "exp": issued_at + ASSERTION_LIFETIME,
        # RFC 7523 section 3: the issuer may refuse a jti it has seen before.
        "jti": secrets.token_urlsafe(24),
    }
    kid = client.key_id or jwk_thumbprint(public_jwk(key.public_key()))
    headers = {"kid": kid, "typ": "JWT"}

    return Secret(jwt.encode(claims, key, algorithm=alg, headers=headers))


def check_key(pem: str, alg: str | None) -> str:
    """Check that ``pem`` is an unencrypted private key fit for ``alg``.

    Returns the algorithm to sign with: ``alg``, or RS256 for an RSA key and
    ES256 for an EC P-256 key when ``alg`` is None. Raises ``ValueError``
    whose message never quotes the key.
    """
    return _load(pem, alg)[1]


def _load(pem: str, alg: str | None) -> tuple[SigningKey, str]:
    try:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
    except TypeError:
        raise ValueError(
            "the private key is encrypted; give it unencrypted (PKCS#8 or "
            "traditional PEM) and protect the file instead"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        # from None: the parser's message may describe the key's bytes.
        raise ValueError(
            "the private_key file holds no readable private key (expected an "
            "unencrypted PKCS#8 or traditional PEM key)"
        ) from None

    if alg is not None and alg not in _NEEDS:
        raise ValueError(f"signing_alg {alg} is not supported; use RS256 or ES256")
    fits = _algorithm_for(key)
    if fits is None or not isinstance(key, SigningKey):
        raise ValueError(
            f"the private key is {_describe(key)}; private_key_jwt needs "
            f"{_NEEDS['RS256']} (RS256) or {_NEEDS['ES256']} (ES256)"
        )
    if alg is not None and alg != fits:
        raise ValueError(
            f"signing_alg {alg} needs {_NEEDS[alg]}; the private key is "
            f"{_describe(key)}"
        )

    return key, fits


def _algorithm_for(key: object) -> str | None:
    """Return the one algorithm ``key`` (private or public) may be used with."""
    if isinstance(key, _RSA) and key.key_size >= MIN_RSA_BITS:
        return "RS256"
    if isinstance(key, _EC) and isinstance(key.curve, ec.SECP256R1):
        return "ES256"
    return None


def _describe(key: object) -> str:
    if isinstance(key, _RSA):
        return f"an RSA key of {key.key_size} bits"
    if isinstance(key, _EC):
        return f"an EC key on curve {key.curve.name}"
    kind = type(key).__name__.removeprefix("_")
    for suffix in ("PrivateKey", "PublicKey"):
        kind = kind.removesuffix(suffix)
    return f"an {kind} key" if kind[:1] in "AEIOU" else f"a {kind} key"


def public_jwk(key: PublicKey) -> dict[str, str]:
    """Return the public JWK (RFC 7517) of an RSA or EC key: required members only."""
    full: Mapping[str, Any]
    if isinstance(key, rsa.RSAPublicKey):
        full = RSAAlgorithm.to_jwk(key, as_dict=True)
    else:
        full = ECAlgorithm.to_jwk(key, as_dict=True)

    return {name: full[name] for name in _THUMBPRINT_MEMBERS[full["kty"]]}


def jwk_thumbprint(jwk: Mapping[str, str]) -> str:
    """Return the RFC 7638 SHA-256 thumbprint of an RSA or EC public JWK.

    Raises ``ValueError`` for another key type or a missing member.
    """
    members = _THUMBPRINT_MEMBERS.get(jwk.get("kty", ""))
    if members is None:
        raise ValueError("only RSA and EC keys have a thumbprint here")
    missing = [name for name in members if name not in jwk]
    if missing:
        raise ValueError(f"the JWK lacks {', '.join(missing)}")

    # RFC 7638 section 3.2: the required members only, sorted, no whitespace.
    canonical = json.dumps(
        {name: jwk[name] for name in members}, separators=(",", ":"), sort_keys=True
    )
    digest = hashlib.sha256(canonical.encode()).digest()

    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def load_public_key(source: PemFile) -> tuple[PublicKey, str]:
    """Read a PEM public key or X.509 certificate; return it and its algorithm.

    Raises ``ValueError`` naming the file when it is unreadable, holds neither,
    or holds a key that is not RSA of at least 2048 bits (RS256) or EC P-256
    (ES256).
    """
    data = source.read().reveal().encode()
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            key: object = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError(
            f"{source.path} holds no readable PEM public key or certificate"
        ) from None

    alg = _algorithm_for(key)
    if alg is None or not isinstance(key, PublicKey):
        raise ValueError(
            f"the key in {source.path} is {_describe(key)}; expected "
            f"{_NEEDS['RS256']} (RS256) or {_NEEDS['ES256']} (ES256)"
        )

    return key, alg


def verify_assertion(
    assertion: str,
    key: PublicKey,
    alg: str,
    *,
    client_id: str,
    audiences: list[str],
    now: float,
    seen: SeenIds,
) -> dict[str, Any]:
    """Check a client assertion as RFC 7523 section 3 asks; return its claims.

    The signature must verify with ``key`` under ``alg``; iss and sub must be
    ``client_id``; aud must name one of ``audiences``; exp, iat and nbf must
    fit ``now`` (seconds since the epoch) within :data:`LEEWAY`, and the whole
    life must not pass :data:`MAX_LIFETIME`; jti must be new to ``seen``,
    which then keeps it. Raises ``ValueError`` naming what is wrong, never
    quoting the assertion.
    """
    claims = _verified_claims(assertion, key, alg, audiences)
    if claims["iss"] != client_id or claims["sub"] != client_id:
        raise ValueError("the client assertion's iss and sub must be the client_id")
    if not isinstance(claims["jti"], str) or not claims["jti"]:
        raise ValueError("the client assertion's jti is not a string")
    _check_times(claims, now)
    # Refused as long as it would be accepted: until exp plus the leeway.
    seen.add(client_id, claims["jti"], claims["exp"] + LEEWAY, now)

    return claims


def _verified_claims(
    assertion: str, key: PublicKey, alg: str, audiences: list[str]
) -> dict[str, Any]:
    # Times are checked apart, against the caller's clock rather than PyJWT's.
    options: Any = {
        "require": ["iss", "sub", "aud", "exp", "jti"],
        "verify_exp": False,
        "verify_iat": False,
        "verify_nbf": False,
    }
    try:
        claims: dict[str, Any] = jwt.decode(
            assertion, key, algorithms=[alg], audience=audiences, options=options
        )
    except jwt.InvalidAlgorithmError:
        problem = f"is not signed with {alg}, the algorithm of the client's key"
    except jwt.InvalidSignatureError:
        problem = "has a signature the client's public key does not verify"
    except jwt.InvalidAudienceError:
        problem = "has an aud naming neither the token endpoint nor the issuer"
    except jwt.MissingRequiredClaimError as exc:
        problem = f"has no {exc.claim} claim"
    except jwt.DecodeError:
        problem = "is not a well-formed JWT"
    except jwt.InvalidTokenError as exc:
        problem = f"is invalid ({exc})"
    else:
        return claims

    raise ValueError(f"the client assertion {problem}")


def _check_times(claims: Mapping[str, Any], now: float) -> None:
    for name in ("exp", "iat", "nbf"):
        value = claims.get(name)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int | float)
        ):
            raise ValueError(f"the client assertion's {name} is not a number")

    exp: float = claims["exp"]
    iat: float | None = claims.get("iat")
    nbf: float | None = claims.get("nbf")
    if exp <= now - LEEWAY:
        raise ValueError("the client assertion has expired")
    if iat is not None and iat > now + LEEWAY:
        raise ValueError("the client assertion's iat is in the future")
    if nbf is not None and nbf > now + LEEWAY:
        raise ValueError("the client assertion is not valid yet (nbf)")
    if exp - (now if iat is None else iat) > MAX_LIFETIME:
        raise ValueError(f"the client assertion lives longer than {MAX_LIFETIME} s")


class SeenIds:
    """The jti of each accepted assertion, kept until that assertion expires.

    RFC 7523 section 3 lets a verifier refuse a jti it has seen. Assertions
    live at most :data:`MAX_LIFETIME`, so ``size`` bounds memory, not history.
    """

    def __init__(self, size: int = 10_000) -> None:
        self._size = size
        self._until: dict[tuple[str, str], float] = {}
        self._queue: list[tuple[float, tuple[str, str]]] = []

    def add(self, client_id: str, jti: str, until: float, now: float) -> None:
        """Keep ``jti`` until ``until``; raise ``ValueError`` if already kept."""
        while self._queue and self._queue[0][0] <= now:
            _, old = heapq.heappop(self._queue)
            del self._until[old]

        key = (client_id, jti)
        if key in self._until:
            raise ValueError("the client assertion's jti was used before")
        if len(self._until) >= self._size:
            # Forgetting a live jti would let its assertion be replayed.
            raise ValueError("too many client assertions are live; retry shortly")

        self._until[key] = until
        heapq.heappush(self._queue, (until, key))
