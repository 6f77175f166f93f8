"""The quirks battery: what real issuers do, replayed on loopback.

A scripted token endpoint answers each request as the test says (status,
headers, body, and a gate that holds the answer back until an event is
set). The broker's own path runs against it: ``IssuerClient`` on the shared
client session, and a ``Refresher`` or ``Registry`` on the fake clock where
the schedule matters. Cases covered well elsewhere are named, not repeated.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from functools import partial
from typing import Any
from urllib.parse import parse_qsl, quote_plus, unquote_plus

import pytest
from aiohttp import web
from prometheus_client import generate_latest
from pytest_aiohttp import AiohttpServer
from structlog.testing import capture_logs

import broker.issuer
from broker.config import Client, Environment, RefreshPolicy
from broker.errors import IssuerError, TokenUnavailable
from broker.grant import REASONS
from broker.issuer import IssuerClient, client_session
from broker.loader import load_text
from broker.metrics import Metrics
from broker.refresh import Refresher
from broker.registry import Registry, issuer_fetch
from broker.schedule import refresh_delay
from broker.token import Grant
from tests.fakes import FakeClock, settle

TOKEN_PATH = "/oauth2/token"
SECRET = "quirk s3cret+Zq8/é"
TOKEN = "tok-opaque-Qm4"
SCOPES = ("chat:invoke", "chat:read")
GOOD = {"access_token": TOKEN, "token_type": "Bearer", "expires_in": 3600}

Body = bytes | str | dict[str, Any] | list[Any]

# Covered elsewhere and not repeated here:
# - headers sent, then the body stalls: test_issuer's
#   test_body_cut_short_is_awaited_not_parsed; the total deadline alone:
#   test_no_answer_within_the_timeout; a redirect: test_redirect_is_not_followed
# - a valid token served on through failures: test_refresh's
#   test_failure_keeps_serving_the_valid_token
# - Retry-After capped at backoff.permanent: test_schedule's
#   test_retry_after_is_capped_at_permanent
# - leaks in a real broker process with DEBUG logs: test_leaks's
#   test_no_secret_or_token_anywhere
# - the same answers as bytes, without a socket: test_grant.py


# the scripted issuer


@dataclass(frozen=True)
class Seen:
    """One request the issuer received."""

    headers: Mapping[str, str]
    body: bytes

    def params(self) -> dict[str, Any]:
        """The body's parameters, JSON or form-encoded."""
        if self.headers.get("Content-Type", "").startswith("application/json"):
            document: dict[str, Any] = json.loads(self.body)
            return document
        return dict(parse_qsl(self.body.decode("ascii"), keep_blank_values=True))

    def basic(self) -> tuple[str, str] | None:
        """Basic credentials decoded as RFC 6749 2.3.1 says, if sent."""
        value = self.headers.get("Authorization", "")
        if not value.startswith("Basic "):
            return None
        pair = base64.b64decode(value.removeprefix("Basic "), validate=True)
        client_id, _, secret = pair.decode("ascii").partition(":")
        return unquote_plus(client_id), unquote_plus(secret)


@dataclass
class Answer:
    """One scripted reply; ``gate`` holds it back until the event is set."""

    status: int = 200
    body: Body = field(default_factory=lambda: dict(GOOD))
    headers: Mapping[str, str] = field(default_factory=dict)
    content_type: str = "application/json"
    gate: asyncio.Event | None = None


Reply = Answer | Callable[[Seen], Answer]


def ok(**members: Any) -> Answer:
    """A 200 JSON token answer with ``members`` laid over the good one."""
    return Answer(body={**GOOD, **members})


def refuse(status: int, error: Any, **headers: str) -> Answer:
    """An RFC 6749 5.2 shaped refusal."""
    return Answer(status, {"error": error}, headers)


def held(gate: asyncio.Event) -> Answer:
    """A good answer held back until ``gate`` is set."""
    return Answer(gate=gate)


