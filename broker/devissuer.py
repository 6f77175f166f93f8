"""The embedded dev issuer: a small, strict OAuth 2.0 authorization server.

It grants client-credentials tokens (RFC 6749 4.4) as RS256 JWTs in the
RFC 9068 access-token profile, publishes its key set and RFC 8414 metadata,
and refuses bad requests the way a production issuer would, so that the broker
and other tools can be pointed at it on a laptop. The signing key lives only
in memory and is new at every start.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import unquote_plus, urlsplit

import jwt
import structlog
from aiohttp import hdrs, web
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.utils import to_base64url_uint

from broker.config import DevClient, DevIssuer, HostPort
from broker.fields import SCOPE_TOKEN

TOKEN_PATH = "/oauth2/token"  # noqa: S105 - a URL path, not a password
JWKS_PATH = "/jwks.json"
METADATA_PATHS = (
    "/.well-known/oauth-authorization-server",
    "/.well-known/openid-configuration",
)

_LOGGER = "broker.devissuer"
_CHALLENGE = 'Basic realm="token-broker-dev"'
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
_FORM = "application/x-www-form-urlencoded"
_JSON = "application/json"

Params = dict[str, list[str]]


class _Refusal(Exception):
    """A token request turned down with an RFC 6749 5.2 error code."""

    def __init__(self, error: str, description: str, *, status: int = 400) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status


def _bad_client(description: str) -> _Refusal:
    return _Refusal("invalid_client", description, status=401)


def jwk_thumbprint(jwk: Mapping[str, str]) -> str:
    """Return the RFC 7638 SHA-256 thumbprint of an RSA public JWK."""
    if jwk.get("kty") != "RSA":
        raise ValueError("only RSA keys are supported")

    # RFC 7638 section 3.2: the required members only, sorted, no whitespace.
    canonical = json.dumps(
        {name: jwk[name] for name in ("e", "kty", "n")},
        separators=(",", ":"),
        sort_keys=True,
    )
    digest = hashlib.sha256(canonical.encode()).digest()

    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


class _SigningKey:
    """An RSA 2048 key made in memory, with its public JWK set."""

    def __init__(self) -> None:
        self._private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        numbers = self._private.public_key().public_numbers()
        public = {
            "kty": "RSA",
            "n": to_base64url_uint(numbers.n).decode(),
            "e": to_base64url_uint(numbers.e).decode(),
        }
        self.kid = jwk_thumbprint(public)
        jwk = {**public, "kid": self.kid, "alg": "RS256", "use": "sig"}
        self.jwks = {"keys": [jwk]}

    def sign(self, claims: dict[str, Any]) -> str:
        """Return ``claims`` as a compact RS256 JWT typed ``at+jwt`` (RFC 9068)."""
        headers = {"kid": self.kid, "typ": "at+jwt"}
        return jwt.encode(claims, self._private, algorithm="RS256", headers=headers)


def _single(params: Params, name: str) -> str | None:
    values = params.get(name, [])
    if len(values) > 1:
        # RFC 6749 section 3.2: parameters MUST NOT be included more than once.
        raise _Refusal("invalid_request", f"{name} is given more than once")

    return values[0] if values else None


async def _read_params(request: web.Request) -> Params:
    """Read the token request body, form-encoded or JSON, as name -> values."""
    pairs: list[tuple[str, object]]
    try:
        if request.content_type == _FORM:
            pairs = list((await request.post()).items())
        elif request.content_type == _JSON:
            pairs = _json_pairs(await request.json())
        else:
            raise _Refusal("invalid_request", f"send the body as {_FORM} or {_JSON}")
    except ValueError:
        raise _Refusal("invalid_request", "the request body is malformed") from None

    params: Params = {}
    for name, value in pairs:
        if not isinstance(value, str):
            raise _Refusal("invalid_request", f"{name} must be a string")
        # RFC 6749 section 3.2: a parameter without a value counts as omitted.
        if value:
            params.setdefault(name, []).append(value)

    return params


def _json_pairs(data: object) -> list[tuple[str, object]]:
    if not isinstance(data, dict):
        raise _Refusal("invalid_request", "the JSON body must be an object")

    pairs: list[tuple[str, object]] = []
    for name, value in data.items():
        # RFC 8707 lets resource repeat; in JSON that is a list of strings.
        if name == "resource" and isinstance(value, list):
            pairs.extend((name, item) for item in value)
        elif value is not None:
            pairs.append((name, value))

    return pairs


def _credentials(params: Params, authorization: str | None) -> tuple[str, str]:
    """Return (client_id, secret) from HTTP Basic or from the body."""
    body_id = _single(params, "client_id")
    body_secret = _single(params, "client_secret")
    if authorization is None:
        if body_id is None or body_secret is None:
            raise _bad_client("client authentication is missing")
        return body_id, body_secret

    if body_secret is not None:
        # RFC 6749 section 2.3.1: one authentication method per request.
        raise _Refusal(
            "invalid_request", "authenticate by HTTP Basic or in the body, not both"
        )
    client_id, secret = _basic(authorization)
    # A bare client_id beside Basic is an identifier, not a second method;
    # several client libraries send it, so accept it when it agrees.
    if body_id is not None and body_id != client_id:
        raise _Refusal(
            "invalid_request", "client_id in the body differs from the Basic one"
        )

    return client_id, secret


def _basic(authorization: str) -> tuple[str, str]:
    scheme, _, encoded = authorization.partition(" ")
    if scheme.lower() != "basic":
        raise _bad_client("only HTTP Basic client authentication is accepted")
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode()
    except ValueError:
        # from None: the decode error's repr would carry the secret's bytes.
        raise _bad_client("the Basic credentials are malformed") from None

    raw_id, colon, raw_secret = decoded.partition(":")
    if not colon:
        raise _bad_client("the Basic credentials are malformed")

    # RFC 6749 section 2.3.1: both parts are form-urlencoded before encoding.
    return unquote_plus(raw_id), unquote_plus(raw_secret)


def _granted_scopes(requested: str | None, client: DevClient) -> list[str]:
    if requested is None:
        return list(client.scopes)

    names = requested.split(" ")
    if not all(SCOPE_TOKEN.fullmatch(name) for name in names):
        raise _Refusal("invalid_scope", "scope is malformed (RFC 6749 section 3.3)")
    refused = [name for name in names if name not in client.scopes]
    if refused:
        raise _Refusal("invalid_scope", f"not allowed: {' '.join(refused)}")

    return list(dict.fromkeys(names))


def _audience(params: Params, default: str) -> str | list[str]:
    audience = _single(params, "audience")
    resources = list(dict.fromkeys(params.get("resource", [])))
    for resource in resources:
        _check_resource(resource)

    if resources:
        return resources[0] if len(resources) == 1 else resources
    return audience or default


def _check_resource(value: str) -> None:
    try:
        scheme = urlsplit(value).scheme
    except ValueError:
        scheme = ""
    # RFC 8707 section 2: an absolute URI (RFC 3986 4.3) with no fragment.
    if not scheme or "#" in value or any(char.isspace() for char in value):
        raise _Refusal(
            "invalid_target", "resource must be an absolute URI without a fragment"
        )


def _refusal_response(refusal: _Refusal) -> web.Response:
    headers = dict(_NO_STORE)
    if refusal.status == 401:
        # RFC 6749 section 5.2: a 401 carries the challenge for the scheme.
        headers[hdrs.WWW_AUTHENTICATE] = _CHALLENGE
    body = {"error": refusal.error, "error_description": refusal.description}

    return web.json_response(body, status=refusal.status, headers=headers)


class _Issuer:
    """The issuer's state and its request handlers."""

    def __init__(
        self,
        settings: DevIssuer,
        issuer_url: Callable[[], str],
        now: Callable[[], float],
    ) -> None:
        self._settings = settings
        self._issuer_url = issuer_url
        self._now = now
        self._key = _SigningKey()
        # Compared against for unknown ids, so timing does not tell which exist.
        self._decoy = secrets.token_urlsafe(32)
        self._log = structlog.get_logger(_LOGGER)

    def base_url(self) -> str:
        """Return the issuer identifier, without a trailing slash."""
        return self._issuer_url().rstrip("/")

    def _authenticate(self, client_id: str, secret: str) -> DevClient:
        client = self._settings.clients.get(client_id)
        expected = self._decoy if client is None else client.secret
        matches = hmac.compare_digest(secret.encode(), expected.encode())
        if client is None or not matches:
            raise _bad_client("client authentication failed")

        return client

    def grant(self, client_id: str, secret: str, params: Params) -> dict[str, Any]:
        """Check one client-credentials request and return the token response."""
        client = self._authenticate(client_id, secret)
        grant_type = _single(params, "grant_type")
        if grant_type is None:
            raise _Refusal("invalid_request", "grant_type is missing")
        if grant_type != "client_credentials":
            raise _Refusal(
                "unsupported_grant_type", "only client_credentials is supported"
            )

        scopes = _granted_scopes(_single(params, "scope"), client)
        audience = _audience(params, self._settings.audience)

        issued_at = int(self._now())
        lifetime = max(1, round(self._settings.token_lifetime))
        claims: dict[str, Any] = {
            "iss": self.base_url(),
            "sub": client_id,
            "client_id": client_id,
            "aud": audience,
            "iat": issued_at,
            "exp": issued_at + lifetime,
            "jti": secrets.token_urlsafe(16),
        }
        body: dict[str, Any] = {"token_type": "Bearer", "expires_in": lifetime}
        # RFC 6749 section 3.3 has no empty scope, so none granted means none sent.
        if scopes:
            claims["scope"] = body["scope"] = " ".join(scopes)
        body["access_token"] = self._key.sign(claims)

        return body

    async def token(self, request: web.Request) -> web.Response:
        """Serve POST /oauth2/token."""
        client_id: str | None = None
        try:
            params = await _read_params(request)
            client_id, secret = _credentials(
                params, request.headers.get(hdrs.AUTHORIZATION)
            )
            body = self.grant(client_id, secret, params)
        except _Refusal as refusal:
            self._log.info(
                "dev_issuer.token_refused", client=client_id, error=refusal.error
            )
            return _refusal_response(refusal)

        self._log.info(
            "dev_issuer.token_issued", client=client_id, scope=body.get("scope", "")
        )
        return web.json_response(body, headers=_NO_STORE)

    async def jwks(self, request: web.Request) -> web.Response:
        """Serve the public key set."""
        return web.json_response(self._key.jwks)

    async def metadata(self, request: web.Request) -> web.Response:
        """Serve the RFC 8414 authorization server metadata."""
        base = self.base_url()
        scopes = {scope for c in self._settings.clients.values() for scope in c.scopes}
        document = {
            "issuer": base,
            "token_endpoint": base + TOKEN_PATH,
            "jwks_uri": base + JWKS_PATH,
            "grant_types_supported": ["client_credentials"],
            "token_endpoint_auth_methods_supported": [
                "client_secret_basic",
                "client_secret_post",
            ],
            "scopes_supported": sorted(scopes),
            # RFC 8414 section 2 requires this array, and RFC 7591 section 2.1
            # pairs client_credentials with no response type. Without an
            # authorization endpoint the truthful list is empty; "token" would
            # advertise an implicit flow that no client could complete.
            "response_types_supported": [],
        }

        return web.json_response(document)


