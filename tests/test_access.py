"""Who may take a token, through the API: callers, the guard, rates, bodies."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from broker import api
from broker.audit import Audit
from broker.loader import load_text
from broker.metrics import Metrics
from broker.ratelimit import RateLimiter
from broker.registry import Registry
from tests.fakes import FakeClock, ScriptedFetch, settle
from tests.sockets import unix_session

KEY = "k3y-for-the-billing-app-7Qw"
OTHER_KEY = "k3y-that-nobody-configured-9Zx"
GUARD = {"Token-Broker": "1"}

Client = TestClient[web.Request, web.Application]


def config_text(workdir: Path, listen: str = "") -> str:
    (workdir / "billing.key").write_text(KEY + "\n")
    me, stranger = os.getuid(), os.getuid() + 4242
    return f"""
listen:
  unix: {workdir}/unused.sock
  {listen}
environments:
  prod: {{token_url: "https://auth.example.com/token"}}
clients:
  open: {{environment: prod, client_id: c, client_secret: s3cr3t-value}}
  mine:
    environment: prod
    client_id: c
    client_secret: s3cr3t-value
    callers: {{uids: [{me}]}}
  theirs:
    environment: prod
    client_id: c
    client_secret: s3cr3t-value
    callers: {{uids: [{stranger}]}}
  keyed:
    environment: prod
    client_id: c
    client_secret: s3cr3t-value
    callers: {{uids: [{stranger}], keys: [{{file: billing.key}}]}}