class ScriptedIssuer:
    """A token endpoint that replays its script, then ``otherwise``."""

    def __init__(self) -> None:
        self.script: deque[Reply] = deque()
        self.otherwise: Reply = Answer()
        self.seen: list[Seen] = []
        self.url = ""
        self.gates: list[asyncio.Event] = []
        self._arrived = asyncio.Event()

    @property
    def env(self) -> Environment:
        """The environment whose token_url is this issuer."""
        return Environment.model_validate({"token_url": self.url})

    def then(self, *replies: Reply) -> None:
        """Queue replies for the next requests, in order."""
        self.script.extend(replies)

    async def received(self, count: int) -> None:
        """Wait until ``count`` requests have arrived (answered or not)."""
        async with asyncio.timeout(10):
            while len(self.seen) < count:
                self._arrived.clear()
                await self._arrived.wait()

    def gate(self) -> asyncio.Event:
        """A new event that holds answers back; set at teardown at the latest."""
        event = asyncio.Event()
        self.gates.append(event)
        return event

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Record the request and play the next reply."""
        seen = Seen(dict(request.headers), await request.read())
        self.seen.append(seen)
        self._arrived.set()
        reply = self.script.popleft() if self.script else self.otherwise
        answer = reply if isinstance(reply, Answer) else reply(seen)
        if answer.gate is not None:
            await answer.gate.wait()

        body = answer.body
        if isinstance(body, dict | list):
            body = json.dumps(body)
        if isinstance(body, str):
            body = body.encode()
        headers = {"Content-Type": answer.content_type, **answer.headers}

        return web.Response(status=answer.status, body=body, headers=headers)


StartIssuer = Callable[[], Awaitable[ScriptedIssuer]]


@pytest.fixture
async def start_issuer(aiohttp_server: AiohttpServer) -> AsyncIterator[StartIssuer]:
    """Start scripted issuers on 127.0.0.1; release their gates at the end."""
    started: list[ScriptedIssuer] = []

    async def start() -> ScriptedIssuer:
        scripted = ScriptedIssuer()
        app = web.Application()
        app.router.add_post(TOKEN_PATH, scripted.handle)
        server = await aiohttp_server(app, host="127.0.0.1")
        scripted.url = f"http://127.0.0.1:{server.port}{TOKEN_PATH}"
        started.append(scripted)
        return scripted

    yield start

    for scripted in started:
        for gate in scripted.gates:
            gate.set()


@pytest.fixture
async def issuer(start_issuer: StartIssuer) -> ScriptedIssuer:
    """One scripted issuer."""
    return await start_issuer()


@pytest.fixture
async def issuer_client() -> AsyncIterator[IssuerClient]:
    """The broker's IssuerClient on the broker's own client session."""
    async with client_session() as session:
        yield IssuerClient(session)


# the broker side


def make_client(secret: str = SECRET, **fields: Any) -> Client:
    """A client of the scripted issuer, client_secret_basic unless told."""
    data = {
        "environment": "dev",
        "client_id": "svc",
        "client_secret": {"env": "S"},
        "scopes": list(SCOPES),
    }
    return Client.model_validate(data | fields, context={"environ": {"S": secret}})


def policy(**rules: Any) -> RefreshPolicy:
    """The default policy without jitter, with ``rules`` laid over it."""
    return RefreshPolicy.model_validate({"jitter": 0.0} | rules)


class Watched:
    """A fetch that tells when its requests have finished, without polling."""

    def __init__(self, fetch: Callable[[], Awaitable[Grant]]) -> None:
        self._fetch = fetch
        self.started = 0
        self.finished = 0
        self._done = asyncio.Event()

    async def __call__(self) -> Grant:
        self.started += 1
        try:
            return await self._fetch()
        finally:
            self.finished += 1
            self._done.set()

    async def done(self, count: int | None = None) -> None:
        """Wait until ``count`` requests (default: all started) have ended."""
        async with asyncio.timeout(10):
            while self.finished < (self.started if count is None else count):
                self._done.clear()
                await self._done.wait()
        await settle()


@dataclass
class Rig:
    """A refresher whose requests go to a scripted issuer."""

    refresher: Refresher
    fetch: Watched
    issuer: ScriptedIssuer


RigFactory = Callable[..., Rig]


@pytest.fixture
def clock() -> FakeClock:
    """Time that moves only when the test says so."""
    return FakeClock()


@pytest.fixture
def metrics() -> Metrics:
    """A fresh metrics registry."""
    return Metrics()


@pytest.fixture
async def rig(
    issuer_client: IssuerClient, clock: FakeClock, metrics: Metrics
) -> AsyncIterator[RigFactory]:
    """Build refreshers on the real issuer client; stop their loops after."""
    built: list[tuple[Refresher, asyncio.Task[None]]] = []

    def build(
        issuer: ScriptedIssuer,
        client: Client | None = None,
        *,
        rand: Callable[[], float] = lambda: 0.5,
        timeout: float = 5.0,
        **rules: Any,
    ) -> Rig:
        client = client or make_client()
        fetch = Watched(partial(issuer_client.fetch, client, issuer.env, timeout))
        refresher = Refresher(
            "chat",
            "dev",
            client.scopes,
            policy(timeout=timeout, **rules),
            fetch,
            clock=clock,
            metrics=metrics,
            rand=rand,
        )
        built.append((refresher, asyncio.create_task(refresher.run())))
        return Rig(refresher, fetch, issuer)

    yield build

    for refresher, task in built:
        refresher.cancel()
        task.cancel()
    await asyncio.gather(*(task for _, task in built), return_exceptions=True)


async def fetch_error(
    issuer_client: IssuerClient, issuer: ScriptedIssuer, client: Client | None = None
) -> IssuerError:
    """Run one request that must fail and return its error."""
    with pytest.raises(IssuerError) as caught:
        await issuer_client.fetch(client or make_client(), issuer.env, timeout=5.0)
    return caught.value


def wait_planned(refresher: Refresher, clock: FakeClock) -> float:
    """Seconds until the refresher's next planned request."""
    return refresher.next_attempt - clock.now()


def http_date(timestamp: float) -> str:
    """An IMF-fixdate as servers send it."""
    return format_datetime(datetime.fromtimestamp(int(timestamp), UTC), usegmt=True)


# expires_in


@pytest.mark.parametrize(
    ("expires_in", "lifetime"),
    [
        ("3600", 3600.0),
        (" 900 ", 900.0),
        (3599.9, 3599.0),
        ("59.5", 59.0),
        (0, 120.0),
        ("0", 120.0),
        (None, 120.0),
        ("missing", 120.0),
    ],
)
async def test_expires_in_forms_set_the_schedule(
    rig: RigFactory,
    issuer: ScriptedIssuer,
    clock: FakeClock,
    expires_in: object,
    lifetime: float,
) -> None:
    """Digit strings and floats are lifetimes; missing, 0 and null use the
    default lifetime, and the next request waits its planned delay, never a
    hot loop."""
    answer = {**GOOD, "expires_in": expires_in}
    if expires_in == "missing":
        del answer["expires_in"]
    issuer.otherwise = Answer(body=answer)
    chosen = policy(default_lifetime="2m")
    planned = refresh_delay(lifetime, chosen, 0.5)

    run = rig(issuer, default_lifetime="2m")
    await run.fetch.done(1)

    token = await run.refresher.get()
    assert token.value.reveal() == TOKEN
    assert token.lifetime == lifetime
    assert wait_planned(run.refresher, clock) == pytest.approx(planned)
    await clock.advance(planned - 0.5)
    assert len(issuer.seen) == 1
    await clock.advance(0.5)
    await run.fetch.done(2)
    assert len(issuer.seen) == 2


