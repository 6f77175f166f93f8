"""On-demand scope subsets, forced refreshes and quit, through the token API."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from broker import api, scoped
from broker.loader import load_text
from broker.metrics import Metrics
from broker.refresh import OnToken, Refresher
from broker.registry import Registry
from broker.scoped import ScopedTokens, Variant, normalise
from broker.status import table
from tests.fakes import FakeClock, ScriptedFetch, settle
from tests.sockets import unix_session

CONFIG = """
environments:
  prod: {token_url: "https://auth.example.com/token"}
clients:
  chat:
    environment: prod
    client_id: c
    client_secret: s3cr3t-value
    scopes: [a, b, c]
    audiences: ["https://b.example"]
refresh: {jitter: 0, min_interval: 5s}
"""

Client = TestClient[web.Request, web.Application]


class Setup:
    """A registry and a scope cache whose issuers are scripted per scope set."""

    def __init__(self, max_entries: int = 8) -> None:
        self.clock = FakeClock()
        self.metrics = Metrics()
        self.config = load_text(CONFIG, "t.yaml", {}).config
        self.main = ScriptedFetch()
        self.registry = Registry(
            self.config,
            lambda name: self.main,
            clock=self.clock,
            metrics=self.metrics,
        )
        self.fetches: dict[tuple[str, ...], ScriptedFetch] = {}
        self.scoped = ScopedTokens(self.build, self.clock, max_entries)
        self.stop = asyncio.Event()

    def build(
        self,
        name: str,
        variant: Variant,
        keep_going: Callable[[], bool],
        on_token: OnToken,
    ) -> Refresher:
        scopes = variant.scopes
        key = scopes if variant.audience is None else (*scopes, variant.audience)
        fetch = self.fetches.setdefault(key, ScriptedFetch(prefix="".join(key)))
        return Refresher(
            name,
            "prod",
            scopes,
            self.config.policy(name),
            fetch,
            clock=self.clock,
            metrics=self.metrics,
            scoped=True,
            keep_going=keep_going,
            on_token=on_token,
        )

    def app(self, listener: str) -> web.Application:
        return api.create_app(
            self.registry,
            self.metrics,
            self.clock,
            listener=listener,
            scoped=self.scoped,
            stop=self.stop,
        )


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    built = Setup()
    built.registry.start()
    await settle()
    yield built
    built.scoped.close()
    await built.registry.stop()
    await settle()


@pytest.fixture
async def unix(setup: Setup, aiohttp_client: AiohttpClient) -> Client:
    return await aiohttp_client(setup.app("unix"))


async def token(client: Client, query: str = "", method: str = "GET") -> str:
    answer = await client.request(method, f"/v1/tokens/chat{query}")
    assert answer.status == 200, await answer.text()
    body = await answer.json()
    return str(body["access_token"])


def test_scope_parameters_are_normalised() -> None:
    """Order, repeats and extra spaces do not make a new scope set."""
    assert normalise(" b  a b ") == ("a", "b")


async def test_a_subset_is_fetched_once_and_cached(setup: Setup, unix: Client) -> None:
    """The first caller of a subset fetches it; later callers share it."""
    first = await token(unix, "?scope=b a")
    again = await token(unix, "?scope=a%20b")

    assert first == again
    assert setup.fetches[("a", "b")].calls == 1
    assert len(setup.scoped) == 1
    assert first != await token(unix)


async def test_the_full_set_is_the_configured_token(setup: Setup, unix: Client) -> None:
    """Asking for exactly the configured scopes needs no second token."""
    assert await token(unix, "?scope=c b a") == await token(unix)
    assert setup.fetches == {}


async def test_a_superset_is_forbidden(setup: Setup, unix: Client) -> None:
    """A scope the client is not configured with is refused, 403."""
    answer = await unix.get("/v1/tokens/chat?scope=a admin")
    body = await answer.json()

    assert answer.status == 403
    assert body["reason"] == "scope_not_allowed"
    assert "'admin'" in body["message"]
    assert setup.fetches == {}


async def test_concurrent_first_callers_share_one_request(
    setup: Setup, unix: Client
) -> None:
    """Single flight per scope set."""
    fetch = setup.fetches.setdefault(("a",), ScriptedFetch())
    fetch.hold = asyncio.Event()
    callers = [asyncio.create_task(token(unix, "?scope=a")) for _ in range(5)]
    await settle()
    fetch.hold.set()

    tokens = await asyncio.gather(*callers)

    assert len(set(tokens)) == 1
    assert fetch.calls == 1


async def test_a_subset_in_use_is_refreshed_and_an_idle_one_dropped(
    setup: Setup, unix: Client
) -> None:
    """Used since its last token: refreshed ahead of expiry. Unused: let go,
    and fetched anew when someone asks again."""
    await token(unix, "?scope=a")
    await token(unix, "?scope=b")
    fetch_a, fetch_b = setup.fetches[("a",)], setup.fetches[("b",)]
    await setup.clock.advance(2900)
    assert (fetch_a.calls, fetch_b.calls) == (2, 2)
    await token(unix, "?scope=a")

    await setup.clock.advance(2900)

    assert (fetch_a.calls, fetch_b.calls) == (3, 2)
    assert len(setup.scoped) == 2
    await setup.clock.advance(800)
    assert await token(unix, "?scope=b") == "b-3"
    assert len(setup.scoped) == 2


async def test_the_cache_is_bounded(unix: Client, setup: Setup) -> None:
    """Past max_entries, the least recently used scope set is evicted."""
    small = Setup(max_entries=2)
    small.registry.start()
    await settle()
    try:
        for scopes in (("a",), ("b",), ("c",)):
            refresher = small.scoped.refresher("chat", Variant(scopes))
            await refresher.get()
            small.scoped.settle("chat", Variant(scopes))

        assert len(small.scoped) == 2
        kept = [r.scopes for _, r in small.scoped.entries("chat")]
        assert kept == [("b",), ("c",)]
    finally:
        small.scoped.close()
        await small.registry.stop()


async def test_new_scope_sets_are_limited_per_client(
    monkeypatch: pytest.MonkeyPatch, aiohttp_client: AiohttpClient
) -> None:
    """A caller cycling through scope sets cannot make each request one to
    the issuer: past NEW_SETS_PER_MINUTE new sets, 429 until time passes;
    sets already cached are still served."""
    monkeypatch.setattr(scoped, "NEW_SETS_PER_MINUTE", 2)
    limited = Setup()
    limited.registry.start()
    await settle()
    unix = await aiohttp_client(limited.app("unix"))
    try:
        first = await unix.get("/v1/tokens/chat?scope=a")
        second = await unix.get("/v1/tokens/chat?scope=b")
        third = await unix.get("/v1/tokens/chat?scope=c")
        cached = await unix.get("/v1/tokens/chat?scope=a")
        await limited.clock.advance(30.0)
        later = await unix.get("/v1/tokens/chat?scope=c")

        assert [first.status, second.status, cached.status] == [200, 200, 200]
        assert third.status == 429
        assert (await third.json())["reason"] == "too_many_scope_sets"
        assert third.headers["Retry-After"] == "30"
        assert later.status == 200
        assert len(limited.fetches) == 3
    finally:
        limited.scoped.close()
        await limited.registry.stop()


async def test_forced_refresh_is_coalesced_and_limited(
    setup: Setup, unix: Client
) -> None:
    """POST refresh fetches anew, but at most once per min_interval."""
    first = await token(unix)
    await setup.clock.advance(10)

    forced = await token(unix, "/refresh", method="POST")
    again = await token(unix, "/refresh", method="POST")

    assert forced != first
    assert again == forced
    assert setup.main.calls == 2
    await setup.clock.advance(5)
    assert await token(unix, "/refresh", method="POST") not in (first, forced)


async def test_forced_refresh_of_a_subset(setup: Setup, unix: Client) -> None:
    """A caller of a scope subset can force its own token to be renewed."""
    first = await token(unix, "?scope=a")
    await setup.clock.advance(10)

    forced = await token(unix, "/refresh?scope=a", method="POST")

    assert forced != first
    assert setup.fetches[("a",)].calls == 2


async def test_quit_works_only_on_the_socket(
    setup: Setup, aiohttp_client: AiohttpClient, workdir: Path
) -> None:
    """POST /v1/quit over the socket stops the broker; over TCP it is 403."""
    tcp = await aiohttp_client(setup.app("tcp"))

    refused = await tcp.post("/v1/quit", headers={"Token-Broker": "1"})
    assert refused.status == 403
    assert (await refused.json())["reason"] == "unix_only"
    assert not setup.stop.is_set()
    async with unix_session(setup.app("unix"), workdir / "b.sock") as unix:
        accepted = await unix.post("/v1/quit")

    assert accepted.status == 202
    assert setup.stop.is_set()


async def test_clients_and_status_show_scope_sets(setup: Setup, unix: Client) -> None:
    """/v1/clients lists each cached scope set; status draws them as rows."""
    await token(unix, "?scope=a")

    body = await (await unix.get("/v1/clients")).json()
    text = table(body, now=datetime.fromtimestamp(setup.clock.wall(), UTC))

    chat = body["clients"][0]
    assert [s["scopes"] for s in chat["scoped"]] == [["a"]]
    assert chat["scoped"][0]["state"] == "fresh"
    lines = text.splitlines()
    assert lines[0].split() == [
        "CLIENT",
        "SCOPES",
        "STATE",
        "EXPIRES",
        "REFRESH",
        "FAILURES",
        "LAST",
        "ERROR",
    ]
    assert lines[1].split()[:5] == ["chat", "a", "b", "c", "fresh"]
    assert lines[2].split()[:4] == ["└", "chat", "a", "fresh"]
    assert "in 60m" in lines[2]


async def test_scoped_tokens_are_counted_as_their_client(
    setup: Setup, unix: Client
) -> None:
    """A subset's requests count under the client; the gauges stay the
    configured token's."""
    await token(unix, "?scope=a")

    refreshes = setup.metrics.registry.get_sample_value(
        "token_broker_refresh_total",
        {
            "client": "chat",
            "environment": "prod",
            "result": "success",
            "reason": "none",
        },
    )

    assert refreshes == 2


async def test_an_allowed_audience_gets_its_own_token(unix: Client) -> None:
    """?audience= from the client's audiences list is a variant of its own;
    any other audience is refused."""
    allowed = await unix.get("/v1/tokens/chat?audience=https://b.example")
    body = await allowed.json()
    refused = await unix.get("/v1/tokens/chat?audience=https://evil.example")
    twice = await unix.get("/v1/tokens/chat?scope=a&scope=b")

    assert allowed.status == 200
    assert body["access_token"] == "abchttps://b.example-1"
    assert refused.status == 403
    assert (await refused.json())["reason"] == "audience_not_allowed"
    assert twice.status == 400
