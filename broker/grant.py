"""One client-credentials token request, as pure functions (RFC 6749 4.4).

Building the request and reading the answer do no I/O, so every issuer
behaviour can be tested from bytes. :mod:`broker.issuer` sends and receives.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, quote_plus, urlencode

from broker import __version__
from broker.config import Client
from broker.errors import IssuerError
from broker.schedule import http_date, retry_delay
from broker.secret import Secret
from broker.token import Grant

# RFC 6749 5.2 plus RFC 8707's invalid_target: the only issuer-chosen words
# that may become a metric label, so label values stay bounded.
OAUTH_ERRORS = frozenset(
    {
        "invalid_request",
        "invalid_client",
        "invalid_grant",
        "unauthorized_client",
        "unsupported_grant_type",
        "invalid_scope",
        "invalid_target",
    }
)
# Words for trouble on the issuer's own side (RFC 6749 4.1.2.1 defines them
# for the authorization endpoint; token endpoints send them too). Whatever
# the status, they are transient and count as http_5xx, the reason for "the
# issuer failed, not our request": no new label value, alerts on issuer
# trouble see them, and the message keeps the real status and word.
SERVER_TROUBLE = frozenset({"server_error", "temporarily_unavailable"})
# RFC 8628 3.5's "slow down" is a rate limit by another name.
RATE_WORDS = frozenset({"slow_down"})
REASONS = OAUTH_ERRORS | {
    "http_3xx",
    "http_4xx",
    "http_5xx",
    "rate_limited",
    "timeout",
    "connection",
    "tls",
    "malformed_response",
    "secret_unreadable",
    "internal_error",
}
# RFC 6749 A.12 allows %x20-7E; the space is excluded since the token
# travels as "Bearer <token>".
_HEADER_SAFE = re.compile(r"[\x21-\x7e]+")
_USER_AGENT = f"token-broker/{__version__}"
# Far beyond any real token; larger values would overflow date arithmetic.
MAX_EXPIRES_IN = 366 * 86400.0
_TAG = re.compile(r"<[^>]*>")
_SPACE = re.compile(r"\s+")
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]")
# Quota headers some gateways send with a 400 or 403 instead of a 429.
_REMAINING = ("RateLimit-Remaining", "X-RateLimit-Remaining", "X-Rate-Limit-Remaining")


@dataclass(frozen=True)
class TokenRequest:
    """A ready-to-send token request; headers and body hold the secret."""

    url: str
    headers: Mapping[str, str] = field(repr=False)
    body: bytes = field(repr=False)


JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


def build_request(client: Client, url: str, credential: Secret | None) -> TokenRequest:
    """Build the POST for ``client``, authenticated by its auth method.

    ``credential`` is the client secret (client_secret_basic / _post), a
    signed assertion (private_key_jwt), or ``None`` (tls_client_auth, where
    the TLS client certificate authenticates). Exactly one method is used.
    """
    params: dict[str, Any] = {"grant_type": "client_credentials"}
    headers = {"Accept": "application/json", "User-Agent": _USER_AGENT}

    if client.auth == "client_secret_basic":
        assert credential is not None
        headers["Authorization"] = basic_credentials(client.client_id, credential)
    else:
        # RFC 7523 3 makes client_id optional with an assertion; some issuers
        # need it, none refuse it. RFC 8705 2 requires it for mutual TLS.
        params["client_id"] = client.client_id
    if client.auth == "client_secret_post":
        assert credential is not None
        params["client_secret"] = credential.reveal()
    elif client.auth == "private_key_jwt":
        assert credential is not None
        params["client_assertion_type"] = JWT_BEARER
        params["client_assertion"] = credential.reveal()
    if client.scopes:
        params["scope"] = " ".join(client.scopes)
    if client.audience is not None:
        params["audience"] = client.audience
    if client.resource is not None:
        params["resource"] = client.resource
    params.update(client.params)

    if client.encoding == "json":
        headers["Content-Type"] = "application/json"
        body = json.dumps(params).encode()
    else:
        headers["Content-Type"] = "application/x-www-form-urlencoded"
        body = urlencode(params, doseq=True).encode()

    return TokenRequest(url, headers, body)


def basic_credentials(client_id: str, secret: Secret) -> str:
    """HTTP Basic value; RFC 6749 2.3.1 form-encodes both parts first."""
    pair = f"{quote_plus(client_id)}:{quote_plus(secret.reveal())}"
    return "Basic " + base64.b64encode(pair.encode()).decode("ascii")


def parse_response(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    wall_now: float,
    redact: Iterable[str] = (),
    client: Client | None = None,
) -> Grant:
    """Read a token response; raise :class:`IssuerError` for any failure.

    ``redact`` lists values (the secret) to scrub from any preview of the
    body that ends up in the error message. ``client`` is who asked: a
    refusal then says which client_id and scopes the issuer turned down.
    """
    redact = tuple(redact)
    content_type = headers.get("Content-Type", "").split(";")[0].strip().lower()
    document = _decode(body, content_type)

    if 200 <= status < 300:
        if document is None:
            raise IssuerError(
                "malformed_response",
                f"status {status} with a body that is neither JSON nor a form "
                f"({_unreadable(body, content_type, redact)})",
                status=status,
            )
        # Some servers answer 200 with an RFC 6749 5.2 error body: the word
        # says more than "no access_token" and decides the retry class.
        token = document.get("access_token")
        if (isinstance(token, str) and token.strip()) or not _error_word(document):
            return _read_grant(document, status, client)

    raise _classify(status, headers, document, body, wall_now, redact, client)


def _unreadable(body: bytes, content_type: str, redact: Iterable[str]) -> str:
    # A success body we cannot read may be a bare token; only a markup page
    # (a login or proxy page at the wrong URL) is safe and useful to quote.
    if content_type == "text/html":
        return preview(body, redact)
    return f"{content_type or 'no content type'}, {len(body)} bytes"


def _decode(body: bytes, content_type: str) -> dict[str, Any] | None:
    text = body.decode("utf-8-sig", errors="replace").strip()
    if text.startswith("{"):
        try:
            document = json.loads(text)
        except (ValueError, RecursionError):  # nesting deeper than Python's stack
            return None
        return document if isinstance(document, dict) else None

    if content_type == "application/x-www-form-urlencoded":
        pairs = parse_qsl(text, keep_blank_values=True)
        return dict(pairs) if pairs else None

    return None


def _read_grant(
    document: Mapping[str, Any], status: int, client: Client | None
) -> Grant:
    token = document.get("access_token")
    if not isinstance(token, str) or not token.strip():
        raise IssuerError(
            "malformed_response",
            f"status {status} without an access_token",
            status=status,
        )
    if not _HEADER_SAFE.fullmatch(token):
        # It is served in an Authorization header and printed for shells:
        # a space, a line break or a non-ASCII byte would break or inject.
        raise IssuerError(
            "malformed_response",
            "the access_token holds characters that cannot be sent in a header",
            status=status,
        )

    token_type = document.get("token_type")
    if token_type is not None and (
        not isinstance(token_type, str) or token_type.lower() != "bearer"
    ):
        # A DPoP or MAC token is bound to a key we do not hold: serving it as
        # a bearer token would fail at every API (RFC 9449 section 5). The
        # issuer binds this client's tokens until its own configuration
        # changes, so retrying soon only adds load: permanent.
        shown = _clean(str(token_type))[:40]
        raise IssuerError(
            "malformed_response",
            f"token_type {shown!r}{_for_whom(client)} is not Bearer; "
            "the broker serves Bearer-type tokens only",
            status=status,
            permanent=True,
        )

    scope = document.get("scope")
    if isinstance(scope, list):
        scope = " ".join(str(item) for item in scope)
    elif isinstance(scope, str):
        scope = " ".join(scope.replace(",", " ").split())
    else:
        scope = None

    return Grant(Secret(token), read_expires_in(document.get("expires_in")), scope)


def read_expires_in(value: object) -> float | None:
    """Normalise ``expires_in``; ``None`` when the issuer gave no usable value.

    Missing, ``null`` and ``0`` mean "not given" (some servers send 0 for
    "no expiry"); floats are floored (to at least 1) and values beyond
    :data:`MAX_EXPIRES_IN` are cut to it. Negative, boolean or non-numeric
    values are a broken issuer and raise :class:`IssuerError`.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise IssuerError("malformed_response", "expires_in is not a number")
    try:
        seconds = float(value.strip() if isinstance(value, str) else value)
    except (ValueError, OverflowError):
        raise IssuerError("malformed_response", "expires_in is not a number") from None
    if math.isnan(seconds) or seconds == math.inf:
        raise IssuerError("malformed_response", "expires_in is not a number")
    if seconds < 0:
        raise IssuerError("malformed_response", "expires_in is negative")

    if seconds == 0:
        return None

    # A fraction of a second is still a lifetime given, not "none": it must
    # not turn into default_lifetime.
    return float(max(1, math.floor(min(seconds, MAX_EXPIRES_IN))))


