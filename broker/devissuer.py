"""The embedded dev issuer: a small, strict OAuth 2.0 authorization server.

It grants client-credentials tokens (RFC 6749 4.4) as RS256 JWTs in the
RFC 9068 access-token profile to clients holding a secret or a key (RFC 7523
2.2), publishes its key set and RFC 8414 metadata, serves https when given a
certificate, and refuses bad requests the way a production issuer would, so
that the broker and other tools can be pointed at it on a laptop. The signing
key lives only in memory and is new at every start.
"""

from __future__ import annotations

import base64
import hmac
import secrets
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus, urlsplit

import jwt
import structlog
from aiohttp import hdrs, web
from cryptography.hazmat.primitives.asymmetric import rsa

from broker.assertion import (
    ASSERTION_TYPE,
    SIGNING_ALGS,
    SeenIds,
    jwk_thumbprint,
    load_public_key,
    public_jwk,
    verify_assertion,
)
from broker.devconfig import DevClient, DevIssuer, DevTls
from broker.errors import BrokerError
from broker.fields import SCOPE_TOKEN, HostPort
from broker.secret import PemFile, load_chain

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


class _SigningKey:
    """An RSA 2048 key made in memory, with its public JWK set."""

    def __init__(self) -> None:
        self._private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        public = public_jwk(self._private.public_key())
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


@dataclass(frozen=True)
class _Presented:
    """Who a request says it comes from, how, and the secret or assertion."""

    client_id: str
    method: str
    proof: str = field(repr=False)


def _credentials(params: Params, authorization: str | None) -> _Presented:
    """Return the client's claimed id and proof: Basic, body secret or assertion."""
    body_id = _single(params, "client_id")
    body_secret = _single(params, "client_secret")
    assertion = _single(params, "client_assertion")
    assertion_type = _single(params, "client_assertion_type")
    by_assertion = assertion is not None or assertion_type is not None
    if (authorization is not None) + (body_secret is not None) + by_assertion > 1:
        # RFC 6749 section 2.3.1: one authentication method per request.
        raise _Refusal(
            "invalid_request", "use one client authentication method, not several"
        )

    if by_assertion:
        return _assertion_credentials(body_id, assertion, assertion_type)
    if authorization is None:
        if body_id is None or body_secret is None:
            raise _bad_client("client authentication is missing")
        return _Presented(body_id, "client_secret_post", body_secret)
    client_id, secret = _basic(authorization)
    # A bare client_id beside Basic is an identifier, not a second method;
    # several client libraries send it, so accept it when it agrees.
    if body_id is not None and body_id != client_id:
        raise _Refusal(
            "invalid_request", "client_id in the body differs from the Basic one"
        )

    return _Presented(client_id, "client_secret_basic", secret)


