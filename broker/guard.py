"""The TCP caller guard: refuse requests that a local process did not make.

Anything that can make this host send an HTTP request (an SSRF bug in an
app, a browser page after DNS rebinding) could otherwise read tokens from
loopback. Like cloud metadata servers, we demand a header that such
requests cannot carry, a loopback ``Host``, and no proxy headers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from broker.config import is_loopback_host

HEADER = "Token-Broker"
_PROXY_HEADERS = ("Forwarded", "X-Forwarded-For")
# RFC 9110 7.2: Host = uri-host [ ":" port ], an IPv6 literal in brackets.
_HOST = re.compile(r"(?:\[(?P<literal>[^\[\]]+)\]|(?P<name>[^\[\]:]+))(?::[0-9]*)?")

REFUSALS = {
    "forwarded": "requests that passed through a proxy are refused",
    "host": "the Host header must name a loopback address",
    "missing_header": f"send the header '{HEADER}: 1' with every request",
}


def refusal(headers: Mapping[str, str]) -> str | None:
    """Return the refusal reason code for a request, or ``None`` to let it in."""
    if any(name in headers for name in _PROXY_HEADERS):
        return "forwarded"
    if not _loopback_host(headers.get("Host", "")):
        return "host"
    if headers.get(HEADER, "").strip() != "1":
        return "missing_header"
    return None


def _loopback_host(value: str) -> bool:
    match = _HOST.fullmatch(value.strip())
    if match is None:
        return False

    return is_loopback_host(match.group("literal") or match.group("name"))
