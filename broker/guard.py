"""The caller guard: refuse requests that a local process did not make.

Anything that can make this host send an HTTP request (an SSRF bug in an
app, a browser page after DNS rebinding) could otherwise read tokens from
loopback. Like cloud metadata servers, we demand a header that such
requests cannot carry, a loopback ``Host``, no proxy headers and nothing
a browser adds. The socket is out of a browser's reach: there only the
header may be required.
"""

from __future__ import annotations

import re

from multidict import MultiMapping

from broker.config import Guard, is_loopback_host

DEFAULT = Guard()
HEADER = DEFAULT.header
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

# Every browser sends Origin on a cross-origin request, and Sec-Fetch-* on
# any request; no HTTP library adds them by itself.
_BROWSER_HEADERS = ("Origin", "Sec-Fetch-Site", "Sec-Fetch-Mode", "Sec-Fetch-Dest")


def refusal(
    headers: MultiMapping[str],
    target: str = "/",
    *,
    method: str = "GET",
    policy: Guard = DEFAULT,
    tcp: bool = True,
) -> str | None:
    """Return the refusal reason code for a request, or ``None`` to let it in.

    ``target`` is the raw request target: an absolute URL there
    (``GET http://host/...``) is how a client talks to a proxy. On the
    socket (``tcp`` false) only the header is checked, if ``policy``
    requires it there.
    """
    if tcp:
        reason = _network_refusal(headers, target, method, policy)
        if reason is not None:
            return reason

    required = policy.http if tcp else policy.unix
    # Exactly one header, exactly "1": a second copy means something merged
    # or injected headers on the way.
    if required and [v.strip() for v in headers.getall(policy.header, [])] != ["1"]:
        return "missing_header"
    return None


def message(reason: str, policy: Guard = DEFAULT) -> str:
    """What a refused caller is told: the rule, never what it sent."""
    return {
        "forwarded": "requests that passed through a proxy are refused",
        "host": "the Host header must name a loopback address",
        "missing_header": f"send the header '{policy.header}: 1' with every request",
        "cors_preflight": "cross-origin requests are refused; no CORS is offered",
        "browser": "requests made by a web browser are refused",
    }[reason]


REFUSALS = ("forwarded", "host", "missing_header", "cors_preflight", "browser")


def _network_refusal(
    headers: MultiMapping[str], target: str, method: str, policy: Guard
) -> str | None:
    if any(name in headers for name in _PROXY_HEADERS):
        return "forwarded"
    if not target.startswith("/"):
        return "forwarded"
    if method == "OPTIONS" and "Access-Control-Request-Method" in headers:
        return "cors_preflight"
    if any(name in headers for name in _BROWSER_HEADERS):
        return "browser"
    hosts = headers.getall("Host", [])
    if len(hosts) != 1 or not _allowed_host(hosts[0], policy.hosts):
        return "host"
    return None


def _allowed_host(value: str, extra: tuple[str, ...]) -> bool:
    match = _HOST.fullmatch(value.strip())
    if match is None:
        return False

    host = match.group("literal") or match.group("name")
    return is_loopback_host(host) or host.lower() in extra
