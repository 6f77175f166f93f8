"""A token request is built and its answer read by pure functions (RFC 6749 4.4)."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any
from urllib.parse import parse_qs, unquote_plus

import pytest

from broker.config import Client
from broker.errors import IssuerError
from broker.grant import (
    MAX_EXPIRES_IN,
    REASONS,
    build_request,
    issuer_clock_skew,
    parse_response,
    preview,
    read_expires_in,
)
from broker.secret import Secret
from broker.token import Grant

URL = "https://auth.example.com/oauth2/token"
SECRET = "s3cr3t+/ v@lue:%é"
NOW = 1_700_000_000.0
JSON = {"Content-Type": "application/json"}
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def make_client(**fields: Any) -> Client:
    """A valid client whose secret comes from the environment, with overrides."""
    data = {"environment": "prod", "client_id": "svc", "client_secret": {"env": "S"}}
    return Client.model_validate(data | fields, context={"environ": {"S": SECRET}})


def form(body: bytes) -> dict[str, list[str]]:
    """Decode a form body strictly, blank values kept."""
    return parse_qs(body.decode("ascii"), keep_blank_values=True, strict_parsing=True)


def ok(document: dict[str, Any]) -> Grant:
    """Parse a 200 answer carrying ``document`` as JSON."""
    return parse_response(200, JSON, json.dumps(document).encode(), wall_now=NOW)


def failure(
    status: int,
    body: bytes | dict[str, Any] = b"",
    headers: dict[str, str] | None = None,
    client: Client | None = None,
) -> IssuerError:
    """Parse an answer that must fail; return the error, the secret redacted."""
    if isinstance(body, dict):
        body, headers = json.dumps(body).encode(), (headers or {}) | JSON
    with pytest.raises(IssuerError) as caught:
        parse_response(
            status,
            headers or {},
            body,
            wall_now=NOW,
            redact=(SECRET,),
            client=client,
        )
    return caught.value


# build_request


def test_basic_auth_form_encodes_id_and_secret_before_base64() -> None:
    """client_secret_basic form-encodes both parts (RFC 6749 2.3.1), then base64."""
    client = make_client(client_id="tool:ü b+c%")

    request = build_request(client, URL, Secret("p:a ss+w%2Frd/é"))

    scheme, _, encoded = request.headers["Authorization"].partition(" ")
    pair = base64.b64decode(encoded, validate=True).decode("ascii")
    assert scheme == "Basic"
    assert pair == "tool%3A%C3%BC+b%2Bc%25:p%3Aa+ss%2Bw%252Frd%2F%C3%A9"
    client_id, _, secret = pair.partition(":")
    assert unquote_plus(client_id) == "tool:ü b+c%"
    assert unquote_plus(secret) == "p:a ss+w%2Frd/é"


def test_basic_auth_keeps_credentials_out_of_the_body() -> None:
    """client_secret_basic sends neither client_id nor the secret in the body."""
    request = build_request(make_client(), URL, Secret(SECRET))

    assert form(request.body) == {"grant_type": ["client_credentials"]}
    assert SECRET.encode() not in request.body


def test_post_auth_puts_both_in_the_body_and_sends_no_authorization() -> None:
    """client_secret_post sends client_id and client_secret as body parameters."""
    client = make_client(auth="client_secret_post")

    request = build_request(client, URL, Secret(SECRET))

    assert "Authorization" not in request.headers
    assert form(request.body) == {
        "grant_type": ["client_credentials"],
        "client_id": ["svc"],
        "client_secret": [SECRET],
    }


def test_form_request_headers() -> None:
    """A form request asks for JSON back and labels its own body."""
    request = build_request(make_client(), URL, Secret(SECRET))

    assert request.url == URL
    assert request.headers["Accept"] == "application/json"
    assert request.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert request.headers["User-Agent"].startswith("token-broker/")


def test_scopes_are_space_joined() -> None:
    """Scopes travel as one space-separated scope parameter (RFC 6749 3.3)."""
    client = make_client(scopes=["chat:invoke", "models:read"])

    request = build_request(client, URL, Secret(SECRET))

    assert form(request.body)["scope"] == ["chat:invoke models:read"]


def test_no_scopes_means_no_scope_parameter() -> None:
    """A client without scopes leaves the scope parameter out entirely."""
    request = build_request(make_client(scopes=[]), URL, Secret(SECRET))

    assert "scope" not in form(request.body)


def test_audience_resource_and_extra_params_in_a_form() -> None:
    """audience, one resource and extra params each become one form parameter."""
    client = make_client(
        audience="https://api.example.com",
        resource="https://api.example.com/v1",
        params={"tenant": "blue team"},
    )

    body = form(build_request(client, URL, Secret(SECRET)).body)

    assert body["audience"] == ["https://api.example.com"]
    assert body["resource"] == ["https://api.example.com/v1"]
    assert body["tenant"] == ["blue team"]


def test_several_resources_repeat_the_form_parameter() -> None:
    """A resource list repeats the resource parameter (RFC 8707 section 2)."""
    client = make_client(resource=["https://a.example.com", "https://b.example.com"])

    body = form(build_request(client, URL, Secret(SECRET)).body)

    assert body["resource"] == ["https://a.example.com", "https://b.example.com"]


def test_json_body_carries_every_parameter() -> None:
    """encoding json sends one JSON object; a resource list stays a list."""
    client = make_client(
        auth="client_secret_post",
        encoding="json",
        scopes=["chat:invoke", "chat:read"],
        audience="api",
        resource=["https://a.example.com", "https://b.example.com"],
        params={"tenant": "blue"},
    )

    request = build_request(client, URL, Secret(SECRET))

    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["Accept"] == "application/json"
    assert json.loads(request.body) == {
        "grant_type": "client_credentials",
        "client_id": "svc",
        "client_secret": SECRET,
        "scope": "chat:invoke chat:read",
        "audience": "api",
        "resource": ["https://a.example.com", "https://b.example.com"],
        "tenant": "blue",
    }


def test_json_body_with_basic_auth_holds_no_secret() -> None:
    """encoding json with client_secret_basic keeps the secret in the header."""
    client = make_client(encoding="json")

    request = build_request(client, URL, Secret(SECRET))

    assert json.loads(request.body) == {"grant_type": "client_credentials"}
    assert request.headers["Authorization"].startswith("Basic ")


@pytest.mark.parametrize("auth", ["client_secret_basic", "client_secret_post"])
@pytest.mark.parametrize("encoding", ["form", "json"])
def test_request_repr_never_shows_the_secret(auth: str, encoding: str) -> None:
    """repr of a request shows neither the secret nor the Basic credentials."""
    request = build_request(
        make_client(auth=auth, encoding=encoding), URL, Secret(SECRET)
    )

    shown = repr(request) + str(request)

    assert URL in shown
    assert SECRET not in shown
    assert "s3cr3t" not in shown
    assert "Basic" not in shown


# parse_response: success


def test_json_success_gives_token_lifetime_and_scope() -> None:
    """A plain RFC 6749 5.1 answer becomes a Grant."""
    grant = ok(
        {
            "access_token": "eyJ.a.b",
            "token_type": "Bearer",
            "expires_in": 3600,
            "scope": "chat:invoke chat:read",
        }
    )

    assert grant.access_token.reveal() == "eyJ.a.b"
    assert grant.expires_in == 3600.0
    assert grant.scope == "chat:invoke chat:read"


@pytest.mark.parametrize(
    ("given", "seconds"),
    [
        (3600, 3600.0),
        ("3600", 3600.0),
        (" 90 ", 90.0),
        (3599.9, 3599.0),
        ("59.99", 59.0),
        (0, None),
        ("0", None),
        (0.4, 1.0),
        (None, None),
    ],
)
def test_expires_in_forms(given: object, seconds: float | None) -> None:
    """expires_in is read from ints, numeric strings and floats (floored, but
    a fraction of a second stays one second rather than "not given")."""
    grant = ok({"access_token": "t", "expires_in": given})

    assert grant.expires_in == seconds


def test_missing_expires_in_is_not_given() -> None:
    """An answer without expires_in leaves the lifetime to the default."""
    assert ok({"access_token": "t"}).expires_in is None


@pytest.mark.parametrize(
    ("given", "why"),
    [
        (-1, "negative"),
        ("-30", "negative"),
        ("soon", "not a number"),
        ("", "not a number"),
        (True, "not a number"),
        (False, "not a number"),
        ([3600], "not a number"),
        ({"s": 1}, "not a number"),
        ("nan", "not a number"),
        ("inf", "not a number"),
        (10**400, "not a number"),
    ],
)
def test_unusable_expires_in_is_malformed(given: object, why: str) -> None:
    """Negative, non-numeric and boolean expires_in mean a broken issuer."""
    body = {"access_token": "t", "expires_in": given}

    error = failure(200, body)

    assert error.reason == "malformed_response"
    assert f"expires_in is {why}" in error.message


def test_absurd_expires_in_is_capped() -> None:
    """A lifetime of centuries is cut to MAX_EXPIRES_IN, not trusted as is."""
    assert read_expires_in(10**15) == MAX_EXPIRES_IN
    assert read_expires_in(MAX_EXPIRES_IN - 1) == MAX_EXPIRES_IN - 1


@pytest.mark.parametrize("token_type", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_token_type_bearer_in_any_case(token_type: str) -> None:
    """token_type is compared case-insensitively (RFC 6749 5.1)."""
    assert ok({"access_token": "t", "token_type": token_type}).access_token


def test_missing_token_type_is_accepted() -> None:
    """An answer without token_type is taken as a bearer token."""
    assert ok({"access_token": "t"}).access_token.reveal() == "t"


@pytest.mark.parametrize("token_type", ["DPoP", "mac", "N_A", 7, ""])
def test_other_token_types_are_refused_by_name(token_type: object) -> None:
    """A DPoP, MAC or unknown token type is refused, naming the client and
    the type, and waits the long backoff: the issuer binds every token."""
    document = {"access_token": "t", "token_type": token_type}

    error = failure(200, document, client=make_client(client_id="m2m-7"))

    assert error.reason == "malformed_response"
    assert error.permanent
    assert repr(str(token_type)) in error.message
    assert "client_id 'm2m-7'" in error.message
    assert "Bearer" in error.message


@pytest.mark.parametrize(
    "document",
    [
        {"token_type": "Bearer", "expires_in": 60},
        {"access_token": ""},
        {"access_token": "   "},
        {"access_token": None},
        {"access_token": 12345},
        {"accessToken": "camel"},
    ],
)
def test_no_usable_access_token_is_malformed(document: dict[str, Any]) -> None:
    """A success without a non-empty string access_token is malformed."""
    error = failure(200, document)

    assert error.reason == "malformed_response"
    assert "access_token" in error.message
    assert not error.permanent


def test_form_encoded_success_body() -> None:
    """A form-encoded success answer (as some issuers send) is read too."""
    body = b"access_token=abc%2Bdef&token_type=bearer&expires_in=3600&scope=a+b"

    grant = parse_response(200, FORM, body, wall_now=NOW)

    assert grant.access_token.reveal() == "abc+def"
    assert grant.expires_in == 3600.0
    assert grant.scope == "a b"


def test_json_labelled_as_a_form_is_read_as_json() -> None:
    """A JSON body with a form Content-Type is still read as JSON."""
    body = b'{"access_token": "t", "expires_in": 60}'

    assert parse_response(200, FORM, body, wall_now=NOW).expires_in == 60.0


def test_json_with_byte_order_mark_and_no_content_type() -> None:
    """A JSON body is recognised without a Content-Type and despite a UTF-8 BOM."""
    body = b'\xef\xbb\xbf{"access_token": "t"}'

    assert parse_response(200, {}, body, wall_now=NOW).access_token.reveal() == "t"


def test_extra_members_are_ignored() -> None:
    """Unknown members (refresh_token, id_token, vendor fields) are ignored."""
    grant = ok(
        {
            "access_token": "t",
            "refresh_token": "r",
            "id_token": "i",
            "ext": {"nested": [1, 2]},
            "expires_in": 60,
        }
    )

    assert grant == Grant(Secret("t"), 60.0, None)


def test_opaque_token_is_fine() -> None:
    """A token that is not a JWT is served as it came."""
    grant = ok({"access_token": "2YotnFZFEjr1zCsicMWpAA", "token_type": "bearer"})

    assert grant.access_token.reveal() == "2YotnFZFEjr1zCsicMWpAA"


@pytest.mark.parametrize(
    ("scope", "expected"),
    [
        ("chat:invoke chat:read", "chat:invoke chat:read"),
        ("chat:invoke,chat:read", "chat:invoke chat:read"),
        ("chat:invoke, chat:read", "chat:invoke chat:read"),
        (["chat:invoke", "chat:read"], "chat:invoke chat:read"),
        (None, None),
    ],
)
def test_granted_scope_forms(scope: object, expected: str | None) -> None:
    """scope comes back space-separated from a string (space or comma) or list."""
    assert ok({"access_token": "t", "scope": scope}).scope == expected


def test_success_body_neither_json_nor_form_is_not_quoted() -> None:
    """An unreadable 200 body may be a bare token, so it is described, not shown."""
    body = b"bare.opaque.tokenvalue"

    error = failure(200, body, {"Content-Type": "text/plain"})

    assert error.reason == "malformed_response"
    assert "tokenvalue" not in error.message
    assert "text/plain" in error.message
    assert f"{len(body)} bytes" in error.message


def test_success_html_page_is_previewed() -> None:
    """A 200 HTML page (a login page at a wrong URL) is shown as its text."""
    body = b"<html><title>Sign in</title><body>Welcome</body></html>"

    error = failure(200, body, {"Content-Type": "text/html; charset=utf-8"})

    assert error.reason == "malformed_response"
    assert "'Sign in Welcome'" in error.message


def test_json_array_is_malformed() -> None:
    """A JSON value that is not an object is not a token response."""
    error = failure(200, b'["access_token"]', JSON)

    assert error.reason == "malformed_response"


# parse_response: failures


@pytest.mark.parametrize(
    ("status", "body", "reason", "permanent"),
    [
        (400, {"error": "invalid_scope"}, "invalid_scope", True),
        (400, {"error": "invalid_request"}, "invalid_request", True),
        (400, {"error": "invalid_target"}, "invalid_target", True),
        (400, {"error": "unauthorized_client"}, "unauthorized_client", True),
        (400, {"error": "invalid_client"}, "invalid_client", True),
        (401, {"error": "invalid_client"}, "invalid_client", True),
        (401, b"", "invalid_client", True),
        (401, {"error": "no_such_code"}, "invalid_client", True),
        (400, {"error": "no_such_code"}, "http_4xx", True),
        (400, {"error": None}, "http_4xx", True),
        (400, {"error": ["invalid_scope"]}, "http_4xx", True),
        (400, b"Bad Request", "http_4xx", True),
        (403, b"<html><body><h1>Forbidden</h1></body></html>", "http_4xx", True),
        (404, b"", "http_4xx", True),
        (429, b"", "rate_limited", False),
        (500, b"", "http_5xx", False),
        (502, b"", "http_5xx", False),
        (503, b"", "http_5xx", False),
        (503, {"error": "invalid_client"}, "http_5xx", False),
        (504, {"error": "temporarily_unavailable"}, "http_5xx", False),
        (400, {"error": "temporarily_unavailable"}, "http_5xx", False),
        (401, {"error": "temporarily_unavailable"}, "http_5xx", False),
        (403, {"error": "server_error"}, "http_5xx", False),
        (400, {"error": "server_error"}, "http_5xx", False),
        (200, {"error": "temporarily_unavailable"}, "http_5xx", False),
        (200, {"error": "invalid_client"}, "invalid_client", True),
        (200, {"error": "invalid_scope", "access_token": ""}, "invalid_scope", True),
        (200, {"error": "no_such_code"}, "malformed_response", False),
        (400, {"error": "slow_down"}, "rate_limited", False),
        (400, {"error": "INVALID_SCOPE"}, "invalid_scope", True),
        (503, {"error": " Temporarily_Unavailable "}, "http_5xx", False),
        (301, b"", "http_3xx", True),
        (302, b"", "http_3xx", True),
        (307, b"", "http_3xx", True),
        (308, b"", "http_3xx", True),
        (408, b"", "timeout", False),
    ],
)
def test_error_classification(
    status: int, body: bytes | dict[str, Any], reason: str, permanent: bool
) -> None:
    """Each failing answer gets a bounded reason and a retry class."""
    error = failure(status, body)

    assert error.reason == reason
    assert error.reason in REASONS
    assert error.permanent is permanent
    assert error.status == status


def test_oauth_error_message_carries_description() -> None:
    """An RFC 6749 5.2 error shows its code and error_description."""
    body = {"error": "invalid_scope", "error_description": "files:write not allowed"}

    error = failure(400, body)

    assert error.message == "status 400: invalid_scope (files:write not allowed)"
    assert str(error).startswith("invalid_scope: ")


def test_known_error_code_is_not_repeated() -> None:
    """An error without a description reads as its code, once."""
    assert failure(400, {"error": "invalid_grant"}).message == (
        "status 400: invalid_grant"
    )


@pytest.mark.parametrize("status", [400, 401, 403, 500, 503])
@pytest.mark.parametrize("word", ["temporarily_unavailable", "server_error"])
def test_issuer_trouble_is_transient_whatever_the_status(
    status: int, word: str
) -> None:
    """server_error and temporarily_unavailable are retried with backoff at
    any status, under the bounded http_5xx reason; the message keeps both."""
    body = {"error": word, "error_description": "down for maintenance"}

    error = failure(status, body, {"Retry-After": "40"}, client=make_client())

    assert error.reason == "http_5xx"
    assert not error.permanent
    assert error.retry_after == 40.0
    assert error.message == f"status {status}: {word} (down for maintenance)"


@pytest.mark.parametrize(
    "code",
    [
        "invalid_scope",
        "unauthorized_client",
        "invalid_client",
        "invalid_grant",
        "invalid_request",
        "invalid_target",
        "unsupported_grant_type",
    ],
)
def test_refusals_name_the_client_id_and_requested_scopes(code: str) -> None:
    """Every permanent refusal says which client_id asked for which scopes."""
    client = make_client(client_id="m2m-9", scopes=["chat:invoke", "files:write"])
    body = {"error": code, "error_description": "no"}

    error = failure(400, body, client=client)

    assert error.permanent
    assert error.message == (
        f"status 400: {code} (no); client_id 'm2m-9' asked for "
        "scope 'chat:invoke files:write'"
    )


@pytest.mark.parametrize(
    ("status", "body"),
    [(401, b""), (403, b"<h1>Forbidden</h1>"), (404, {"error": "quota"})],
)
def test_every_permanent_4xx_names_the_request(
    status: int, body: bytes | dict[str, Any]
) -> None:
    """Refusals without an OAuth code name the request too; so do audience
    and resources when the client sends them."""
    client = make_client(
        scopes=[],
        audience="https://api.example.com",
        resource=["https://a.example.com", "https://b.example.com"],
    )

    error = failure(status, body, client=client)

    assert error.permanent
    assert error.message.endswith(
        "; client_id 'svc' asked for no scope, audience 'https://api.example.com', "
        "resource 'https://a.example.com https://b.example.com'"
    )


def test_transient_errors_do_not_list_the_request() -> None:
    """A 5xx is the issuer's trouble: its message stays short."""
    assert failure(502, b"", client=make_client()).message == "status 502 (empty body)"