def _classify(
    status: int,
    headers: Mapping[str, str],
    document: Mapping[str, Any] | None,
    body: bytes,
    wall_now: float,
    redact: Iterable[str],
    client: Client | None,
) -> IssuerError:
    word = _error_word(document)
    said = _said(word, document, body, redact)
    retry_after = retry_delay(headers, wall_now)

    if status == 429 or word in RATE_WORDS or _limit_reached(status, word, headers):
        return IssuerError(
            "rate_limited",
            f"status {status} (too many requests){_suffix(word or said)}",
            status=status,
            retry_after=retry_after,
        )
    if status >= 500 or word in SERVER_TROUBLE:
        return IssuerError(
            "http_5xx",
            f"status {status}{f': {word}' if word else ''}{_suffix(said)}",
            status=status,
            retry_after=retry_after,
        )
    if status == 408:
        return IssuerError("timeout", "status 408 (request timeout)", status=status)
    if 300 <= status < 400:
        # A redirected POST would carry the secret to wherever it points.
        return IssuerError(
            "http_3xx",
            f"status {status} redirect not followed; configure the final URL",
            status=status,
            permanent=True,
        )
    code = word
    if code is None and status == 401:
        code = "invalid_client"

    reason = code or "http_4xx"
    message = (
        f"status {status}: {word or 'client error'}{_suffix(said)}{_asked(client)}"
    )

    return IssuerError(
        reason, message, status=status, permanent=True, retry_after=retry_after
    )


