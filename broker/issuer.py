"""Send token requests to issuers over one shared aiohttp client session."""

from __future__ import annotations

import asyncio
import ssl
import time
from urllib.parse import urlsplit

import aiohttp

from broker.config import Client, Environment
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
        """Run one client-credentials request for ``client`` at ``env``."""
        secret = _read_secret(client)
        request = build_request(client, env.token_url, secret)
        where = _where(env.token_url)

        try:
            async with asyncio.timeout(timeout):
                async with self._session.post(
                    request.url,
                    data=request.body,
                    headers=dict(request.headers),
                    ssl=self.tls_context(env.ca_file),
                    allow_redirects=False,
                ) as response:
                    body = await response.content.read(MAX_BODY + 1)
                    status, headers = response.status, response.headers
        except TimeoutError:
            raise IssuerError(
                "timeout", f"no answer from {where} within {timeout:g}s"
            ) from None
        except aiohttp.ClientSSLError as exc:
            raise IssuerError("tls", f"TLS with {where} failed: {_why(exc)}") from None
        except aiohttp.ClientError as exc:
            raise IssuerError(
                "connection", f"cannot reach {where}: {_why(exc)}"
            ) from None

        if len(body) > MAX_BODY:
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
            redact=(secret.reveal(),),
        )


def _read_secret(client: Client) -> Secret:
    assert client.client_secret is not None, "config validation guarantees it"
    try:
        return client.client_secret.read()
    except ValueError as exc:
        raise IssuerError("secret_unreadable", str(exc)) from None


def _where(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def _why(exc: BaseException) -> str:
    """A short cause: the OS error text when there is one, else the class."""
    cause = getattr(exc, "os_error", None) or exc.__cause__
    if isinstance(cause, ssl.SSLCertVerificationError):
        return cause.verify_message or "certificate verification failed"
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return type(exc).__name__