MALFORMED_SUCCESS = [
    pytest.param(ok(expires_in=-1), "expires_in is negative", id="negative"),
    pytest.param(ok(expires_in="-30"), "expires_in is negative", id="negative-str"),
    pytest.param(ok(expires_in="soon"), "not a number", id="word"),
    pytest.param(ok(expires_in=""), "not a number", id="empty-expires"),
    pytest.param(ok(expires_in=[60]), "not a number", id="list"),
    pytest.param(ok(expires_in=True), "not a number", id="bool"),
    pytest.param(Answer(body={"token_type": "Bearer"}), "access_token", id="none"),
    pytest.param(ok(access_token=""), "access_token", id="empty"),
    pytest.param(ok(access_token=None), "access_token", id="null"),
    pytest.param(ok(access_token=42), "access_token", id="number"),
    pytest.param(ok(access_token="two words"), "header", id="space"),
    pytest.param(Answer(body=[GOOD]), "neither JSON", id="array"),
    pytest.param(Answer(body='{"access_token": "t"'), "neither JSON", id="cut"),
    pytest.param(
        Answer(body=TOKEN, content_type="text/plain"), "text/plain", id="bare"
    ),
]


@pytest.mark.parametrize(("answer", "why"), MALFORMED_SUCCESS)
async def test_malformed_success_is_not_cached_and_retried(
    rig: RigFactory,
    issuer: ScriptedIssuer,
    clock: FakeClock,
    answer: Answer,
    why: str,
) -> None:
    """A 2xx without a usable token or lifetime is a transient failure:
    nothing is cached, callers get the reason, the retry comes after the
    short backoff and its good answer is served."""
    issuer.then(answer)

    run = rig(issuer, backoff={"initial": "2s", "max": "1m"})
    await run.fetch.done(1)

    with pytest.raises(TokenUnavailable) as caught:
        await run.refresher.get()
    assert caught.value.reason == "malformed_response"
    assert why in caught.value.message
    assert run.refresher.token is None
    assert wait_planned(run.refresher, clock) == pytest.approx(1.0)
    await clock.advance(1.0)
    await run.fetch.done(2)
    assert (await run.refresher.get()).value.reveal() == TOKEN


# token_type


@pytest.mark.parametrize("token_type", ["Bearer", "bearer", "BEARER", "bEArer", None])
async def test_bearer_in_any_case_or_missing_is_served(
    issuer_client: IssuerClient, issuer: ScriptedIssuer, token_type: str | None
) -> None:
    """token_type is compared without case; a missing one means Bearer."""
    answer = dict(GOOD)
    if token_type is None:
        del answer["token_type"]
    else:
        answer["token_type"] = token_type
    issuer.otherwise = Answer(body=answer)

    grant = await issuer_client.fetch(make_client(), issuer.env, timeout=5.0)

    assert grant.access_token.reveal() == TOKEN


@pytest.mark.parametrize("token_type", ["DPoP", "MAC", "pop", "N_A", 1, ""])
async def test_bound_or_unknown_token_type_is_refused_by_name(
    rig: RigFactory,
    issuer: ScriptedIssuer,
    clock: FakeClock,
    token_type: object,
) -> None:
    """A DPoP, MAC or unknown token type is never served; the reason names
    the client_id and the type, and the retry waits the long backoff."""
    issuer.otherwise = ok(token_type=token_type)

    run = rig(issuer, make_client(client_id="m2m-svc"), backoff={"permanent": "15m"})
    await run.fetch.done(1)

    with pytest.raises(TokenUnavailable) as caught:
        await run.refresher.get()
    assert caught.value.reason == "malformed_response"
    assert repr(str(token_type)) in caught.value.message
    assert "client_id 'm2m-svc'" in caught.value.message
    assert TOKEN not in caught.value.message
    assert wait_planned(run.refresher, clock) == pytest.approx(900.0)


# answers in other shapes


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(
            Answer(
                body=f"access_token={TOKEN}&token_type=bearer&expires_in=600",
                content_type="application/x-www-form-urlencoded",
            ),
            id="form",
        ),
        pytest.param(
            Answer(
                body=f"access_token={TOKEN}&expires_in=600",
                content_type="application/x-www-form-urlencoded; charset=utf-8",
            ),
            id="form-charset",
        ),
        pytest.param(
            Answer(body=json.dumps({**GOOD, "expires_in": 600}), content_type="text"),
            id="json-as-text",
        ),
        pytest.param(
            Answer(
                body=b"\xef\xbb\xbf" + json.dumps({**GOOD, "expires_in": 600}).encode()
            ),
            id="bom",
        ),
        pytest.param(
            ok(
                expires_in=600,
                refresh_token="rt-1",
                id_token="a.b.c",
                ext_expires_in=99,
                not_before=1,
                vendor={"nested": [1, {"x": None}]},
            ),
            id="extra-members",
        ),
        pytest.param(Answer(201, {**GOOD, "expires_in": 600}), id="201"),
    ],
)
async def test_other_success_shapes_are_served_as_given(
    rig: RigFactory, issuer: ScriptedIssuer, answer: Answer
) -> None:
    """Form-encoded, mislabelled and BOM-prefixed answers are read; extra
    members are ignored; the opaque token is served byte for byte.
    (Parsing alone: test_grant's test_form_encoded_success_body,
    test_extra_members_are_ignored and test_opaque_token_is_fine.)"""
    issuer.otherwise = answer

    run = rig(issuer)
    await run.fetch.done(1)

    token = await run.refresher.get()
    assert token.value.reveal() == TOKEN
    assert token.header == f"Bearer {TOKEN}"
    assert token.lifetime == 600