refresh: {{jitter: 0}}
"""


class Setup:
    """A registry of four clients with scripted issuers, and its apps."""

    def __init__(self, workdir: Path, listen: str = "") -> None:
        self.workdir = workdir
        self.clock = FakeClock()
        self.metrics = Metrics()
        text = config_text(workdir, listen)
        self.config = load_text(text, str(workdir / "b.yaml"), {}).config
        self.registry = Registry(
            self.config,
            lambda name: ScriptedFetch(),
            clock=self.clock,
            metrics=self.metrics,
        )
        self.audit = Audit(60.0, self.clock.wall)
        self.limiter: RateLimiter | None = None

    def app(self, listener: str) -> web.Application:
        return api.create_app(
            self.registry,
            self.metrics,
            self.clock,
            listener=listener,
            audit=self.audit,
            limiter=self.limiter,
        )

    def unix(self) -> contextlib.AbstractAsyncContextManager[aiohttp.ClientSession]:
        return unix_session(self.app("unix"), self.workdir / "api.sock")

    def refused(self, listener: str, reason: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "token_broker_requests_refused_total",
            {"listener": listener, "reason": reason},
        )
        return value or 0.0

    def served(self, client: str, caller: str, listener: str = "unix") -> float:
        value = self.metrics.registry.get_sample_value(
            "token_broker_token_requests_total",
            {"client": client, "listener": listener, "result": "ok", "caller": caller},
        )
        return value or 0.0


@pytest.fixture
async def setup(workdir: Path) -> AsyncIterator[Setup]:
    built = Setup(workdir)
    built.registry.start()
    await settle()
    yield built
    await built.registry.stop()


async def get(
    session: aiohttp.ClientSession | Client, path: str, **headers: str
) -> tuple[int, dict[str, object]]:
    async with session.get(path, headers=headers) as answer:
        body = await answer.json() if answer.status != 204 else {}
        return answer.status, body


async def test_socket_callers_are_checked_by_uid(setup: Setup) -> None:
    """On the socket, a client with callers serves the listed uids only; an
    open client serves anyone; refusals are logged, counted and explained."""
    with structlog.testing.capture_logs() as logs:
        async with setup.unix() as unix:
            open_status, _ = await get(unix, "/v1/tokens/open")
            mine_status, _ = await get(unix, "/v1/tokens/mine")
            theirs_status, theirs = await get(unix, "/v1/tokens/theirs")

    assert (open_status, mine_status, theirs_status) == (200, 200, 403)
    assert theirs["error"] == "forbidden"
    assert theirs["reason"] == "caller_not_allowed"
    assert f"uid {os.getuid()}" in str(theirs["message"])
    assert setup.served("open", "any") == 1
    assert setup.served("mine", f"uid:{os.getuid()}") == 1
    assert setup.refused("unix", "caller_not_allowed") == 1
    refused = [e for e in logs if e["event"] == "api.refused"]
    assert [(e["client"], e["reason"]) for e in refused] == [
        ("theirs", "caller_not_allowed")
    ]


async def test_refusals_in_a_loop_cost_one_log_line_per_interval(
    setup: Setup,
) -> None:
    """A caller refused again and again is counted every time but logged
    once per interval; the next line says how many it left out."""
    with structlog.testing.capture_logs() as logs:
        async with setup.unix() as unix:
            for _ in range(5):
                await get(unix, "/v1/tokens/theirs")
            await setup.clock.advance(api.REFUSAL_LOG_INTERVAL)
            await get(unix, "/v1/tokens/theirs")

    refused = [e for e in logs if e["event"] == "api.refused"]
    assert [e["suppressed"] for e in refused] == [0, 4]
    assert setup.refused("unix", "caller_not_allowed") == 6


async def test_caller_keys_work_on_both_listeners(
    setup: Setup, aiohttp_client: AiohttpClient
) -> None:
    """The right key opens a keyed client over TCP and the socket; no key or
    a wrong one is refused, and no answer repeats a key."""
    tcp = await aiohttp_client(setup.app("tcp"))
    bearer = f"Bearer {KEY}"

    with_key = await get(tcp, "/v1/tokens/keyed", Authorization=bearer, **GUARD)
    without = await get(tcp, "/v1/tokens/keyed", **GUARD)
    wrong = await get(
        tcp, "/v1/tokens/keyed", Authorization=f"Bearer {OTHER_KEY}", **GUARD
    )
    basic = await get(tcp, "/v1/tokens/keyed", Authorization=f"Basic {KEY}", **GUARD)
    uid_only = await get(tcp, "/v1/tokens/theirs", **GUARD)
    async with setup.unix() as unix:
        on_socket = await get(unix, "/v1/tokens/keyed", Authorization=bearer)

    assert with_key[0] == on_socket[0] == 200
    assert [answer[0] for answer in (without, wrong, basic, uid_only)] == [403] * 4
    assert "Authorization: Bearer" in str(without[1]["message"])
    assert "not one of this client's keys" in str(wrong[1]["message"])
    assert "only callers on the Unix socket" in str(uid_only[1]["message"])
    assert setup.served("keyed", "key:billing", "tcp") == 1
    assert setup.served("keyed", "key:billing", "unix") == 1
    for _, body in (without, wrong, basic, uid_only):
        assert KEY not in str(body)
        assert OTHER_KEY not in str(body)


async def test_each_caller_has_its_own_rate(setup: Setup) -> None:
    """Past its burst a caller gets 429 with Retry-After; time refills it;
    another caller (a key) is not held back meanwhile."""
    setup.limiter = RateLimiter(rate=0.5, burst=2, now=setup.clock.now)

    async with setup.unix() as unix:
        first = [await get(unix, "/v1/tokens/open") for _ in range(2)]
        async with unix.get("/v1/tokens/mine") as limited:
            limited_body = await limited.json()
            retry_after = limited.headers["Retry-After"]
        keyed = await get(unix, "/v1/tokens/keyed", Authorization=f"Bearer {KEY}")
        await setup.clock.advance(2.0)
        again = await get(unix, "/v1/tokens/open")

    assert [status for status, _ in first] == [200, 200]
    assert limited.status == 429
    assert limited_body["error"] == "rate_limited"
    assert retry_after == "2"
    assert keyed[0] == 200
    assert again[0] == 200
    assert setup.refused("unix", "rate_limited") == 1


async def test_a_request_body_is_refused_and_the_connection_closed(
    setup: Setup, aiohttp_client: AiohttpClient
) -> None:
    """No route takes a body: a large or chunked one gets 413 and a close."""
    tcp = await aiohttp_client(setup.app("tcp"))

    large = await tcp.post("/v1/tokens/open/refresh", data=b"x" * 5000, headers=GUARD)
    chunked = await tcp.post("/v1/tokens/open/refresh", data=_chunks(), headers=GUARD)
    small = await tcp.post("/v1/tokens/open/refresh", data=b"{}", headers=GUARD)

    assert large.status == chunked.status == 413
    assert (await large.json())["reason"] == "too_large"
    assert large.headers.get("Connection", "").lower() == "close"
    assert small.status == 200
    assert setup.refused("tcp", "too_large") == 2


async def _chunks() -> AsyncIterator[bytes]:
    yield b"{}"


@pytest.mark.parametrize(
    "path", ["/v1/tokens/open/", "/v1//tokens/open", "/V1/tokens/open", "/v1/tokens"]
)
async def test_no_route_redirects(
    setup: Setup, aiohttp_client: AiohttpClient, path: str
) -> None:
    """Near-miss paths are 404s, never a redirect a client might follow."""
    tcp = await aiohttp_client(setup.app("tcp"))

    answer = await tcp.get(path, headers=GUARD, allow_redirects=False)

    assert answer.status == 404
    assert "Location" not in answer.headers


async def test_cors_gets_no_grant(setup: Setup, aiohttp_client: AiohttpClient) -> None:
    """A preflight and a request from a page are refused, with no CORS
    header in either answer."""
    tcp = await aiohttp_client(setup.app("tcp"))
    page = {"Origin": "http://localhost:3000", **GUARD}

    preflight = await tcp.options(
        "/v1/tokens/open",
        headers={**page, "Access-Control-Request-Method": "GET"},
    )
    simple = await tcp.get("/v1/tokens/open", headers=page)

    assert (await preflight.json())["reason"] == "cors_preflight"
    assert (await simple.json())["reason"] == "browser"
    for answer in (preflight, simple):
        assert answer.status == 403
        assert not any(h.startswith("Access-Control-") for h in answer.headers)
    assert setup.refused("tcp", "cors_preflight") == 1
    assert setup.refused("tcp", "browser") == 1


async def test_guard_and_callers_follow_a_reload(
    setup: Setup, aiohttp_client: AiohttpClient
) -> None:
    """A reload changes the guard header and a client's callers at once."""
    tcp = await aiohttp_client(setup.app("tcp"))
    text = config_text(setup.workdir, "guard: {header: X-Local}").replace(
        f"callers: {{uids: [{os.getuid() + 4242}]}}", "callers: null"
    )

    await setup.registry.apply(
        load_text(text, str(setup.workdir / "b.yaml"), {}).config
    )
    old_header = await get(tcp, "/v1/tokens/open", **GUARD)
    theirs = await get(tcp, "/v1/tokens/theirs", **{"X-Local": "1"})

    assert old_header[0] == 403
    assert old_header[1]["reason"] == "missing_header"
    assert "X-Local: 1" in str(old_header[1]["message"])
    assert theirs[0] == 200