def create_app(
    settings: DevIssuer,
    *,
    issuer_url: Callable[[], str] | str,
    now: Callable[[], float] = time.time,
) -> web.Application:
    """Build the issuer app; ``issuer_url`` may be a callable read per request.

    A callable lets the caller bind first and learn the port afterwards. A new
    RSA signing key is generated here, so tokens do not survive a restart.
    """
    url = issuer_url if callable(issuer_url) else lambda: issuer_url
    issuer = _Issuer(settings, url, now)

    app = web.Application()
    app.router.add_post(TOKEN_PATH, issuer.token)
    app.router.add_get(JWKS_PATH, issuer.jwks)
    for path in METADATA_PATHS:
        app.router.add_get(path, issuer.metadata)

    return app


class DevIssuerServer:
    """A running dev issuer, listening until :meth:`close`."""

    def __init__(self, runner: web.AppRunner, url: str) -> None:
        self._runner = runner
        self.url = url
        self.token_url = url + TOKEN_PATH

    async def close(self) -> None:
        """Stop listening and finish the requests in flight."""
        await self._runner.cleanup()


async def start(settings: DevIssuer, *, port: int | None = None) -> DevIssuerServer:
    """Serve the dev issuer on ``settings.listen``; ``port`` 0 picks a free one."""
    host = settings.listen.host
    url = ""  # set below, before the loop can deliver the first request
    runner = web.AppRunner(create_app(settings, issuer_url=lambda: url))
    await runner.setup()
    try:
        bind_port = settings.listen.port if port is None else port
        await web.TCPSite(runner, host, bind_port).start()
    except BaseException:
        await runner.cleanup()
        raise

    url = f"http://{HostPort(host=host, port=runner.addresses[0][1])}"
    structlog.get_logger(_LOGGER).info(
        "dev_issuer.started", url=url, clients=len(settings.clients)
    )

    return DevIssuerServer(runner, url)