@pytest.mark.parametrize(
    ("granted", "kept"),
    [
        ("chat:read", "chat:read"),
        ("chat:read,chat:invoke", "chat:read chat:invoke"),
        ("chat:read, chat:invoke ", "chat:read chat:invoke"),
        (["chat:invoke", "extra:grant"], "chat:invoke extra:grant"),
        ("", ""),
        (None, "chat:invoke chat:read"),
    ],
)
async def test_granted_scope_is_kept_and_requests_ask_for_the_configured(
    rig: RigFactory,
    issuer: ScriptedIssuer,
    clock: FakeClock,
    granted: object,
    kept: str,
) -> None:
    """The granted scope, space or comma separated, is served as granted;
    every request still asks for the configured scopes, not the granted."""
    issuer.otherwise = ok(scope=granted)

    run = rig(issuer)
    await run.fetch.done(1)
    await clock.advance(wait_planned(run.refresher, clock))
    await run.fetch.done(2)

    assert (await run.refresher.get()).scope == kept
    assert [seen.params()["scope"] for seen in issuer.seen] == [" ".join(SCOPES)] * 2


# what each client sends, and to whom


async def test_audience_and_params_go_only_to_their_client_and_issuer(
    start_issuer: StartIssuer,
    issuer_client: IssuerClient,
    clock: FakeClock,
    metrics: Metrics,
) -> None:
    """audience, resource and per-client params travel with every request of
    their client, and never with another client's, to another issuer."""
    first, second = await start_issuer(), await start_issuer()
    config = load_text(
        "environments:\n"
        f"  one: {{token_url: '{first.url}'}}\n"
        f"  two: {{token_url: '{second.url}'}}\n"
        "clients:\n"
        "  auth0: {environment: one, client_id: a, client_secret: {env: S}, "
        "auth: client_secret_post, encoding: json, audience: 'https://api.one', "
        "params: {organization: org_7}}\n"
        "  plain: {environment: two, client_id: b, client_secret: {env: S}, "
        "resource: 'https://api.two'}\n",
        "quirks.yaml",
        {"S": SECRET},
    ).config
    registry = Registry(
        config, issuer_fetch(issuer_client, config), clock=clock, metrics=metrics
    )

    try:
        for _ in range(3):
            for name in ("auth0", "plain"):
                await asyncio.wait({registry.refreshers[name].refresh()})
    finally:
        await registry.stop()

    assert [seen.params() for seen in first.seen] == [
        {
            "grant_type": "client_credentials",
            "client_id": "a",
            "client_secret": SECRET,
            "audience": "https://api.one",
            "organization": "org_7",
        }
    ] * 3
    assert [seen.params() for seen in second.seen] == [
        {"grant_type": "client_credentials", "resource": "https://api.two"}
    ] * 3
    assert {seen.basic() for seen in second.seen} == {("b", SECRET)}


@pytest.mark.parametrize(
    "secret",
    [
        "colon:inside",
        "per%cent%41",
        "plus+sign",
        "with spaces  two",
        "é-ü-ß",
        "中文密码",
        "emoji-🔑",
        "mixed :%+ é/?&=#",
        "+%2B%",
    ],
)
async def test_awkward_secrets_survive_basic_auth(
    issuer_client: IssuerClient, issuer: ScriptedIssuer, secret: str
) -> None:
    """client_secret_basic form-encodes id and secret before Base64, so an
    issuer decoding per RFC 6749 2.3.1 gets them back exactly. (The dev
    issuer does the same in test_integration's
    test_every_auth_method_and_body_gets_a_verified_token.)"""

    def strict(seen: Seen) -> Answer:
        if seen.basic() != ("m2m:ü +id", secret):
            return refuse(401, "invalid_client")
        return Answer()

    issuer.otherwise = strict
    client = make_client(secret, client_id="m2m:ü +id")

    grant = await issuer_client.fetch(client, issuer.env, timeout=5.0)

    assert grant.access_token.reveal() == TOKEN
    raw = issuer.seen[0].headers["Authorization"].removeprefix("Basic ")
    assert base64.b64decode(raw).decode() == (
        f"{quote_plus('m2m:ü +id')}:{quote_plus(secret)}"
    )


def one_method_only(accepts: str) -> Callable[[Seen], Answer]:
    """An issuer taking only ``accepts`` and refusing credentials sent twice."""

    def judge(seen: Seen) -> Answer:
        in_header = seen.basic() is not None
        in_body = "client_secret" in seen.params()
        if in_header and in_body:
            return Answer(400, {"error": "invalid_request", "error_description": "2"})
        used = "client_secret_basic" if in_header else "client_secret_post"
        if not (in_header or in_body) or used != accepts:
            return refuse(401, "invalid_client")
        return Answer()

    return judge


@pytest.mark.parametrize("auth", ["client_secret_basic", "client_secret_post"])
@pytest.mark.parametrize("encoding", ["form", "json"])
async def test_exactly_the_configured_method_is_used(
    issuer_client: IssuerClient, issuer: ScriptedIssuer, auth: str, encoding: str
) -> None:
    """An issuer that takes one method only, and refuses credentials sent
    both ways, accepts the broker: each request carries exactly one."""
    issuer.otherwise = one_method_only(auth)
    client = make_client(auth=auth, encoding=encoding)

    for _ in range(2):
        await issuer_client.fetch(client, issuer.env, timeout=5.0)

    for seen in issuer.seen:
        assert (seen.basic() is not None) is (auth == "client_secret_basic")
        assert ("client_secret" in seen.params()) is (auth == "client_secret_post")


