"""Find an issuer's token endpoint in its metadata (RFC 8414, OIDC Discovery).

An environment may name its ``issuer`` instead of a ``token_url``. The
broker then reads the authorization server metadata, checks that the
document belongs to that issuer and that the client's auth method is
offered, and caches the answer. Reading the document is pure; fetching it
goes through the broker's one client session.
"""

from __future__ import annotations

import asyncio
import json
import math
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from broker.errors import IssuerError
from broker.fields import check_token_url
from broker.transport import cause_of, read_capped, why

# A metadata document is a few kilobytes.
MAX_DOCUMENT = 256 * 1024
# RFC 8414 section 2: the default when the document lists no methods.
DEFAULT_METHODS = ("client_secret_basic",)
CACHE_SECONDS = 3600.0


@dataclass(frozen=True)
class Metadata:
    """The parts of an issuer's metadata the broker uses."""

    issuer: str
    token_endpoint: str
    auth_methods: tuple[str, ...]
    signing_algs: tuple[str, ...] | None
    source: str


def metadata_urls(issuer: str) -> list[str]:
    """Where to look, in order: RFC 8414 3.1 first, then OpenID Connect.

    RFC 8414 puts the well-known segment between the host and any path of
    the issuer; OpenID Connect Discovery 4 appends it to the issuer.
    """
    parts = urlsplit(issuer)
    path = parts.path.rstrip("/")

    def url(new_path: str) -> str:
        return urlunsplit((parts.scheme, parts.netloc, new_path, "", ""))

    return [
        url("/.well-known/oauth-authorization-server" + path),
        url(path + "/.well-known/openid-configuration"),
    ]


def read_metadata(document: Mapping[str, Any], issuer: str, source: str) -> Metadata:
    """Check a metadata document; raise ``IssuerError`` when it cannot be used."""
    named = document.get("issuer")
    # RFC 8414 3.3: the issuer in the document must be the one asked for,
    # or a look-alike host could redirect our credentials elsewhere.
    if not isinstance(named, str) or named.rstrip("/") != issuer.rstrip("/"):
        raise _failed(
            f"{source} names issuer {str(named)[:100]!r}, not {issuer!r}",
            permanent=True,
        )

    endpoint = document.get("token_endpoint")
    if not isinstance(endpoint, str):
        raise _failed(f"{source} has no token_endpoint", permanent=True)
    try:
        check_token_url(endpoint)
    except ValueError as exc:
        raise _failed(f"{source}: token_endpoint: {exc}", permanent=True) from None
    if issuer.startswith("https:") and not endpoint.startswith("https:"):
        raise _failed(
            f"{source}: an https issuer's token_endpoint must be https too",
            permanent=True,
        )

    return Metadata(
        issuer=issuer,
        token_endpoint=endpoint,
        auth_methods=_strings(
            document.get("token_endpoint_auth_methods_supported"), DEFAULT_METHODS
        ),
        signing_algs=_strings(
            document.get("token_endpoint_auth_signing_alg_values_supported"), None
        ),
        source=source,
    )


def check_method(metadata: Metadata, auth: str, alg: str | None) -> None:
    """Refuse a client whose auth method (or signing alg) the issuer lacks."""
    if auth not in metadata.auth_methods:
        offered = ", ".join(metadata.auth_methods)
        raise _failed(
            f"{metadata.issuer} does not offer auth {auth} at its token endpoint "
            f"(it offers: {offered})",
            permanent=True,
        )
    signing_algs = metadata.signing_algs
    if alg is not None and signing_algs is not None and alg not in signing_algs:
        offered = ", ".join(signing_algs)
        raise _failed(
            f"{metadata.issuer} does not accept {alg} client assertions "
            f"(it accepts: {offered})",
            permanent=True,
        )


def _strings(value: object, default: tuple[str, ...] | None) -> Any:
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return tuple(value)
    return default


def _failed(message: str, *, permanent: bool = False) -> IssuerError:
    return IssuerError("discovery_failed", message, permanent=permanent)


class Discovery:
    """Fetch and cache metadata per issuer; one fetch at a time per issuer."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        cache_seconds: float = CACHE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._session = session
        self._cache_seconds = cache_seconds
        self._clock = clock
        self._cache: dict[tuple[str, str | None], tuple[float, Metadata]] = {}
        self._locks: dict[tuple[str, str | None], asyncio.Lock] = {}

    async def metadata(
        self,
        issuer: str,
        tls: ssl.SSLContext,
        proxy: str | None = None,
        *,
        trust: str | None = None,
    ) -> Metadata:
        """The issuer's metadata, from the cache while it is fresh.

        When a refetch fails, a cached document is used as long as it is
        at most twice the cache time old, so a metadata hiccup does not
        stop token requests. Raises ``IssuerError`` (discovery_failed).
        """
        # Cached per issuer and trust: an environment with its own CA bundle
        # must verify the issuer itself, not reuse another's look-up.
        key = (issuer, trust)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            cached = self._cache.get(key)
            age = math.inf if cached is None else self._clock() - cached[0]
            if cached is not None and age < self._cache_seconds:
                return cached[1]
            try:
                found = await self._fetch(issuer, tls, proxy)
            except IssuerError:
                # A stale document beats none, for a while.
                if cached is not None and age < 2 * self._cache_seconds:
                    return cached[1]
                raise
            self._cache[key] = (self._clock(), found)
            return found

    def forget(self, issuer: str, *, trust: str | None = None) -> None:
        """Drop a cached document (the token endpoint stopped answering)."""
        self._cache.pop((issuer, trust), None)

    async def _fetch(
        self, issuer: str, tls: ssl.SSLContext, proxy: str | None
    ) -> Metadata:
        problems = []
        for url in metadata_urls(issuer):
            try:
                document = await self._get(url, tls, proxy)
            except _NotThere as exc:
                problems.append(f"{url}: {exc}")
                continue
            return read_metadata(document, issuer, url)

        raise _failed("no metadata found: " + "; ".join(problems))

    async def _get(
        self, url: str, tls: ssl.SSLContext, proxy: str | None
    ) -> Mapping[str, Any]:
        try:
            async with self._session.get(
                url,
                ssl=tls,
                proxy=proxy,
                allow_redirects=False,
                headers={"Accept": "application/json"},
            ) as response:
                body = await read_capped(response, MAX_DOCUMENT)
                status = response.status
        except (aiohttp.ClientError, OSError) as exc:
            hint = ""
            if isinstance(cause_of(exc), ssl.SSLCertVerificationError):
                hint = " (if the issuer uses a private CA, set ca_file for it)"
            raise _NotThere(why(exc) + hint) from None

        if status != 200:
            raise _NotThere(f"status {status}")
        if body is None:
            raise _NotThere("document too large")
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):
            raise _NotThere("not JSON") from None
        if not isinstance(document, dict):
            raise _NotThere("not a JSON object")

        return document


class _NotThere(Exception):
    """One metadata location did not give a document; try the next."""
