"""HTTP plumbing shared by token requests and metadata look-ups.

One client session for the whole broker, proxies chosen per request, TLS
contexts built once per trust and client-certificate set, and bodies read
with a size cap.
"""

from __future__ import annotations

import contextlib
import hashlib
import ssl
import urllib.request
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import aiohttp

from broker.config import ClientCert
from broker.fields import is_loopback_host
from broker.secret import load_chain

# A CA bundle or certificate chain of any sensible size.
MAX_PEM_BYTES = 1024 * 1024


@contextlib.asynccontextmanager
async def client_session() -> AsyncIterator[aiohttp.ClientSession]:
    """The one session all requests to issuers share.

    It does not trust the environment: proxies come from :func:`proxy_for`
    per request, and ``~/.netrc`` must not add credentials of its own.
    """
    connector = aiohttp.TCPConnector(limit=64, ttl_dns_cache=60)
    async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:
        yield session


def proxy_for(url: str) -> str | None:
    """The proxy for a request: ``HTTPS_PROXY`` unless ``NO_PROXY``.

    Only https requests ever go through a proxy. Plain http is allowed only
    to loopback hosts, and an ``HTTP_PROXY`` would carry such a request, the
    secret in clear, off the machine.
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


class TlsFileError(Exception):
    """A CA bundle or client certificate file cannot be used; says which."""


class TlsContexts:
    """SSL contexts by CA bundle and client certificate, rebuilt on rotation.

    Verification is always on; a ``ca_file`` is trusted on top of the
    system store. A client certificate (mutual TLS, RFC 8705) is loaded from
    its files. The files are read for every request and the context rebuilt
    when their content changes, so a rotated CA bundle or certificate is
    used without a restart (content, not timestamps: a Kubernetes volume
    swap can keep the old modification times).
    """

    def __init__(self) -> None:
        self._contexts: dict[
            tuple[str | None, str | None, str | None],
            tuple[bytes, ssl.SSLContext],
        ] = {}

    def get(
        self, ca_file: str | None, client_cert: ClientCert | None = None
    ) -> ssl.SSLContext:
        """The context for this trust and certificate.

        Raises :class:`TlsFileError` naming the file that cannot be used.
        """
        cert = client_cert.cert.path if client_cert else None
        key = client_cert.key.path if client_cert else None
        version = _digest(ca_file, cert, key)

        cached = self._contexts.get((ca_file, cert, key))
        if cached is not None and cached[0] == version:
            return cached[1]

        context = ssl.create_default_context()
        if ca_file:
            try:
                context.load_verify_locations(cafile=ca_file)
            except (ssl.SSLError, OSError) as exc:
                raise TlsFileError(
                    f"cannot load the CA bundle {ca_file}: {why(exc)}"
                ) from None
        if cert and key:
            try:
                load_chain(context, cert, key)
            except (ssl.SSLError, OSError) as exc:
                raise TlsFileError(
                    f"cannot load the client certificate {cert} with key {key} "
                    f"(an unencrypted PEM key matching the certificate): {why(exc)}"
                ) from None
        self._contexts[(ca_file, cert, key)] = (version, context)

        return context


def _digest(*paths: str | None) -> bytes:
    digest = hashlib.sha256()
    for path in paths:
        if path is None:
            continue
        try:
            with open(path, "rb") as handle:
                digest.update(handle.read(MAX_PEM_BYTES))
        except OSError as exc:
            raise TlsFileError(f"cannot read {path}: {why(exc)}") from None
        digest.update(b"\0")
    return digest.digest()


async def read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """Read the body; ``None`` once it is past ``limit`` bytes.

    One ``read(n)`` returns what has arrived so far, not ``n`` bytes, so a
    body that comes in several packets is read in a loop.
    """
    if (response.content_length or 0) > limit:
        return None

    body = bytearray()
    while chunk := await response.content.read(limit + 1 - len(body)):
        body += chunk
        if len(body) > limit:
            return None

    return bytes(body)


def why(exc: BaseException) -> str:
    """A short cause: the OS or TLS error text when there is one, else the class."""
    cause = cause_of(exc)
    if isinstance(cause, ssl.SSLCertVerificationError):
        return cause.verify_message or "certificate verification failed"
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return type(exc).__name__


def cause_of(exc: BaseException) -> BaseException:
    """The underlying error aiohttp wrapped, or ``exc`` itself."""
    return getattr(exc, "os_error", None) or exc.__cause__ or exc