# errors that are not shaped like RFC 6749 5.2


@pytest.mark.parametrize(
    ("answer", "reason", "permanent"),
    [
        pytest.param(refuse(400, None), "http_4xx", True, id="error-null"),
        pytest.param(refuse(400, 17), "http_4xx", True, id="error-number"),
        pytest.param(refuse(400, {"code": 9}), "http_4xx", True, id="error-object"),
        pytest.param(refuse(400, ["invalid_scope"]), "http_4xx", True, id="list"),
        pytest.param(refuse(400, "Invalid_Scope"), "invalid_scope", True, id="case"),
        pytest.param(refuse(400, " slow_down"), "rate_limited", False, id="space"),
        pytest.param(
            Answer(400, "Bad Request", content_type="text/plain"),
            "http_4xx",
            True,
            id="plain-text",
        ),
        pytest.param(
            Answer(401, "Unauthorized", content_type="text/plain"),
            "invalid_client",
            True,
            id="plain-401",
        ),
        pytest.param(Answer(401, ""), "invalid_client", True, id="empty-401"),
        pytest.param(Answer(400, "{not json"), "http_4xx", True, id="broken-json"),
        pytest.param(Answer(400, "[1, 2]"), "http_4xx", True, id="json-array"),
        pytest.param(
            refuse(503, "invalid_client"), "http_5xx", False, id="503-bad-secret"
        ),
        pytest.param(
            Answer(503, "Service Unavailable", content_type="text/plain"),
            "http_5xx",
            False,
            id="503-text",
        ),
        pytest.param(
            Answer(500, b"\xff\xfe\x00binary"), "http_5xx", False, id="binary"
        ),
        pytest.param(
            Answer(418, {"message": "teapot"}), "http_4xx", True, id="vendor-shape"
        ),
        pytest.param(
            ok(access_token="", error="invalid_client"),
            "invalid_client",
            True,
            id="200-error",
        ),
        pytest.param(
            Answer(200, {"error": "temporarily_unavailable"}),
            "http_5xx",
            False,
            id="200-unavailable",
        ),
    ],
)
async def test_unshaped_errors_are_classified_never_a_crash(
    issuer_client: IssuerClient,
    issuer: ScriptedIssuer,
    answer: Answer,
    reason: str,
    permanent: bool,
) -> None:
    """Error bodies with a null, numeric or object error, plain text, broken
    JSON or a 503 for a bad secret each end in a bounded reason and the
    right retry class. (The table of pure cases: test_grant's
    test_error_classification.)"""
    issuer.otherwise = answer

    error = await fetch_error(issuer_client, issuer)

    assert error.reason == reason
    assert error.reason in REASONS
    assert error.permanent is permanent
    assert error.status == answer.status
    assert "\n" not in error.message


PROXY_PAGE = (
    "<html><head><title>{status} Bad Gateway</title><style>body{{x:1}}</style>"
    "</head><body><h1>{status} Bad Gateway</h1><p>upstream said {secret}</p>"
    + "<!-- padding -->" * 300
    + "<hr><center>cdn-edge</center></body></html>"
)


@pytest.mark.parametrize(
    ("status", "reason", "permanent"),
    [
        (502, "http_5xx", False),
        (503, "http_5xx", False),
        (504, "http_5xx", False),
        (500, "http_5xx", False),
        (403, "http_4xx", True),
        (404, "http_4xx", True),
        (200, "malformed_response", False),
    ],
)
async def test_html_page_gives_a_short_redacted_preview(
    issuer_client: IssuerClient,
    issuer: ScriptedIssuer,
    status: int,
    reason: str,
    permanent: bool,
) -> None:
    """A proxy's or CDN's HTML page is summarised by its text, short, one
    line, the echoed secret masked; retried unless the status says the
    request itself was refused."""
    page = PROXY_PAGE.format(status=status, secret=SECRET)
    issuer.otherwise = Answer(status, page, content_type="text/html")

    error = await fetch_error(issuer_client, issuer)

    assert error.reason == reason
    assert error.permanent is permanent
    assert f"{status} Bad Gateway" in error.message
    assert "<" not in error.message
    assert SECRET not in error.message
    assert "[redacted]" in error.message
    assert len(error.message) < 250


async def test_html_502_is_retried_and_then_served(
    rig: RigFactory, issuer: ScriptedIssuer, clock: FakeClock
) -> None:
    """After a CDN's 502 page the next attempt comes after the short backoff."""
    page = PROXY_PAGE.format(status=502, secret="")
    issuer.then(Answer(502, page, content_type="text/html"))

    run = rig(issuer, backoff={"initial": "4s", "max": "1m"})
    await run.fetch.done(1)
    assert run.refresher.last_error is not None
    assert run.refresher.last_error.reason == "http_5xx"
    await clock.advance(wait_planned(run.refresher, clock))
    await run.fetch.done(2)

    assert (await run.refresher.get()).value.reveal() == TOKEN


# permanent refusals