def test_unknown_error_code_shows_in_message_not_reason() -> None:
    """An issuer's own error word is kept out of the reason, a metric label."""
    error = failure(400, {"error": "quota_exceeded_for_tenant_42"})

    assert error.reason == "http_4xx"
    assert "quota_exceeded_for_tenant_42" in error.message


def test_plain_text_error_is_previewed() -> None:
    """A plain-text error body appears as a short quoted preview."""
    error = failure(400, b"Bad Request\n  missing grant_type", {"Content-Type": "text"})

    assert (
        error.message == "status 400: client error ('Bad Request missing grant_type')"
    )


def test_html_502_from_a_proxy_gives_a_short_tagless_preview() -> None:
    """A proxy's HTML error page shows as its text, shortened, tags stripped."""
    page = (
        b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
        b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
        + b"<!-- padding -->" * 400
        + b"</body>\r\n</html>\r\n"
    )

    error = failure(502, page, {"Content-Type": "text/html"})

    assert error.reason == "http_5xx"
    assert error.message == "status 502 ('502 Bad Gateway 502 Bad Gateway nginx')"


def test_long_preview_is_cut_with_an_ellipsis() -> None:
    """A long error body is cut to a short single-line preview."""
    error = failure(500, b"word " * 1000)

    assert len(error.message) < 120
    assert error.message.endswith("…')")
    assert "\n" not in error.message


