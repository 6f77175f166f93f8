"""Send token requests to issuers: discover, authenticate, send, classify."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable, Mapping
from urllib.parse import urlsplit

import aiohttp
import structlog

from broker import credentials, redact
from broker.config import Client, Environment
from broker.discovery import Discovery, check_method
from broker.errors import IssuerError
from broker.grant import build_request, issuer_clock_skew, parse_response
from broker.metrics import Metrics
from broker.secret import Secret
from broker.token import Grant
from broker.transport import (
    TlsContexts,
    TlsFileError,
    cause_of,
    client_session,
    proxy_for,
    read_capped,
    why,
)

__all__ = ["MAX_BODY", "IssuerClient", "client_session", "proxy_for"]

# A token response is a few kilobytes; anything far larger is not one.
MAX_BODY = 256 * 1024
# However long the whole request may take, a TCP or TLS handshake that has
# not finished in this long is not going to.
CONNECT_TIMEOUT = 5.0

# Seconds of difference between the issuer's Date and our clock worth a
# warning: beyond the usual leeway of JWT validators (a minute or so).
SKEW_WARNING = 30.0

SkewObserver = Callable[[str, float], None]
# Called with the client's name and each HTTP status an issuer answered.
StatusObserver = Callable[[str, int], None]

log = structlog.get_logger("broker.issuer")


class IssuerClient:
    """Fetch tokens; every failure comes out as a classified IssuerError."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        observe_skew: SkewObserver | None = None,
        observe_status: StatusObserver | None = None,
    ) -> None:
        self._session = session
        self._tls = TlsContexts()
        self.discovery = Discovery(session)
        self._observe_skew = observe_skew
        self._observe_status = observe_status

    async def fetch(
        self,
        client: Client,
        env: Environment,
        timeout: float,
        environment: str = "",
        name: str = "",
    ) -> Grant:
        """Run one client-credentials request for ``client`` at ``env``.

        ``timeout`` bounds the whole exchange, metadata look-up included.
        Raises :class:`IssuerError` for every failure. When the issuer
        refuses the client and its credential file has changed since it was
        read (a rotation caught mid-flight), the request is sent once more.
        """
        where = _where(env.token_url or env.issuer or "")
        try:
            async with asyncio.timeout(timeout):
                before = credentials.fingerprint(client)
                try:
                    return await self._fetch(client, env, timeout, environment, name)
                except IssuerError as exc:
                    self._forget_endpoint(env, exc)
                    if exc.reason != "invalid_client":
                        raise
                    if credentials.fingerprint(client) in ("", before):
                        raise
                log.info("token.credentials_rotated", client=name or client.client_id)
                return await self._fetch(client, env, timeout, environment, name)
        except TimeoutError as exc:
            raise IssuerError(
                "timeout", _timeout_message(exc, where, timeout)
            ) from None

    async def _fetch(
        self,
        client: Client,
        env: Environment,
        timeout: float,
        environment: str,
        name: str,
    ) -> Grant:
        tls = self._tls_or_fail(env, client)
        url = await self._token_url(client, env, tls)
        secret = credentials.credential(client, url)
        request = build_request(client, url, secret)
        sent = _sent_forms(secret, request.headers.get("Authorization", ""))
        where = _where(url)

        wall_sent = time.time()
        try:
            async with self._session.post(
                request.url,
                data=request.body,
                headers=dict(request.headers),
                ssl=tls,
                proxy=proxy_for(request.url),
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(
                    sock_connect=min(timeout, CONNECT_TIMEOUT), sock_read=timeout
                ),
            ) as response:
                status, headers = response.status, response.headers
                if self._observe_status is not None:
                    self._observe_status(name, status)
                body = await read_capped(response, MAX_BODY)
        except (aiohttp.ClientSSLError, ssl.SSLError) as exc:
            raise IssuerError("tls", _tls_failure(where, exc, env)) from None
        except (aiohttp.ClientError, OSError) as exc:
            if isinstance(exc, TimeoutError):
                raise
            raise IssuerError(
                "connection", f"cannot reach {where}: {why(exc)}{_hint(exc, client)}"
            ) from None

        self._skew(headers, wall_sent, environment)
        if body is None:
            raise IssuerError(
                "malformed_response",
                f"answer from {where} is larger than {MAX_BODY} bytes",
                status=status,
            )

        return parse_response(
            status, headers, body, wall_now=time.time(), redact=sent, client=client
        )

    async def _token_url(
        self, client: Client, env: Environment, tls: ssl.SSLContext
    ) -> str:
        if env.token_url is not None:
            return env.token_url

        assert env.issuer is not None, "config validation guarantees one of them"
        metadata = await self.discovery.metadata(
            env.issuer, tls, proxy_for(env.issuer), trust=env.ca_file
        )
        check_method(metadata, client.auth, credentials.signing_alg(client))
        return metadata.token_endpoint

    def _forget_endpoint(self, env: Environment, error: IssuerError) -> None:
        """Look the endpoint up again after it failed in a way moving would.

        An issuer that moved its token endpoint answers the old one with a
        404, a redirect, or not at all; its new metadata says where to go.
        """
        moved = error.reason in ("http_3xx", "connection") or error.status in (
            404,
            405,
            410,
        )
        if env.issuer is not None and moved:
            self.discovery.forget(env.issuer, trust=env.ca_file)

    def _tls_or_fail(self, env: Environment, client: Client) -> ssl.SSLContext:
        try:
            return self._tls.get(env.ca_file, client.client_cert)
        except TlsFileError as exc:
            # The files were readable at load time; they may since have been
            # replaced by broken ones, which must not crash the refresher.
            raise IssuerError("tls", str(exc)) from None

    def _skew(
        self, headers: Mapping[str, str], wall_sent: float, environment: str
    ) -> None:
        if self._observe_skew is None:
            return
        skew = issuer_clock_skew(headers, wall_sent, time.time())
        if skew is not None:
            self._observe_skew(environment, skew)