@pytest.mark.parametrize(
    "code",
    [
        "invalid_scope",
        "unauthorized_client",
        "invalid_client",
        "invalid_grant",
        "invalid_target",
        "unsupported_grant_type",
        "invalid_request",
    ],
)
async def test_refusal_waits_long_and_names_client_and_scopes(
    rig: RigFactory,
    issuer: ScriptedIssuer,
    clock: FakeClock,
    metrics: Metrics,
    code: str,
) -> None:
    """A refusal is permanent: one request per backoff.permanent whatever
    the callers do, counted under its code, and the reason callers and
    /v1/clients see names the client_id and the scopes it asked for.
    (Against the dev issuer: test_integration's test_refusals_are_classified.)"""
    issuer.otherwise = Answer(400, {"error": code, "error_description": "nope"})

    run = rig(issuer, backoff={"permanent": "20m"})
    await run.fetch.done(1)
    for _ in range(5):
        with pytest.raises(TokenUnavailable) as caught:
            await run.refresher.get()
    await clock.advance(1199)

    assert len(issuer.seen) == 1
    assert caught.value.reason == code
    assert caught.value.retry_after == 1200
    assert caught.value.message == (
        f"status 400: {code} (nope); client_id 'svc' asked for "
        "scope 'chat:invoke chat:read'"
    )
    labels = {"client": "chat", "environment": "dev", "result": "failure"}
    counted = metrics.registry.get_sample_value(
        "token_broker_refresh_total", labels | {"reason": code}
    )
    assert counted == 1
    await clock.advance(1)
    await run.fetch.done(2)
    assert len(issuer.seen) == 2


# transient failures and the shared cooldown


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(Answer(500, ""), id="500"),
        pytest.param(Answer(502, "Bad Gateway", content_type="text/plain"), id="502"),
        pytest.param(refuse(503, "temporarily_unavailable"), id="503"),
        pytest.param(Answer(504, ""), id="504"),
        pytest.param(refuse(400, "temporarily_unavailable"), id="400-unavailable"),
        pytest.param(refuse(401, "server_error"), id="401-server_error"),
        pytest.param(refuse(200, "server_error"), id="200-server_error"),
    ],
)
async def test_server_trouble_backs_off_exponentially(
    rig: RigFactory, issuer: ScriptedIssuer, clock: FakeClock, answer: Answer
) -> None:
    """5xx answers and the server_error and temporarily_unavailable words,
    whatever the status, are transient: 1, 2, 4, 8 s and then served."""
    issuer.then(*[answer] * 4)

    run = rig(issuer, rand=lambda: 1.0, backoff={"initial": "1s", "max": "1m"})
    waits = []
    for attempt in range(1, 5):
        await run.fetch.done(attempt)
        assert run.refresher.last_error is not None
        assert run.refresher.last_error.reason == "http_5xx"
        waits.append(wait_planned(run.refresher, clock))
        await clock.advance(waits[-1])
    await run.fetch.done(5)

    assert waits == [1.0, 2.0, 4.0, 8.0]
    assert (await run.refresher.get()).value.reveal() == TOKEN


def now_plus(seconds: float) -> str:
    """A Unix time ``seconds`` from now, as some vendors send a reset."""
    return str(int(time.time() + seconds))


@pytest.mark.parametrize("status", [429, 503])
@pytest.mark.parametrize(
    ("headers", "cooldown"),
    [
        ({"Retry-After": "120"}, 120.0),
        ({"Retry-After": "HTTP-DATE"}, 120.0),
        ({"X-RateLimit-Reset": "90"}, 90.0),
        ({"RateLimit-Reset": "75"}, 75.0),
        ({"X-Rate-Limit-Reset": "60"}, 60.0),
        ({"X-RateLimit-Reset": "EPOCH"}, 150.0),
        ({"Retry-After": "45", "X-RateLimit-Reset": "300"}, 45.0),
    ],
)
async def test_rate_limit_is_one_shared_cooldown(
    rig: RigFactory,
    issuer: ScriptedIssuer,
    clock: FakeClock,
    status: int,
    headers: dict[str, str],
    cooldown: float,
) -> None:
    """429 or 503 with Retry-After (seconds or HTTP date) or a vendor reset
    header (delay or Unix time): the loop and every caller wait it out
    together, then exactly one request goes out."""
    for name, value in list(headers.items()):
        if value == "HTTP-DATE":
            headers[name] = http_date(time.time() + cooldown + 1)
        elif value == "EPOCH":
            headers[name] = now_plus(cooldown + 1)
    issuer.then(Answer(status, "", headers))

    run = rig(issuer, backoff={"initial": "1s", "max": "2m"})
    await run.fetch.done(1)
    wait = wait_planned(run.refresher, clock)
    assert cooldown - 1 <= wait <= cooldown + 1

    callers = [run.refresher.get(min_ttl=ttl) for ttl in (0, 0, 60, 3000)]
    for caller in callers:
        with pytest.raises(TokenUnavailable) as caught:
            await caller
        assert caught.value.retry_after == pytest.approx(wait)
    await clock.advance(wait - 0.5)
    assert len(issuer.seen) == 1
    await clock.advance(0.5)
    await run.fetch.done(2)

    assert len(issuer.seen) == 2
    assert (await run.refresher.get()).value.reveal() == TOKEN


# many callers, many brokers