def test_empty_error_body_says_so() -> None:
    """An error without a body says the body was empty."""
    assert failure(500).message == "status 500 (empty body)"
    assert preview(b"  \r\n ") == "empty body"


def test_429_with_retry_after_seconds() -> None:
    """429 is rate_limited and carries Retry-After given in seconds."""
    error = failure(429, b"", {"Retry-After": "30"})

    assert error.reason == "rate_limited"
    assert error.retry_after == 30.0
    assert not error.permanent


def test_429_with_retry_after_http_date() -> None:
    """Retry-After as an HTTP date is turned into seconds from now."""
    moment = datetime.fromtimestamp(NOW + 120, UTC)

    error = failure(429, b"", {"Retry-After": format_datetime(moment, usegmt=True)})

    assert error.reason == "rate_limited"
    assert error.retry_after == 120.0


def test_503_carries_retry_after() -> None:
    """A 5xx answer's Retry-After is kept for the backoff."""
    assert failure(503, b"", {"Retry-After": "7"}).retry_after == 7.0


@pytest.mark.parametrize("status", [429, 503])
@pytest.mark.parametrize(
    "name", ["X-RateLimit-Reset", "RateLimit-Reset", "X-Rate-Limit-Reset"]
)
@pytest.mark.parametrize(
    ("value", "seconds"), [("30", 30.0), (str(int(NOW) + 45), 45.0)]
)
def test_vendor_reset_headers_set_the_wait(
    status: int, name: str, value: str, seconds: float
) -> None:
    """Without Retry-After, a rate-limit reset (delay or Unix time) is the wait."""
    assert failure(status, b"", {name: value}).retry_after == seconds


