"""The TCP caller guard lets in only requests a local process made on purpose."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from broker.config import Guard
from broker.guard import HEADER, REFUSALS, message, refusal

GOOD = {"Host": "127.0.0.1:8181", HEADER: "1"}


def headers(*pairs: tuple[str, str], **fields: str | None) -> CIMultiDictProxy[str]:
    """Request headers: the good set, with ``fields`` replaced (None drops one)."""
    merged: dict[str, str | None] = {**GOOD, **fields}
    result = CIMultiDict((k, v) for k, v in merged.items() if v is not None)
    result.extend(pairs)
    return CIMultiDictProxy(result)


def test_local_request_with_the_header_is_let_in() -> None:
    """A loopback Host and ``Token-Broker: 1`` pass the guard."""
    assert refusal(headers()) is None


def test_header_names_are_case_insensitive() -> None:
    """HTTP header names match in any case."""
    lower = CIMultiDictProxy(CIMultiDict({"host": "localhost", "token-broker": "1"}))

    assert refusal(lower) is None


def test_missing_token_broker_header_is_refused() -> None:
    """Without the Token-Broker header a request is refused (SSRF cannot add it)."""
    assert refusal(headers(**{HEADER: None})) == "missing_header"


@pytest.mark.parametrize("value", ["0", "true", "yes", "", "11", "1, 1"])
def test_wrong_token_broker_value_is_refused(value: str) -> None:
    """Only the exact value 1 counts."""
    assert refusal(headers(**{HEADER: value})) == "missing_header"


def test_token_broker_value_may_carry_spaces() -> None:
    """Whitespace around the value is not part of it (RFC 9110 5.5)."""
    assert refusal(headers(**{HEADER: " 1 "})) is None


@pytest.mark.parametrize(
    "host",
    [
        "example.com",
        "10.0.0.1",
        "10.0.0.1:8181",
        "169.254.169.254",
        "evil.localhost.example.com",
        "localhost.example.com",
        "127.0.0.1.nip.io",
        "localhost:8181, example.com",
        "127.0.0.1:8181@example.com",
        "[::1]example.com",
        "[::ffff:10.0.0.1]:8181",
        "[fe80::1]",
        "0.0.0.0:8181",
        "127.0.0.1:port",
        "",
        "   ",
    ],
)
def test_non_loopback_host_is_refused(host: str) -> None:
    """A Host that is not a loopback name is refused (DNS rebinding)."""
    assert refusal(headers(Host=host)) == "host"


@pytest.mark.parametrize(
    "host",
    [
        "localhost",
        "localhost:8181",
        "LocalHost:8181",
        "127.0.0.1",
        "127.0.0.1:8181",
        "127.1.2.3:80",
        "[::1]",
        "[::1]:8181",
    ],
)
def test_loopback_host_variants_are_let_in(host: str) -> None:
    """Every spelling of a loopback host, with or without a port, passes."""
    assert refusal(headers(Host=host)) is None


def test_missing_host_is_refused() -> None:
    """A request without a Host header is refused."""
    assert refusal(headers(Host=None)) == "host"


@pytest.mark.parametrize(
    "proxy",
    [
        ("Forwarded", "for=192.0.2.60;proto=http"),
        ("X-Forwarded-For", "192.0.2.60"),
        ("x-forwarded-for", "127.0.0.1"),
        ("FORWARDED", ""),
        ("Via", "1.1 proxy.example"),
        ("X-Real-IP", "192.0.2.60"),
        ("X-Forwarded-Host", "localhost"),
    ],
)
def test_proxied_requests_are_refused(proxy: tuple[str, str]) -> None:
    """A request carrying a proxy header is refused, whatever its value."""
    assert refusal(headers(proxy)) == "forwarded"


def test_absolute_form_target_is_refused() -> None:
    """``GET http://host/...`` is a request meant for a proxy."""
    assert refusal(headers(), "http://evil.example/v1/tokens/chat") == "forwarded"
    assert refusal(headers(), "/v1/tokens/chat") is None


def test_a_second_token_broker_header_is_refused() -> None:
    """Two copies of the header, even "1" and "0", are not one "1"."""
    assert refusal(headers((HEADER, "0"))) == "missing_header"
    assert refusal(headers((HEADER, "1"))) == "missing_header"


def test_a_second_host_header_is_refused() -> None:
    """Two Host headers (one loopback, one not) are refused."""
    assert refusal(headers(("Host", "evil.example"))) == "host"


def test_every_refusal_has_an_explanation() -> None:
    """Each code the guard returns has a message for the 403 answer."""
    seen = {
        refusal(headers(**{HEADER: None})),
        refusal(headers(Host="example.com")),
        refusal(headers(("Forwarded", "for=x"))),
        refusal(headers(("Access-Control-Request-Method", "GET")), method="OPTIONS"),
        refusal(headers(("Origin", "https://evil.example"))),
    }

    assert seen == set(REFUSALS)
    assert all(message(reason) for reason in REFUSALS)


def test_a_cors_preflight_is_refused() -> None:
    """An OPTIONS preflight gets no CORS grant: it is refused outright."""
    preflight = headers(
        ("Origin", "https://evil.example"), ("Access-Control-Request-Method", "GET")
    )

    assert refusal(preflight, method="OPTIONS") == "cors_preflight"


@pytest.mark.parametrize(
    "browser",
    [
        ("Origin", "http://localhost:8181"),
        ("Origin", "null"),
        ("Sec-Fetch-Site", "same-origin"),
        ("Sec-Fetch-Mode", "cors"),
        ("Sec-Fetch-Dest", "empty"),
    ],
)
def test_requests_made_by_a_browser_are_refused(browser: tuple[str, str]) -> None:
    """A browser marks its requests; even a same-origin page is refused."""
    assert refusal(headers(browser)) == "browser"


def test_the_header_name_is_configurable() -> None:
    """With another header name, that header is required and the old one
    does not count."""
    policy = Guard(header="X-Local-Token")

    assert refusal(headers(), policy=policy) == "missing_header"
    assert refusal(headers(("X-Local-Token", "1")), policy=policy) is None
    assert "X-Local-Token: 1" in message("missing_header", policy)


def test_the_header_can_be_dropped_on_tcp() -> None:
    """http: false lets requests without the header in; the rest still holds."""
    policy = Guard(http=False)

    assert refusal(headers(**{HEADER: None}), policy=policy) is None
    assert refusal(headers(Host="example.com", **{HEADER: None}), policy=policy) == (
        "host"
    )


def test_configured_host_names_are_let_in() -> None:
    """hosts adds names to the loopback ones, in any case, with any port."""
    policy = Guard(hosts=("broker.local",))

    assert refusal(headers(Host="Broker.Local:8181"), policy=policy) is None
    assert refusal(headers(Host="broker.local.evil.example"), policy=policy) == "host"
    assert refusal(headers(Host="broker.local")) == "host"


def test_the_socket_checks_only_the_header_and_only_if_asked() -> None:
    """On the socket, Host and proxy headers are not checked (nginx may relay
    there); the header is required only with unix: true."""
    relayed = headers(("X-Forwarded-For", "10.1.1.1"), Host="app", **{HEADER: None})

    assert refusal(relayed, tcp=False) is None
    assert refusal(relayed, tcp=False, policy=Guard(unix=True)) == "missing_header"