async def test_quit_needs_a_permitted_caller(setup: Setup, workdir: Path) -> None:
    """quit_callers decides who may stop the broker; others get 403."""
    stop = asyncio.Event()
    text = config_text(workdir, f"quit_callers: {{uids: [{os.getuid() + 1}]}}")
    await setup.registry.apply(
        load_text(text, str(setup.workdir / "b.yaml"), {}).config
    )
    app = api.create_app(
        setup.registry, setup.metrics, setup.clock, listener="unix", stop=stop
    )

    async with (
        unix_session(app, workdir / "q.sock") as unix,
        unix.post("/v1/quit") as answer,
    ):
        body = await answer.json()

    assert answer.status == 403
    assert body["reason"] == "caller_not_allowed"
    assert not stop.is_set()


async def test_the_audit_names_callers_never_keys(setup: Setup) -> None:
    """Hand-outs are tallied per caller, client and result, with the uid and
    pid from the socket and the key's name, and written at flush."""
    async with setup.unix() as unix:
        for _ in range(3):
            await get(unix, "/v1/tokens/open")
        await get(unix, "/v1/tokens/theirs")
        await get(unix, "/v1/tokens/keyed", Authorization=f"Bearer {KEY}")

    with structlog.testing.capture_logs() as logs:
        written = setup.audit.flush()
        again = setup.audit.flush()

    events = {(e["client"], e["result"]): e for e in logs}
    assert (written, again) == (3, 0)
    uid = os.getuid()
    assert events["open", "ok"]["count"] == 3
    assert events["open", "ok"]["caller"] == f"uid:{uid}"
    assert events["open", "ok"]["pids"] == [os.getpid()]
    assert events["theirs", "refused"]["count"] == 1
    assert events["keyed", "ok"]["caller"] == "key:billing"
    assert events["keyed", "ok"]["key_name"] == "billing"
    assert events["keyed", "ok"]["uid"] == uid
    assert all(e["event"] == "audit.tokens_served" for e in logs)
    assert KEY not in repr(logs)