def test_retry_after_wins_over_a_vendor_reset() -> None:
    """Retry-After is the standard answer; a reset header only fills in for it."""
    headers = {"Retry-After": "5", "X-RateLimit-Reset": "90"}

    assert failure(429, b"", headers).retry_after == 5.0


@pytest.mark.parametrize("status", [400, 403])
@pytest.mark.parametrize(
    "name", ["X-RateLimit-Remaining", "RateLimit-Remaining", "X-Rate-Limit-Remaining"]
)
def test_exhausted_quota_without_429_is_rate_limited(status: int, name: str) -> None:
    """A 400 or 403 saying no requests remain is a rate limit, not a refusal."""
    headers = {name: "0", "X-RateLimit-Reset": "20"}

    error = failure(status, b"quota exceeded", headers)

    assert error.reason == "rate_limited"
    assert not error.permanent
    assert error.retry_after == 20.0


@pytest.mark.parametrize(
    ("status", "body"),
    [(400, {"error": "invalid_scope"}), (401, {"error": "invalid_client"}), (401, b"")],
)
def test_a_refusal_wins_over_an_exhausted_quota(
    status: int, body: bytes | dict[str, Any]
) -> None:
    """An OAuth error word, or a 401, is a refusal even with no quota left."""
    headers = {"X-RateLimit-Remaining": "0"}

    error = failure(status, body, headers)

    assert error.reason != "rate_limited"
    assert error.permanent


