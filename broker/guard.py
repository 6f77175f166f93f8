"""The TCP caller guard: refuse requests that a local process did not make.

Anything that can make this host send an HTTP request (an SSRF bug in an
app, a browser page after DNS rebinding) could otherwise read tokens from
loopback. Like cloud metadata servers, we demand a header that such
requests cannot carry, a loopback ``Host``, and no proxy headers.
"""

from __future__ import annotations

import re

from multidict import MultiMapping

from broker.config import is_loopback_host

HEADER = "Token-Broker"
# Headers that proxies add: a request carrying one was relayed for someone.
_PROXY_HEADERS = (
    "Forwarded",
    "X-Forwarded-For",
    "X-Forwarded-Host",
    "X-Real-IP",
    "Via",
)
# RFC 9110 7.2: Host = uri-host [ ":" port ], an IPv6 literal in brackets.
_HOST = re.compile(r"(?:\[(?P<literal>[^\[\]]+)\]|(?P<name>[^\[\]:]+))(?::[0-9]*)?")

REFUSALS = {
    "forwarded": "requests that passed through a proxy are refused",
    "host": "the Host header must name a loopback address",
    "missing_header": f"send the header '{HEADER}: 1' with every request",
}


def refusal(headers: MultiMapping[str], target: str = "/") -> str | None:
    """Return the refusal reason code for a request, or ``None`` to let it in.

    ``target`` is the raw request target: an absolute URL there
    (``GET http://host/...``) is how a client talks to a proxy.
    """
    if any(name in headers for name in _PROXY_HEADERS):
        return "forwarded"
    if not target.startswith("/"):
        return "forwarded"
    hosts = headers.getall("Host", [])
    if len(hosts) != 1 or not _loopback_host(hosts[0]):
        return "host"
    # Exactly one header, exactly "1": a second copy means something merged
    # or injected headers on the way.
    if [value.strip() for value in headers.getall(HEADER, [])] != ["1"]:
        return "missing_header"
    return None


def _loopback_host(value: str) -> bool:
    match = _HOST.fullmatch(value.strip())
    if match is None:
        return False

    return is_loopback_host(match.group("literal") or match.group("name"))