def _assertion_credentials(
    body_id: str | None, assertion: str | None, assertion_type: str | None
) -> _Presented:
    if assertion_type != ASSERTION_TYPE:
        raise _bad_client(f"client_assertion_type must be {ASSERTION_TYPE}")
    if assertion is None:
        raise _bad_client("client_assertion is missing")
    try:
        unverified = jwt.decode(assertion, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        raise _bad_client("the client assertion is not a well-formed JWT") from None

    # RFC 7523 section 3: sub is the client_id; the body may name it as well.
    client_id = unverified.get("sub") if body_id is None else body_id
    if not isinstance(client_id, str) or not client_id:
        raise _bad_client("the client assertion has no sub naming the client")

    return _Presented(client_id, "private_key_jwt", assertion)


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
        self._seen = SeenIds()
        for name, client in settings.clients.items():
            if client.public_key is not None:
                try:
                    load_public_key(PemFile(client.public_key))
                except ValueError as exc:
                    raise BrokerError(f"dev_issuer.clients.{name}: {exc}") from None
        # Compared against for unknown ids, so timing does not tell which exist.
        self._decoy = secrets.token_urlsafe(32)
        self._log = structlog.get_logger(_LOGGER)

    def base_url(self) -> str:
        """Return the issuer identifier, without a trailing slash."""
        return self._issuer_url().rstrip("/")

    def _authenticate(self, presented: _Presented) -> DevClient:
        if presented.method == "private_key_jwt":
            return self._verify_assertion(presented.client_id, presented.proof)

        client_id, secret = presented.client_id, presented.proof
        client = self._settings.clients.get(client_id)
        expected = self._decoy if client is None else client.secret
        # A client without a secret still costs a comparison, like an unknown one.
        matches = hmac.compare_digest(
            secret.encode(), (expected or self._decoy).encode()
        )
        if client is None or expected is None or not matches:
            raise _bad_client("client authentication failed")

        return client

    def _verify_assertion(self, client_id: str, assertion: str) -> DevClient:
        client = self._settings.clients.get(client_id)
        if client is None or client.public_key is None:
            raise _bad_client("no client with this id has a registered public key")
        try:
            # Read per request, so a rotated key file counts at once.
            key, alg = load_public_key(PemFile(client.public_key))
        except ValueError as exc:
            self._log.warning(
                "dev_issuer.public_key_unusable", client=client_id, error=str(exc)
            )
            raise _bad_client(
                "the client's registered public key is unusable"
            ) from None

        base, now = self.base_url(), self._now()
        try:
            verify_assertion(
                assertion,
                key,
                alg,
                client_id=client_id,
                audiences=[base + TOKEN_PATH, base],
                now=now,
                seen=self._seen,
            )
        except ValueError as exc:
            raise _bad_client(str(exc)) from None

        return client

    def grant(self, presented: _Presented, params: Params) -> dict[str, Any]:
        """Check one client-credentials request and return the token response."""
        client = self._authenticate(presented)
        client_id = presented.client_id
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
            presented = _credentials(params, request.headers.get(hdrs.AUTHORIZATION))
            client_id = presented.client_id
            body = self.grant(presented, params)
        except _Refusal as refusal:
            self._log.info(
                "dev_issuer.token_refused", client=client_id, error=refusal.error
            )
            return _refusal_response(refusal)

        self._log.info(
            "dev_issuer.token_issued",
            client=client_id,
            auth=presented.method,
            scope=body.get("scope", ""),
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
                "private_key_jwt",
            ],
            "token_endpoint_auth_signing_alg_values_supported": list(SIGNING_ALGS),
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


def _tls_context(tls: DevTls) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        load_chain(context, tls.cert, tls.key)
    except OSError as exc:
        reason = getattr(exc, "reason", None) or exc.strerror or "unreadable"
        raise BrokerError(
            f"dev_issuer.tls: {tls.cert} and {tls.key} are not a usable "
            f"certificate chain and key ({reason})"
        ) from None

    return context


async def start(settings: DevIssuer, *, port: int | None = None) -> DevIssuerServer:
    """Serve the dev issuer on ``settings.listen``; ``port`` 0 picks a free one.

    With ``settings.tls`` it serves https. Raises :class:`BrokerError` when
    the certificate, its key or a client's public key cannot be used.
    """
    host = settings.listen.host
    tls = None if settings.tls is None else _tls_context(settings.tls)
    url = ""  # set below, before the loop can deliver the first request
    runner = web.AppRunner(create_app(settings, issuer_url=lambda: url))
    await runner.setup()
    try:
        bind_port = settings.listen.port if port is None else port
        await web.TCPSite(runner, host, bind_port, ssl_context=tls).start()
    except BaseException:
        await runner.cleanup()
        raise

    scheme = "http" if tls is None else "https"
    url = f"{scheme}://{HostPort(host=host, port=runner.addresses[0][1])}"
    structlog.get_logger(_LOGGER).info(
        "dev_issuer.started", url=url, clients=len(settings.clients)
    )

    return DevIssuerServer(runner, url)