# issuer_clock_skew


def http_date(timestamp: float) -> str:
    """An IMF-fixdate, truncated to the second as servers send it."""
    return format_datetime(datetime.fromtimestamp(int(timestamp), UTC), usegmt=True)


@pytest.mark.parametrize(
    ("stamp", "sent", "received", "skew"),
    [
        (NOW, NOW, NOW + 0.2, 0.0),
        (NOW, NOW + 0.9, NOW + 0.95, 0.0),
        (NOW + 1, NOW, NOW + 0.2, 0.8),
        (NOW + 120, NOW, NOW + 0.5, 119.5),
        (NOW - 1, NOW, NOW + 0.2, 0.0),
        (NOW - 2, NOW, NOW + 0.2, -1.0),
        (NOW - 3600, NOW + 0.5, NOW + 0.7, -3599.5),
        (NOW + 30, NOW, NOW - 5, 30.0),
    ],
)
def test_clock_skew_beyond_resolution_and_round_trip(
    stamp: float, sent: float, received: float, skew: float
) -> None:
    """The skew is the least that explains Date, given its one-second
    resolution and the time the answer took; positive when the issuer is
    ahead."""
    headers = {"Date": http_date(stamp)}

    assert issuer_clock_skew(headers, sent, received) == pytest.approx(skew)


