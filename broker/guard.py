"""The TCP caller guard: refuse requests that a local process did not make.

Anything that can make this host send an HTTP request (an SSRF bug in an
app, a browser page after DNS rebinding) could otherwise read tokens from
loopback. Like cloud metadata servers, we demand a header that such
requests cannot carry, a loopback ``Host``, and no proxy headers.
"""

from __future__ import annotations

from collections.abc import Mapping

from broker.config import is_loopback_host

HEADER = "Token-Broker"
_PROXY_HEADERS = ("Forwarded", "X-Forwarded-For")

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
    host = value.strip()
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else ""
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    return bool(host) and is_loopback_host(host)