def _error_word(document: Mapping[str, Any] | None) -> str | None:
    """The issuer's ``error`` if it is a word we act on, else ``None``.

    Matched in any case and without stray spaces, as some servers send it;
    the word returned is the canonical one, so labels stay bounded.
    """
    word = document.get("error") if document else None
    word = word.strip().lower() if isinstance(word, str) else None
    if word in OAUTH_ERRORS | SERVER_TROUBLE | RATE_WORDS:
        return word
    return None


def _said(
    word: str | None,
    document: Mapping[str, Any] | None,
    body: bytes,
    redact: Iterable[str],
) -> str:
    """What the issuer said beyond a known error word, shortened and scrubbed."""
    if document is None:
        return preview(body, redact)
    text = document.get("error_description")
    if isinstance(text, str) and text:
        return _shorten(text, redact, 200)
    error = document.get("error")
    if error is None or word is not None:
        return ""

    return _shorten(str(error), redact, 60)


def _limit_reached(status: int, word: str | None, headers: Mapping[str, str]) -> bool:
    # Some gateways refuse an exhausted quota with 403 or 400 rather than
    # 429. A 401 or an OAuth error word names a real refusal, and wins.
    if word is not None or status == 401 or not 400 <= status < 500:
        return False
    return any(headers.get(name, "").strip() == "0" for name in _REMAINING)


def _for_whom(client: Client | None) -> str:
    return "" if client is None else f" issued to client_id {client.client_id!r}"


def _asked(client: Client | None) -> str:
    """What a refused request asked for, to compare with the issuer's records."""
    if client is None:
        return ""
    scopes = " ".join(client.scopes)
    asked = [f"scope {scopes!r}" if scopes else "no scope"]
    if client.audience is not None:
        asked.append(f"audience {client.audience!r}")
    if client.resource is not None:
        resource = client.resource
        resource = resource if isinstance(resource, str) else " ".join(resource)
        asked.append(f"resource {resource!r}")

    return f"; client_id {client.client_id!r} asked for " + ", ".join(asked)


def _shorten(text: str, redact: Iterable[str], size: int) -> str:
    # Scrub before cleaning and cutting: either could leave part of a secret.
    return _scrub(_clean(_scrub(text, redact)), redact)[:size]


def _suffix(detail: str) -> str:
    return f" ({detail})" if detail else ""


def _clean(text: str) -> str:
    return _SPACE.sub(" ", _UNPRINTABLE.sub(" ", text)).strip()


def preview(body: bytes, redact: Iterable[str] = (), size: int = 80) -> str:
    """Return a short single-line preview of a body for an error message.

    Markup is stripped (an HTML error page from a proxy says most in its
    text) and any of the ``redact`` values is masked, raw or encoded.
    """
    redact = tuple(redact)
    text = _scrub(body.decode("utf-8", errors="replace"), redact)
    text = _scrub(_clean(_TAG.sub(" ", text)), redact)
    if not text:
        return "empty body"

    return repr(text[:size] + ("…" if len(text) > size else ""))


def _scrub(text: str, redact: Iterable[str]) -> str:
    for value in _spellings(redact):
        text = text.replace(value, "[redacted]")
    return text


def _spellings(redact: Iterable[str]) -> list[str]:
    """Each value as an issuer might echo it: raw, cleaned, or encoded."""
    forms: set[str] = set()
    for value in redact:
        if value:
            forms.update(
                {
                    value,
                    _clean(value),
                    quote_plus(value),
                    quote(value, safe=""),
                    json.dumps(value)[1:-1],
                    json.dumps(value, ensure_ascii=False)[1:-1],
                    html.escape(value),
                }
            )
    forms.discard("")

    return sorted(forms, key=len, reverse=True)


def issuer_clock_skew(
    headers: Mapping[str, str], wall_sent: float, wall_received: float
) -> float | None:
    """Seconds the issuer's clock runs ahead of ours (negative: behind).

    Read from its ``Date`` header; ``None`` when it sent none we can read.
    The issuer stamped Date at some moment between our send and our
    receipt, truncated to the second, so any skew inside that window could
    be mere resolution and round trip: the answer is the smallest skew that
    explains what we saw, ``0.0`` when none is needed.
    """
    stamped = http_date(headers.get("Date", ""))
    if stamped is None:
        return None
    wall_received = max(wall_received, wall_sent)

    at_least = stamped - wall_received
    at_most = stamped + 1.0 - wall_sent
    if at_least > 0:
        return at_least
    if at_most < 0:
        return at_most
    return 0.0