@pytest.mark.parametrize(
    "date",
    [
        "Tue, 14 Nov 2023 22:15:20 GMT",
        "Tuesday, 14-Nov-23 22:15:20 GMT",
        "Tue Nov 14 22:15:20 2023",
    ],
)
def test_clock_skew_reads_every_http_date_form(date: str) -> None:
    """IMF-fixdate, the RFC 850 form and asctime (GMT without saying so)."""
    assert issuer_clock_skew({"Date": date}, NOW, NOW) == pytest.approx(120.0)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Date": ""},
        {"Date": "yesterday"},
        {"Date": "Tue, 32 Nov 2023 22:15:20 GMT"},
        {"Date": "Mon, 1 Jan 10000 00:00:00 GMT"},
        {"Date": "1700000000"},
    ],
)
def test_clock_skew_without_a_readable_date_is_none(headers: dict[str, str]) -> None:
    """No Date, or one that is not an HTTP date, tells nothing."""
    assert issuer_clock_skew(headers, NOW, NOW) is None


def test_secret_in_error_description_is_redacted() -> None:
    """A secret echoed in error_description never reaches the message."""
    body = {"error": "invalid_client", "error_description": f"bad secret {SECRET}!"}

    error = failure(401, body)

    assert SECRET not in error.message
    assert "bad secret [redacted]!" in error.message


