"""Send token requests to issuers over one shared aiohttp client session."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
import urllib.request
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import aiohttp

from broker import redact
from broker.config import Client, Environment, is_loopback_host
from broker.errors import IssuerError
from broker.grant import build_request, parse_response
from broker.secret import Secret
from broker.token import Grant

# A token response is a few kilobytes; anything far larger is not one.
MAX_BODY = 256 * 1024


class IssuerClient:
    """Fetch tokens; every failure comes out as a classified IssuerError."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session
        self._tls: dict[str | None, ssl.SSLContext] = {}

    def tls_context(self, ca_file: str | None) -> ssl.SSLContext:
        """Verification always on; ``ca_file`` is trusted on top of the system."""
        if ca_file not in self._tls:
            context = ssl.create_default_context()
            if ca_file:
                context.load_verify_locations(cafile=ca_file)
            self._tls[ca_file] = context
        return self._tls[ca_file]

    async def fetch(self, client: Client, env: Environment, timeout: float) -> Grant:
        """Run one client-credentials request for ``client`` at ``env``.

        Raises :class:`IssuerError` for every failure, the secret file that
        cannot be read included.
        """
        secret = _read_secret(client)
        request = build_request(client, env.token_url, secret)
        where = _where(env.token_url)
        tls = self._tls_or_fail(env.ca_file)
        # Every form the secret travels in, for the log chain and for error
        # messages quoting what an issuer echoed back.
        sent = [secret.reveal()]
        authorization = request.headers.get("Authorization", "")
        if authorization.startswith("Basic "):
            sent.append(authorization.removeprefix("Basic "))
        for value in sent:
            redact.remember_secret(value)

        try:
            async with asyncio.timeout(timeout):
                async with self._session.post(
                    request.url,
                    data=request.body,
                    headers=dict(request.headers),
                    ssl=tls,
                    proxy=proxy_for(request.url),
                    allow_redirects=False,
                ) as response:
                    status, headers = response.status, response.headers
                    body = await _read_capped(response)
        except TimeoutError:
            raise IssuerError(
                "timeout", f"no answer from {where} within {timeout:g}s"
            ) from None
        except (aiohttp.ClientSSLError, ssl.SSLError) as exc:
            raise IssuerError("tls", _tls_failure(where, exc, env)) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise IssuerError(
                "connection", f"cannot reach {where}: {_why(exc)}"
            ) from None

        if body is None:
            raise IssuerError(
                "malformed_response",
                f"answer from {where} is larger than {MAX_BODY} bytes",
                status=status,
            )

        return parse_response(
            status,
            headers,
            body,
            wall_now=time.time(),
            redact=sent,
        )

    def _tls_or_fail(self, ca_file: str | None) -> ssl.SSLContext:
        try:
            return self.tls_context(ca_file)
        except (ssl.SSLError, OSError) as exc:
            # The bundle was readable at load time; it may since have been
            # replaced by a broken one, which must not crash the refresher.
            raise IssuerError(
                "tls", f"cannot load the CA bundle {ca_file}: {_why(exc)}"
            ) from None


@contextlib.asynccontextmanager
async def client_session() -> AsyncIterator[aiohttp.ClientSession]:
    """The one session all token requests share.

    It does not trust the environment: proxies come from :func:`proxy_for`
    per request, and ``~/.netrc`` must not add credentials of its own.
    """
    connector = aiohttp.TCPConnector(limit=64, ttl_dns_cache=60)
    async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:
        yield session


def proxy_for(url: str) -> str | None:
    """The proxy for a token request: ``HTTPS_PROXY`` unless ``NO_PROXY``.

    Only https requests ever go through a proxy. Plain http is allowed only
    to loopback hosts, and an ``HTTP_PROXY`` would carry such a request, the
    secret in clear, off the machine. The session does not read the
    environment itself, so ``~/.netrc`` cannot add a second set of
    credentials either.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme != "https" or is_loopback_host(host):
        return None
    proxies = urllib.request.getproxies_environment()
    bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]
    if "https" not in proxies or bypass(host):
        return None

    return proxies["https"]


async def _read_capped(response: aiohttp.ClientResponse) -> bytes | None:
    """Read the body; ``None`` once it is past :data:`MAX_BODY`.

    One ``read(n)`` returns what has arrived so far, not ``n`` bytes, so a
    body that comes in several packets is read in a loop.
    """
    if (response.content_length or 0) > MAX_BODY:
        return None

    body = bytearray()
    while chunk := await response.content.read(MAX_BODY + 1 - len(body)):
        body += chunk
        if len(body) > MAX_BODY:
            return None

    return bytes(body)


def _read_secret(client: Client) -> Secret:
    assert client.client_secret is not None, "config validation guarantees it"
    try:
        return client.client_secret.read()
    except ValueError as exc:
        raise IssuerError("secret_unreadable", str(exc)) from None


def _where(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def _tls_failure(where: str, exc: BaseException, env: Environment) -> str:
    message = f"TLS with {where} failed: {_why(exc)}"
    if env.ca_file is None and _verification_failed(exc):
        message += "; if the issuer uses a private CA, set ca_file for it"
    return message


def _verification_failed(exc: BaseException) -> bool:
    return isinstance(_cause(exc), ssl.SSLCertVerificationError)


def _why(exc: BaseException) -> str:
    """A short cause: the OS error text when there is one, else the class."""
    cause = _cause(exc)
    if isinstance(cause, ssl.SSLCertVerificationError):
        return cause.verify_message or "certificate verification failed"
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return type(exc).__name__


def _cause(exc: BaseException) -> BaseException:
    return getattr(exc, "os_error", None) or exc.__cause__ or exc