async def test_many_callers_share_one_request_per_client(
    issuer: ScriptedIssuer,
    issuer_client: IssuerClient,
    clock: FakeClock,
    metrics: Metrics,
) -> None:
    """Callers of three clients, arriving while the first requests are held
    at the issuer, cause one request per client, and each caller gets its
    own client's token. (One refresher on a scripted fetch:
    test_refresh's test_concurrent_callers_share_one_request.)"""
    gate = issuer.gate()

    def per_client(seen: Seen) -> Answer:
        token = f"tok-{seen.params()['n']}"
        return Answer(body={**GOOD, "access_token": token}, gate=gate)

    issuer.otherwise = per_client
    names = ("alpha", "beta", "gamma")
    config = load_text(
        f"environments: {{dev: {{token_url: '{issuer.url}'}}}}\n"
        "clients:\n"
        + "".join(
            f"  {name}: {{environment: dev, client_id: {name}, "
            f"client_secret: {{env: S}}, params: {{n: {name}}}}}\n"
            for name in names
        ),
        "quirks.yaml",
        {"S": SECRET},
    ).config
    registry = Registry(
        config, issuer_fetch(issuer_client, config), clock=clock, metrics=metrics
    )
    registry.start()

    try:
        asked = [name for name in names for _ in range(40)]
        callers = [
            asyncio.create_task(registry.refreshers[name].get(min_ttl=n % 3 * 60))
            for n, name in enumerate(asked)
        ]
        await issuer.received(len(names))
        await settle()
        gate.set()
        tokens = await asyncio.gather(*callers)
    finally:
        await registry.stop()

    assert sorted(seen.params()["n"] for seen in issuer.seen) == sorted(names)
    assert [token.value.reveal() for token in tokens] == [
        f"tok-{name}" for name in asked
    ]


async def test_many_brokers_spread_their_refreshes(
    rig: RigFactory, issuer: ScriptedIssuer, clock: FakeClock
) -> None:
    """Brokers that start together refresh at jittered moments inside the
    jitter window, so the issuer does not see them all at once. (The
    arithmetic: test_schedule's test_jitter_only_moves_earlier.)"""
    brokers = [
        rig(issuer, rand=random.Random(seed).random, jitter=0.1) for seed in range(12)
    ]
    for run in brokers:
        await run.fetch.done(1)

    planned = sorted(
        ((wait_planned(run.refresher, clock), run) for run in brokers),
        key=lambda pair: pair[0],
    )
    moments = [moment for moment, _ in planned]

    assert len(set(moments)) == len(brokers)
    assert moments[0] >= 2880 * 0.9
    assert moments[-1] <= 2880
    assert moments[-1] - moments[0] > 2880 * 0.1 / 2
    await clock.advance(moments[0])
    await planned[0][1].fetch.done(2)
    assert len(issuer.seen) == len(brokers) + 1
    await clock.advance(moments[-1] - moments[0])
    for run in brokers:
        await run.fetch.done(2)
    assert len(issuer.seen) == 2 * len(brokers)


# very short lifetimes


@pytest.mark.parametrize("lifetime", [2, 3, 5, 10])
async def test_short_lifetimes_stay_ahead_without_a_loop(
    rig: RigFactory, issuer: ScriptedIssuer, clock: FakeClock, lifetime: int
) -> None:
    """Tokens of a few seconds are replaced before they stop being served,
    for a whole minute, at most once a second."""
    issuer.otherwise = ok(expires_in=lifetime)
    run = rig(issuer, jitter=0.1, rand=random.Random(lifetime).random)
    await run.fetch.done(1)

    for _ in range(240):
        await clock.advance(0.25)
        await run.fetch.done()
        assert run.refresher.servable() is not None

    assert 60 / lifetime <= len(issuer.seen) - 1 <= 60


# deadlines


@pytest.fixture
def unanswered() -> Iterator[str]:
    """A loopback port whose full backlog leaves a new connect hanging."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)

    yield f"http://127.0.0.1:{port}{TOKEN_PATH}"

    for sock in [*fillers, listener]:
        sock.close()


@pytest.fixture
async def silent() -> AsyncIterator[int]:
    """A loopback port that accepts, reads, and never says a word."""
    release = asyncio.Event()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        await release.wait()
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    release.set()
    server.close()
    await server.wait_closed()


async def test_connect_deadline_when_the_handshake_never_completes(
    issuer_client: IssuerClient, unanswered: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A TCP connect that never completes fails on the connect deadline,
    well before the total one, and says so."""
    monkeypatch.setattr(broker.issuer, "CONNECT_TIMEOUT", 0.2)
    env = Environment.model_validate({"token_url": unanswered})

    with pytest.raises(IssuerError) as caught:
        await issuer_client.fetch(make_client(), env, timeout=30.0)

    assert caught.value.reason == "timeout"
    assert not caught.value.permanent
    assert caught.value.message == (f"connecting to {unanswered} took longer than 0.2s")