def test_secret_at_the_description_cut_is_redacted() -> None:
    """A secret straddling the description's length cut leaves no fragment."""
    body = {"error": "invalid_client", "error_description": "x" * 190 + SECRET}

    error = failure(401, body)

    assert "s3cr3t" not in error.message


def test_secret_in_a_non_standard_error_member_is_redacted() -> None:
    """A secret inside a vendor's error object is redacted before shortening."""
    body = {"error": {"detail": f"{SECRET} rejected"}}

    error = failure(400, body)

    assert "s3cr3t" not in error.message
    assert "[redacted]" in error.message


@pytest.mark.parametrize(
    "echo",
    [
        SECRET,
        "client_secret=s3cr3t%2B%2F+v%40lue%3A%25%C3%A9",
        "s3cr3t%2B%2F%20v%40lue%3A%25%C3%A9",
        '"s3cr3t+/ v@lue:%\\u00e9"',
        f"<b>{SECRET}</b>",
    ],
)
def test_secret_echoed_in_a_body_is_redacted(echo: str) -> None:
    """A secret echoed raw, form- or percent-encoded or JSON-escaped is masked."""
    error = failure(400, f"rejected {echo} here".encode(), {"Content-Type": "text"})

    assert "s3cr3t" not in error.message
    assert "[redacted]" in error.message


def test_secret_with_folded_whitespace_is_redacted() -> None:
    """A secret echoed with its runs of spaces folded to one is masked too."""
    secret = "two  spaced  words"
    body = {"error": "invalid_client", "error_description": "got two spaced words"}

    with pytest.raises(IssuerError) as caught:
        parse_response(
            401, JSON, json.dumps(body).encode(), wall_now=NOW, redact=[secret]
        )

    assert "spaced" not in caught.value.message


def test_secret_at_the_preview_window_edge_is_redacted() -> None:
    """A secret straddling 4 KiB into a markup page leaves no fragment."""
    page = b"<p>" + b"<i></i>" * 584 + SECRET.encode() + b"</p>"

    error = failure(403, page, {"Content-Type": "text/html"})

    assert "s3cr3" not in error.message
    assert "[redacted]" in error.message


@pytest.mark.parametrize(
    "token",
    ["two words", "line\r\nX-Injected: yes", "caf\u00e9", " padded", "tab\there"],
)
def test_tokens_unfit_for_a_header_are_refused(token: str) -> None:
    """A token that would break or inject into a header is malformed."""
    with pytest.raises(IssuerError, match="cannot be sent in a header") as caught:
        parse_response(
            200,
            {"Content-Type": "application/json"},
            json.dumps({"access_token": token, "token_type": "Bearer"}).encode(),
            wall_now=0.0,
        )

    assert caught.value.reason == "malformed_response"