def skew_observer(metrics: Metrics, warn_at: float = SKEW_WARNING) -> SkewObserver:
    """Export each issuer's clock skew; log when it passes ``warn_at``.

    Expiry is timed from our own send time, so a skewed issuer cannot make
    us serve a dead token; but its APIs judge ``exp`` on their own clock,
    and an operator should know. One log line per environment and change.
    """
    warned: dict[str, float] = {}

    def observe(environment: str, skew: float) -> None:
        metrics.issuer_skew(environment, skew)
        last = warned.get(environment)
        # The Date header ticks in whole seconds: only a move of several
        # seconds is a change worth another line.
        if abs(skew) >= warn_at and (last is None or abs(skew - last) >= 5):
            warned[environment] = skew
            log.warning("issuer.clock_skew", environment=environment, skew=round(skew))

    return observe


def _sent_forms(secret: Secret | None, authorization: str) -> list[str]:
    """Every form the credential travels in, for scrubbing and the log chain."""
    sent = [] if secret is None else [secret.reveal()]
    if authorization.startswith("Basic "):
        sent.append(authorization.removeprefix("Basic "))
    for value in sent:
        redact.remember_secret(value)
    return sent


def _hint(exc: BaseException, client: Client) -> str:
    # A server that demands a client certificate and gets none usually just
    # closes the connection after the handshake.
    disconnected = isinstance(exc, aiohttp.ServerDisconnectedError)
    if disconnected and client.client_cert is None:
        return " (an issuer that wants a client certificate does this: client_cert)"
    return ""


def _timeout_message(exc: BaseException, where: str, timeout: float) -> str:
    name = type(exc).__name__
    if "Connection" in name:
        return f"connecting to {where} took longer than {CONNECT_TIMEOUT:g}s"
    if "Socket" in name:
        return f"{where} sent nothing for {timeout:g}s"
    return f"no complete answer from {where} within {timeout:g}s"


def _tls_failure(where: str, exc: BaseException, env: Environment) -> str:
    message = f"TLS with {where} failed: {why(exc)}"
    if env.ca_file is None and isinstance(cause_of(exc), ssl.SSLCertVerificationError):
        message += "; if the issuer uses a private CA, set ca_file for it"
    return message


def _where(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"