async def test_connect_deadline_covers_a_tls_handshake_left_unanswered(
    issuer_client: IssuerClient, silent: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An https endpoint that accepts TCP but never answers the TLS hello
    fails on the connect deadline too."""
    monkeypatch.setattr(broker.issuer, "CONNECT_TIMEOUT", 0.2)
    url = f"https://127.0.0.1:{silent}{TOKEN_PATH}"
    env = Environment.model_validate({"token_url": url})

    with pytest.raises(IssuerError) as caught:
        await issuer_client.fetch(make_client(), env, timeout=30.0)

    assert caught.value.reason == "timeout"
    assert caught.value.message == f"connecting to {url} took longer than 0.2s"


async def test_read_deadline_when_the_issuer_accepts_and_never_answers(
    issuer_client: IssuerClient, silent: int
) -> None:
    """A connection accepted and never answered ends on the read or total
    deadline, whichever fires first at the same limit. (A body cut short
    mid-way: test_issuer's test_body_cut_short_is_awaited_not_parsed.)"""
    url = f"http://127.0.0.1:{silent}{TOKEN_PATH}"
    env = Environment.model_validate({"token_url": url})

    with pytest.raises(IssuerError) as caught:
        await issuer_client.fetch(make_client(), env, timeout=0.3)

    assert caught.value.reason == "timeout"
    assert caught.value.message in (
        f"{url} sent nothing for 0.3s",
        f"no complete answer from {url} within 0.3s",
    )


async def test_hanging_issuer_releases_callers_and_backs_off(
    rig: RigFactory, issuer: ScriptedIssuer, clock: FakeClock
) -> None:
    """While the issuer holds every request open, callers get 503 timeout
    once the request deadline passes, and the retry waits the backoff."""
    issuer.otherwise = held(issuer.gate())

    run = rig(issuer, timeout=0.3, backoff={"initial": "3s", "max": "1m"})

    with pytest.raises(TokenUnavailable) as caught:
        await run.refresher.get()
    await run.fetch.done(1)
    assert caught.value.reason == "timeout"
    assert wait_planned(run.refresher, clock) == pytest.approx(1.5)
    assert len(issuer.seen) == 1


# clock skew


@pytest.mark.parametrize("skew", [-3600, -90, 0, 90, 3600])
async def test_skewed_issuer_is_measured_and_cannot_move_expiry(
    issuer: ScriptedIssuer, clock: FakeClock, metrics: Metrics, skew: int
) -> None:
    """The issuer's Date is compared with our clock and exported; the token
    is still timed from our own send time, whatever the issuer's clock."""
    issuer.otherwise = lambda seen: Answer(
        headers={"Date": http_date(time.time() + skew)}
    )
    observer = broker.issuer.skew_observer(metrics)

    with capture_logs() as logs:
        async with client_session() as session:
            fetch = partial(
                IssuerClient(session, observe_skew=observer).fetch,
                make_client(),
                issuer.env,
                5.0,
                "dev",
            )
            refresher = Refresher(
                "chat", "dev", SCOPES, policy(), fetch, clock=clock, metrics=metrics
            )
            started = clock.now()
            token = await refresher.get()

    measured = metrics.registry.get_sample_value(
        "token_broker_issuer_clock_skew_seconds", {"environment": "dev"}
    )
    assert measured is not None
    assert abs(measured - skew) <= 1.5
    assert token.obtained_at == started
    assert token.expires_at == started + 3600
    warned = [log for log in logs if log["event"] == "issuer.clock_skew"]
    assert len(warned) == (1 if abs(skew) > 60 else 0)


# nothing leaks, whichever way it fails


def echo_body(status: int) -> Callable[[Seen], Answer]:
    """An error quoting the request body back as plain text."""
    return lambda seen: Answer(status, seen.body.decode(), content_type="text/plain")


def echo_headers(status: int) -> Callable[[Seen], Answer]:
    """An error quoting the request headers back in a vendor-shaped object."""
    return lambda seen: Answer(status, {"error": {"echo": dict(seen.headers)}})


def echo_page(status: int) -> Callable[[Seen], Answer]:
    """An HTML page quoting the secret and the Authorization header."""
    return lambda seen: Answer(
        status,
        f"<p>{SECRET}</p><pre>{seen.headers.get('Authorization')}</pre>",
        content_type="text/html",
    )


def echo_description(status: int, error: str) -> Callable[[Seen], Answer]:
    """An RFC-shaped error whose description quotes body and headers."""
    return lambda seen: Answer(
        status,
        {
            "error": error,
            "error_description": f"{seen.body.decode()} {dict(seen.headers)}",
        },
    )


ECHOES = [
    pytest.param(echo_body(500), id="500-body"),
    pytest.param(echo_body(400), id="400-body"),
    pytest.param(echo_description(401, "invalid_client"), id="401-description"),
    pytest.param(echo_description(503, "temporarily_unavailable"), id="503-desc"),
    pytest.param(echo_description(429, "slow_down"), id="429-description"),
    pytest.param(echo_headers(400), id="400-headers"),
    pytest.param(echo_page(502), id="502-page"),
    pytest.param(echo_page(200), id="200-page"),
    pytest.param(lambda seen: ok(token_type="DPoP"), id="dpop"),
    pytest.param(lambda seen: ok(expires_in="soon"), id="bad-expiry"),
    pytest.param(lambda seen: ok(access_token=f"{TOKEN} x"), id="token-space"),
    pytest.param(lambda seen: Answer(200, TOKEN, content_type="text/plain"), id="bare"),
    pytest.param(lambda seen: Answer(200, f'{{"access_token": "{TOKEN}"'), id="cut"),
    pytest.param(lambda seen: refuse(200, "invalid_client"), id="200-refusal"),
]


@pytest.mark.parametrize("auth", ["client_secret_basic", "client_secret_post"])
@pytest.mark.parametrize("echo", ECHOES)
async def test_no_secret_or_token_in_any_failure(
    rig: RigFactory,
    issuer: ScriptedIssuer,
    metrics: Metrics,
    auth: str,
    echo: Callable[[Seen], Answer],
) -> None:
    """Whatever the issuer echoes and however the request fails, neither the
    secret (raw, encoded or inside Basic) nor the token reaches the error,
    its repr, a log event or a metric. (The whole process with DEBUG logs:
    test_leaks's test_no_secret_or_token_anywhere.)"""
    issuer.otherwise = echo
    basic = base64.b64encode(f"svc:{quote_plus(SECRET)}".encode()).decode()
    escaped = json.dumps(SECRET)[1:-1]
    forbidden = (SECRET, quote_plus(SECRET), escaped, basic, TOKEN, "s3cret")

    with capture_logs() as logs:
        run = rig(issuer, make_client(auth=auth))
        await run.fetch.done(1)
        with pytest.raises(TokenUnavailable) as caught:
            await run.refresher.get()

    error = run.refresher.last_error
    assert error is not None
    shown = [
        str(error),
        repr(error),
        error.message,
        caught.value.message,
        repr(caught.value),
        json.dumps(logs, default=repr),
        generate_latest(metrics.registry).decode(),
    ]
    for text in shown:
        for value in forbidden:
            assert value not in text
