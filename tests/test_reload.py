"""Reload by difference: the plan, the registry's swap, the file watcher, and
SIGHUP and ConfigMap updates on a running ``token-broker serve``."""

from __future__ import annotations

import asyncio
import io
import os
import signal
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, get_args

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client import generate_latest
from pytest_aiohttp import AiohttpClient
from structlog.testing import capture_logs

from broker import api, logs, metrics_app
from broker.config import Config
from broker.errors import IssuerError
from broker.loader import load, load_text
from broker.metrics import RELOAD_RESULTS, Metrics
from broker.refresh import Fetch
from broker.registry import FetchFactory, Registry
from broker.reload import (
    Plan,
    Reloader,
    Result,
    Source,
    access_changes,
    diff,
    restart_keys,
)
from tests import process
from tests.fakes import FakeClock, Outcome, ScriptedFetch, grant, settle
from tests.process import Broker

Client = TestClient[web.Request, web.Application]

ENVIRONMENTS = {
    "prod": {"token_url": "https://auth.example.com/token"},
    "staging": {"token_url": "https://auth.staging.example.com/token"},
}


def spec(**fields: Any) -> dict[str, Any]:
    """A client's settings: a literal secret unless told otherwise."""
    return {
        "environment": "prod",
        "client_id": "c",
        "client_secret": "s3cr3t-value",
        **fields,
    }


def config_data(clients: dict[str, dict[str, Any]], **top: Any) -> dict[str, Any]:
    return {
        "environments": ENVIRONMENTS,
        "clients": clients,
        "refresh": {"jitter": 0},
        **top,
    }


def dump(data: dict[str, Any]) -> str:
    """YAML text of ``data``, in the order given (client order matters)."""
    return yaml.safe_dump(data, sort_keys=False)


def config(
    clients: dict[str, dict[str, Any]],
    environ: dict[str, str] | None = None,
    **top: Any,
) -> Config:
    text = dump(config_data(clients, **top))
    return load_text(text, "test.yaml", environ or {}).config


BASE = {"chat": spec(scopes=["a"]), "models": spec(scopes=["m"]), "spare": spec()}


# The plan, as a pure function of two configs.


def test_diff_sorts_clients_by_what_a_reload_does() -> None:
    """Equal clients are kept, edited ones changed, new ones added, missing
    ones removed; each list follows the config's order."""
    old = config(BASE)
    new = config(
        {"files": spec(), "chat": spec(scopes=["a", "b"]), "models": spec(scopes=["m"])}
    )

    assert diff(old, new) == Plan(
        kept=("models",), changed=("chat",), added=("files",), removed=("spare",)
    )


def test_a_changed_environment_changes_its_clients_only() -> None:
    """A new token URL changes every client of that environment, no other."""
    clients = {"chat": spec(), "staged": spec(environment="staging")}
    moved = {**ENVIRONMENTS, "staging": {"token_url": "https://new.example.com/t"}}

    plan = diff(config(clients), config(clients, environments=moved))

    assert plan == Plan(kept=("chat",), changed=("staged",))


def test_the_effective_refresh_policy_decides() -> None:
    """A new global refresh key changes only the clients that do not
    override it."""
    clients = {"chat": spec(), "own": spec(refresh={"timeout": "3s"})}
    old = config(clients, refresh={"jitter": 0, "timeout": "5s"})
    new = config(clients, refresh={"jitter": 0, "timeout": "7s"})

    assert diff(old, new) == Plan(kept=("own",), changed=("chat",))


@pytest.mark.parametrize(
    ("value", "verdict"), [("first-secret", "kept"), ("second-secret", "changed")]
)
def test_env_secrets_compare_by_value(value: str, verdict: str) -> None:
    """An ``{env:}`` secret is read at load; a new value changes the client."""
    clients = {"chat": spec(client_secret={"env": "CHAT_SECRET"})}
    old = config(clients, {"CHAT_SECRET": "first-secret"})
    new = config(clients, {"CHAT_SECRET": value})

    assert getattr(diff(old, new), verdict) == ("chat",)


def test_file_secrets_compare_by_path(tmp_path: Path) -> None:
    """A rotated secret file keeps the client (it is read at each request);
    pointing at another file changes it."""
    first, second = tmp_path / "first", tmp_path / "second"
    first.write_text("first-secret\n")
    second.write_text("first-secret\n")
    old = config({"chat": spec(client_secret={"file": str(first)})})
    first.write_text("rotated-secret\n")
    same = config({"chat": spec(client_secret={"file": str(first)})})
    other = config({"chat": spec(client_secret={"file": str(second)})})

    assert diff(old, same).kept == ("chat",)
    assert diff(old, other).changed == ("chat",)


def test_restart_keys_name_listeners_dev_issuer_and_exit_file() -> None:
    """Listener, dev issuer and exit-file changes need a restart, each named;
    log settings and clients do not."""
    old = config(BASE)
    new = config(
        {"chat": spec()},
        listen={"http": "127.0.0.1:8199", "unix_mode": "0600"},
        dev_issuer={"clients": {"x": {"secret": "dev-secret"}}},
        exit_when_file_exists="/tmp/done",
        log={"level": "debug"},
    )

    assert restart_keys(old, new) == (
        "listen.http",
        "listen.unix_mode",
        "dev_issuer",
        "exit_when_file_exists",
    )
    assert restart_keys(old, config(BASE, log={"level": "error"})) == ()


def test_guard_and_quit_callers_reload_but_limits_and_audit_need_a_restart() -> None:
    """The guard and quit_callers are read per request; the limits are bound
    into the listeners and the audit runs from the start."""
    old = config(BASE)
    live = config(
        BASE,
        listen={"guard": {"header": "X-Local"}, "quit_callers": {"uids": [0]}},
    )
    bound = config(BASE, listen={"limits": {"connections": 10}}, audit=True)

    assert restart_keys(old, live) == ()
    assert restart_keys(old, bound) == ("listen.limits", "audit")


def test_access_changes_are_named_for_the_reload_log() -> None:
    """A reload that changes who may take tokens says so, key by key."""
    old = config({"chat": spec(), "files": spec()})
    new = config(
        {"chat": spec(callers={"uids": [0]}), "files": spec()},
        listen={"guard": {"hosts": ["b.local"]}},
    )

    assert access_changes(old, new) == ["listen.guard", "clients.chat.callers"]
    assert access_changes(old, old) == []


def test_a_change_of_callers_alone_keeps_the_client() -> None:
    """callers are read per request, so changing them fetches no new token."""
    old = config({"chat": spec()})
    new = config({"chat": spec(callers={"uids": [0]})})

    assert diff(old, new) == Plan(kept=("chat",))


def test_every_reload_result_has_a_series() -> None:
    """The counter starts every result the reloader reports at zero."""
    metrics = Metrics()

    assert get_args(Result) == RELOAD_RESULTS
    for result in RELOAD_RESULTS:
        value = metrics.registry.get_sample_value(
            "token_broker_config_reloads_total", {"result": result}
        )
        assert value == 0.0


# Registry.apply on a fake clock, with a scripted issuer per refresher.


class Issuers:
    """A new scripted issuer for every refresher a registry builds.

    The n-th issuer made for ``chat`` answers ``chat-n-1``, ``chat-n-2``, ...
    unless :attr:`scripts` holds its outcomes; :attr:`hold`, when set, keeps
    the requests of issuers made from then on open.
    """

    def __init__(self) -> None:
        self.made: dict[str, list[ScriptedFetch]] = defaultdict(list)
        self.scripts: dict[str, list[Outcome]] = {}
        self.hold: asyncio.Event | None = None

    def bind(self, config: Config) -> FetchFactory:
        def fetch_for(name: str) -> Fetch:
            made = self.made[name]
            outcomes = self.scripts.pop(name, None) or [
                grant(f"{name}-{len(made) + 1}-{count}") for count in (1, 2, 3)
            ]
            fetch = ScriptedFetch(outcomes)
            fetch.hold = self.hold
            made.append(fetch)
            return fetch

        return fetch_for


class Setup:
    """A started registry on a fake clock, its API and its metrics app."""

    def __init__(self, first: Config) -> None:
        self.clock = FakeClock()
        self.metrics = Metrics()
        self.issuers = Issuers()
        self.registry = Registry(
            first,
            self.issuers.bind(first),
            clock=self.clock,
            metrics=self.metrics,
            bind=self.issuers.bind,
        )
        self.api: Client
        self.scrape: Client

    async def token(self, name: str) -> tuple[int, str]:
        answer = await self.api.get(f"/v1/tokens/{name}?format=raw")
        return answer.status, await answer.text()

    async def listed(self) -> list[str]:
        answer = await self.api.get("/v1/clients")
        return [client["name"] for client in (await answer.json())["clients"]]

    async def exported(self) -> str:
        return await (await self.scrape.get("/metrics")).text()


@pytest.fixture
async def setup(aiohttp_client: AiohttpClient) -> AsyncIterator[Setup]:
    built = Setup(config(BASE))
    built.api = await aiohttp_client(
        api.create_app(built.registry, built.metrics, built.clock, listener="unix")
    )
    built.scrape = await aiohttp_client(
        metrics_app.create_app(built.registry, built.metrics)
    )
    built.registry.start()
    await settle()
    yield built
    await built.registry.stop()


async def test_unchanged_client_keeps_token_and_schedule(setup: Setup) -> None:
    """A kept client keeps its refresher, the very same token object, and
    refreshes when it always would have, from the same issuer."""
    before = setup.registry.get("models")
    assert before is not None
    token = before.token

    result = await setup.registry.apply(config({**BASE, "chat": spec(scopes=["b"])}))
    await settle()

    assert result.result == "applied"
    assert result.plan.kept == ("models", "spare")
    assert setup.registry.get("models") is before
    assert before.token is token
    assert setup.issuers.made["models"][0].calls == 1
    await setup.clock.advance(2880)
    assert len(setup.issuers.made["models"]) == 1
    assert setup.issuers.made["models"][0].calls == 2


async def test_changed_client_swaps_once_its_first_token_arrives(
    setup: Setup,
) -> None:
    """A changed client serves the old token until the new settings' first
    token arrives; the old refresher never asks the issuer again."""
    setup.issuers.hold = asyncio.Event()

    await setup.registry.apply(config({**BASE, "chat": spec(scopes=["a", "b"])}))
    await settle()

    assert await setup.token("chat") == (200, "chat-1-1")
    new = setup.registry.get("chat")
    assert new is not None
    assert new.state() == "refreshing"
    assert setup.issuers.made["chat"][1].calls == 1

    setup.issuers.hold.set()
    await settle()

    assert await setup.token("chat") == (200, "chat-2-1")
    await setup.clock.advance(3000)
    assert setup.issuers.made["chat"][0].calls == 1


async def test_changed_client_that_fails_keeps_serving_the_old_token(
    setup: Setup,
) -> None:
    """While the new settings fail, the old token is served as long as it is
    valid; then the new settings' failure is the answer."""
    refused = IssuerError("invalid_scope", "scope b is not allowed", permanent=True)
    setup.issuers.scripts["chat"] = [refused] * 10

    await setup.registry.apply(config({**BASE, "chat": spec(scopes=["a", "b"])}))
    await settle()

    assert await setup.token("chat") == (200, "chat-1-1")
    listed = await (await setup.api.get("/v1/clients")).json()
    chat = next(c for c in listed["clients"] if c["name"] == "chat")
    assert chat["state"] == "failing"
    assert chat["last_error"]["reason"] == "invalid_scope"

    await setup.clock.advance(3600)
    answer = await setup.api.get("/v1/tokens/chat")
    assert answer.status == 503
    assert (await answer.json())["reason"] == "invalid_scope"
    assert setup.issuers.made["chat"][0].calls == 1


async def test_a_narrowed_or_reassigned_client_drops_the_old_token(
    setup: Setup,
) -> None:
    """Fewer scopes, or another client id: the old token no longer fits and
    is never served after the reload; callers wait for (or are refused) the
    new one."""
    refused = IssuerError("invalid_client", "no such client", permanent=True)
    setup.issuers.scripts["chat"] = [refused] * 10
    await setup.registry.apply(config({**BASE, "chat": spec(scopes=["a", "b"])}))
    await settle()
    assert await setup.token("chat") == (200, "chat-1-1")

    setup.issuers.scripts["chat"] = [refused] * 10
    await setup.registry.apply(config({**BASE, "chat": spec(scopes=["a"])}))
    await settle()
    narrowed = await setup.api.get("/v1/tokens/chat")

    setup.issuers.scripts["chat"] = [refused] * 10
    await setup.registry.apply(
        config({**BASE, "chat": spec(scopes=["a", "b"], client_id="other")})
    )
    await settle()
    reassigned = await setup.api.get("/v1/tokens/chat")

    assert narrowed.status == reassigned.status == 503
    assert (await narrowed.json())["reason"] == "invalid_client"


async def test_removed_client_leaves_the_api_and_the_metrics(setup: Setup) -> None:
    """A removed client answers 404, is not listed, exports no series and
    asks its issuer nothing more."""
    assert 'client="spare"' in await setup.exported()

    result = await setup.registry.apply(
        config({k: BASE[k] for k in ("chat", "models")})
    )

    assert result.plan.removed == ("spare",)
    answer = await setup.api.get("/v1/tokens/spare")
    assert answer.status == 404
    assert (await answer.json())["error"] == "unknown_client"
    assert await setup.listed() == ["chat", "models"]
    assert 'client="spare"' not in await setup.exported()
    assert 'client="spare"' not in generate_latest(setup.metrics.registry).decode()
    await setup.clock.advance(3600)
    assert setup.issuers.made["spare"][0].calls == 1


async def test_added_client_starts_and_counts_for_readiness(setup: Setup) -> None:
    """A new client starts at once; readiness waits for its first token."""
    setup.issuers.hold = asyncio.Event()

    await setup.registry.apply(config({**BASE, "files": spec()}))
    await settle()

    assert setup.registry.waiting() == ["files"]
    assert await setup.listed() == ["chat", "models", "spare", "files"]
    setup.issuers.hold.set()
    await settle()
    assert setup.registry.waiting() == []
    assert await setup.token("files") == (200, "files-1-1")


async def test_listener_change_is_refused_whole(setup: Setup) -> None:
    """A reload that moves a listener changes nothing at all, not even the
    clients it also edits."""
    before = dict(setup.registry.refreshers)
    first = setup.registry.config

    result = await setup.registry.apply(
        config({"chat": spec(scopes=["z"])}, listen={"http": "127.0.0.1:8199"})
    )

    assert result.result == "refused"
    assert result.restart_keys == ("listen.http",)
    assert setup.registry.config is first
    assert setup.registry.refreshers == before


async def test_equal_config_is_unchanged(setup: Setup) -> None:
    """Loading the same settings again is a no-change reload."""
    before = dict(setup.registry.refreshers)

    result = await setup.registry.apply(config(BASE))

    assert result.result == "unchanged"
    assert result.plan.kept == ("chat", "models", "spare")
    assert setup.registry.refreshers == before


# The reloader: reading the file, polling its digest, logging and counting.


class Files:
    """A config file beside a registry loaded from it, on a fake clock."""

    def __init__(self, root: Path, **top: Any) -> None:
        self.path = root / "broker.yaml"
        self.top = top
        self.write(BASE)
        self.clock = FakeClock()
        self.metrics = Metrics()
        self.issuers = Issuers()
        first = load(self.path, {}).config
        self.registry = Registry(
            first,
            self.issuers.bind(first),
            clock=self.clock,
            metrics=self.metrics,
            bind=self.issuers.bind,
        )
        self.forgotten: list[str] = []
        self.reloader = Reloader(
            self.registry,
            self.metrics,
            Source(str(self.path), {}),
            clock=self.clock,
            forget=self.forgotten.append,
        )

    def write(self, clients: dict[str, dict[str, Any]], **top: Any) -> None:
        data = config_data(clients, **{**self.top, **top})
        replace(self.path, dump(data))

    def count(self, result: str) -> float | None:
        return self.metrics.registry.get_sample_value(
            "token_broker_config_reloads_total", {"result": result}
        )


def replace(path: Path, text: str) -> None:
    """Write ``path`` as editors and config tools do: a rename over it."""
    staged = path.with_name(path.name + ".new")
    staged.write_text(text)
    os.replace(staged, path)


@pytest.fixture
async def files(tmp_path: Path) -> AsyncIterator[Files]:
    built = Files(tmp_path, watch_config="2s")
    built.registry.start()
    yield built
    await built.registry.stop()


@pytest.fixture
async def watching(files: Files) -> AsyncIterator[Files]:
    task = asyncio.create_task(files.reloader.run())
    await settle()
    yield files
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_invalid_file_keeps_the_old_config_and_is_counted(
    files: Files,
) -> None:
    """An invalid edit is logged with file, key path and reason, counted as
    failed, and the running clients stay as they were."""
    first = files.registry.config
    files.write({**BASE, "chat": spec(scopes="a b")})

    with capture_logs() as events:
        result = await files.reloader.reload("signal")

    assert result.result == "failed"
    assert files.registry.config is first
    assert files.count("failed") == 1
    failed = [e for e in events if e["event"] == "config.reload_failed"]
    assert failed == [
        {
            "event": "config.reload_failed",
            "log_level": "error",
            "trigger": "signal",
            "file": str(files.path),
            "key_path": "clients.chat.scopes",
            "reason": "expected a list of scopes, such as [chat:invoke, chat:read]",
        }
    ]


async def test_refused_reload_is_logged_and_counted(files: Files) -> None:
    """A listener change is refused with a message naming the key."""
    files.write(BASE, listen={"metrics": "127.0.0.1:9999"})

    with capture_logs() as events:
        result = await files.reloader.reload("signal")

    assert result.result == "refused"
    assert files.count("refused") == 1
    (refused,) = [e for e in events if e["event"] == "config.reload_refused"]
    assert refused["keys"] == ["listen.metrics"]
    assert "listen.metrics changed, which needs a restart" in refused["reason"]


async def test_applied_reload_logs_the_plan_and_forgets_changed(
    files: Files,
) -> None:
    """``config.reloaded`` lists each kind of client; changed and removed
    ones are forgotten outside the registry; literal secrets are warned
    about for the clients that are new to them."""
    files.write({"chat": spec(scopes=["b"]), "models": BASE["models"], "new": spec()})

    with capture_logs() as events:
        result = await files.reloader.reload("file")

    assert result.result == "applied"
    assert files.count("applied") == 1
    (reloaded,) = [e for e in events if e["event"] == "config.reloaded"]
    assert reloaded["trigger"] == "file"
    assert (reloaded["kept"], reloaded["changed"]) == (["models"], ["chat"])
    assert (reloaded["added"], reloaded["removed"]) == (["new"], ["spare"])
    assert files.forgotten == ["chat", "spare"]
    warned = [e["client"] for e in events if e["event"] == "config.literal_secret"]
    assert warned == ["chat", "new"]


async def test_watcher_reloads_only_when_the_content_changes(
    watching: Files,
) -> None:
    """The file is polled; an untouched file is not reloaded, a new digest
    is once it stayed the same for a whole interval (not half-written), and
    a broken file is reported once, not at every poll."""
    files = watching
    await files.clock.advance(2)
    assert files.count("unchanged") == files.count("applied") == 0

    files.write({**BASE, "files": spec()})
    await files.clock.advance(2)
    assert files.count("applied") == 0, "a change must hold for one interval"
    await files.clock.advance(2)
    assert files.count("applied") == 1
    assert files.registry.get("files") is not None

    files.write({**BASE, "files": spec(scopes="x")})
    for _ in range(3):
        await files.clock.advance(2)
    assert files.count("failed") == 1
    assert files.registry.get("files") is not None


async def test_comment_only_edit_is_an_unchanged_reload(watching: Files) -> None:
    """A new digest with the same settings counts as unchanged."""
    files = watching
    files.path.write_text(files.path.read_text() + "# reviewed\n")

    await files.clock.advance(2)
    await files.clock.advance(2)

    assert files.count("unchanged") == 1
    assert files.count("applied") == 0


async def test_configmap_symlink_swap_is_noticed(tmp_path: Path) -> None:
    """A ConfigMap-style update (a new ``..data`` link, the file's path
    untouched) is seen by the digest poll."""
    volume = ConfigMap(tmp_path)
    volume.write(dump(config_data(BASE, watch_config="1s")))
    clock = FakeClock()
    metrics = Metrics()
    issuers = Issuers()
    first = load(volume.path, {}).config
    registry = Registry(first, issuers.bind(first), clock=clock, metrics=metrics)
    reloader = Reloader(registry, metrics, Source(str(volume.path), {}), clock=clock)
    task = asyncio.create_task(reloader.run())
    await settle()

    volume.write(dump(config_data({"chat": spec()}, watch_config="1s")))
    await clock.advance(1)
    await clock.advance(1)

    assert list(registry.refreshers) == ["chat"]
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await registry.stop()


async def test_without_watching_only_a_request_reloads(tmp_path: Path) -> None:
    """With ``watch_config: null`` the file is not polled; SIGHUP's request
    still reloads, and an unchanged file counts as unchanged."""
    files = Files(tmp_path, watch_config=None)
    task = asyncio.create_task(files.reloader.run())
    await settle()

    files.reloader.request()
    await settle()
    assert files.count("unchanged") == 1

    files.write({"chat": spec()})
    await files.clock.advance(3600)
    assert files.count("applied") == 0
    files.reloader.request()
    await settle()
    assert files.count("applied") == 1

    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await files.registry.stop()


async def test_a_crashing_reload_does_not_end_the_watching(
    watching: Files, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected error in one reload is logged and counted as failed,
    and the next request is served."""
    files = watching
    apply = files.registry.apply

    async def crash(config: Config) -> Any:
        monkeypatch.setattr(files.registry, "apply", apply)
        raise RuntimeError("a bug")

    monkeypatch.setattr(files.registry, "apply", crash)

    with capture_logs() as events:
        files.reloader.request()
        await settle()
        files.reloader.request()
        await settle()

    assert [e["event"] for e in events].count("config.reload_crashed") == 1
    assert files.count("failed") == 1
    assert files.count("unchanged") == 1


@pytest.fixture
def configured(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """Record calls to ``logs.configure`` instead of reconfiguring the suite."""
    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(logs, "configure", lambda *args: calls.append(args))
    return calls


@pytest.mark.parametrize(("override", "level"), [(None, "warning"), ("debug", "debug")])
async def test_log_settings_apply_and_the_cli_override_survives(
    tmp_path: Path,
    configured: list[tuple[Any, ...]],
    override: str | None,
    level: str,
) -> None:
    """New ``log:`` settings reconfigure logging on the stream in use, and a
    ``--log-level`` given at start still wins."""
    files = Files(tmp_path)
    stream = io.StringIO()
    files.reloader = Reloader(
        files.registry,
        files.metrics,
        Source(str(files.path), {}, override, stream),
        clock=files.clock,
    )
    files.write(BASE, log={"level": "warning", "format": "json"})

    await files.reloader.reload("signal")
    await files.reloader.reload("signal")

    assert configured == [(level, "json", stream)]


# A real ``token-broker serve`` process with the dev issuer.

SECRET = "reload-e2e-secret-41xk"


def served(workdir: Path, issuer_port: int, clients: dict[str, Any], **top: Any) -> str:
    """Broker settings fetching from the dev issuer, one client per entry."""
    (workdir / "secret").write_text(SECRET + "\n")
    data = {
        "listen": {
            "http": "127.0.0.1:0",
            "unix": str(workdir / "b.sock"),
            "metrics": "127.0.0.1:0",
        },
        "environments": {
            "dev": {"token_url": f"http://127.0.0.1:{issuer_port}/oauth2/token"}
        },
        "clients": {
            name: {
                "environment": "dev",
                "client_id": "e2e",
                "client_secret": {"file": str(workdir / "secret")},
                "scopes": scopes,
            }
            for name, scopes in clients.items()
        },
        "log": {"level": "info", "format": "json"},
        "watch_config": None,
        "dev_issuer": {
            "listen": f"127.0.0.1:{issuer_port}",
            "token_lifetime": "10m",
            "clients": {
                "e2e": {
                    "secret": SECRET,
                    "scopes": [
                        "chat:invoke",
                        "chat:read",
                        "models:read",
                        "files:write",
                    ],
                }
            },
        },
        **top,
    }
    return dump(data)


FIRST = {"chat": ["chat:invoke"], "models": ["models:read"], "gone": ["chat:read"]}
SECOND = {
    "chat": ["chat:invoke", "chat:read"],
    "models": ["models:read"],
    "files": ["files:write"],
}


class ConfigMap:
    """A directory laid out as kubelet lays out a ConfigMap volume.

    ``config.yaml -> ..data/config.yaml`` and ``..data -> ..<version>``; an
    update writes a new version directory and renames a new ``..data`` link
    over the old one, so the file's own path never changes.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.version = 0

    def write(self, text: str) -> None:
        self.version += 1
        target = self.root / f"..v{self.version}"
        target.mkdir()
        (target / "config.yaml").write_text(text)
        staged = self.root / "..data_tmp"
        staged.symlink_to(target.name)
        os.replace(staged, self.root / "..data")
        if not self.path.is_symlink():
            self.path.symlink_to("..data/config.yaml")

    @property
    def path(self) -> Path:
        return self.root / "config.yaml"


async def logged(
    broker: Broker, match: Callable[[dict[str, Any]], bool], timeout: float = 20.0
) -> dict[str, Any]:
    """The first event ``match`` accepts, waiting for the broker to log it."""
    async with asyncio.timeout(timeout):
        while True:
            found = next((event for event in broker.events if match(event)), None)
            if found is not None:
                return found
            if all(reader.done() for reader in broker._readers):
                raise AssertionError(f"broker exited early:\n{broker.output()}")
            broker._arrived.clear()
            await broker._arrived.wait()


class Running:
    """Ask a running broker over HTTP."""

    def __init__(self, broker: Broker, session: aiohttp.ClientSession) -> None:
        started = broker.started()
        self.api = f"http://{started['http']}"
        self.metrics = f"http://{started['metrics']}/metrics"
        self.session = session

    async def token(self, name: str) -> tuple[int, dict[str, Any]]:
        url = f"{self.api}/v1/tokens/{name}"
        async with self.session.get(url, headers={"Token-Broker": "1"}) as answer:
            return answer.status, await answer.json()

    async def clients(self) -> dict[str, list[str]]:
        url = f"{self.api}/v1/clients"
        async with self.session.get(url, headers={"Token-Broker": "1"}) as answer:
            body = await answer.json()
        return {client["name"]: client["scopes"] for client in body["clients"]}

    async def exported(self) -> str:
        async with self.session.get(self.metrics) as answer:
            return await answer.text()


async def check_second_config(broker: Broker, running: Running, models: str) -> None:
    """The broker runs SECOND: chat refetched, models kept, files added,
    gone removed from the API and the metrics."""
    await logged(
        broker,
        lambda e: (
            e.get("event") == "token.refreshed"
            and e.get("client") == "chat"
            and set(e["scope"].split()) == {"chat:invoke", "chat:read"}
        ),
    )

    status, chat = await running.token("chat")
    assert status == 200
    assert set(chat["scope"].split()) == {"chat:invoke", "chat:read"}
    status, kept = await running.token("models")
    assert (status, kept["access_token"]) == (200, models)
    status, added = await running.token("files")
    assert (status, added["scope"]) == (200, "files:write")
    status, gone = await running.token("gone")
    assert (status, gone["error"]) == (404, "unknown_client")
    assert await running.clients() == SECOND
    exported = await running.exported()
    assert 'client="gone"' not in exported
    assert 'token_broker_config_reloads_total{result="applied"} 1.0' in exported


async def test_sighup_reloads_a_running_broker(workdir: Path) -> None:
    """Edit the file, send SIGHUP: the broker applies the difference."""
    port = process.free_port()
    path = workdir / "broker.yaml"
    path.write_text(served(workdir, port, FIRST))
    broker = await process.start(path)

    async with aiohttp.ClientSession() as session:
        running = Running(broker, session)
        status, models = await running.token("models")
        assert status == 200
        assert (await running.token("gone"))[0] == 200
        assert 'client="gone"' in await running.exported()

        replace(path, served(workdir, port, SECOND))
        broker.process.send_signal(signal.SIGHUP)
        reloaded = await logged(broker, lambda e: e.get("event") == "config.reloaded")

        assert reloaded["trigger"] == "signal"
        assert reloaded["kept"] == ["models"]
        assert (reloaded["changed"], reloaded["added"]) == (["chat"], ["files"])
        assert reloaded["removed"] == ["gone"]
        await check_second_config(broker, running, models["access_token"])

    assert await broker.stop() == 0
    assert SECRET not in broker.output()


async def test_configmap_update_reloads_without_a_signal(workdir: Path) -> None:
    """A ConfigMap-style ``..data`` swap is picked up by the file watcher."""
    port = process.free_port()
    volume = ConfigMap(workdir / "cm")
    volume.root.mkdir()
    volume.write(served(workdir, port, FIRST, watch_config="200ms"))
    broker = await process.start(volume.path)

    async with aiohttp.ClientSession() as session:
        running = Running(broker, session)
        status, models = await running.token("models")
        assert status == 200

        volume.write(served(workdir, port, SECOND, watch_config="200ms"))
        reloaded = await logged(broker, lambda e: e.get("event") == "config.reloaded")

        assert reloaded["trigger"] == "file"
        assert reloaded["file"] == str(volume.path)
        await check_second_config(broker, running, models["access_token"])

    assert await broker.stop() == 0


async def test_broken_or_refused_edits_keep_the_broker_serving(
    workdir: Path,
) -> None:
    """An invalid edit and a listener change are each reported and counted;
    the old clients keep serving; a good edit then applies."""
    port = process.free_port()
    path = workdir / "broker.yaml"
    path.write_text(served(workdir, port, FIRST))
    broker = await process.start(path)

    async with aiohttp.ClientSession() as session:
        running = Running(broker, session)
        _, chat = await running.token("chat")

        replace(path, served(workdir, port, {**FIRST, "chat": "chat:invoke"}))
        broker.process.send_signal(signal.SIGHUP)
        failed = await logged(
            broker, lambda e: e.get("event") == "config.reload_failed"
        )
        assert failed["file"] == str(path)
        assert failed["key_path"] == "clients.chat.scopes"

        moved = {"http": f"127.0.0.1:{process.free_port()}"}
        listen = {**yaml.safe_load(served(workdir, port, FIRST))["listen"], **moved}
        replace(path, served(workdir, port, SECOND, listen=listen))
        broker.process.send_signal(signal.SIGHUP)
        refused = await logged(
            broker, lambda e: e.get("event") == "config.reload_refused"
        )
        assert refused["keys"] == ["listen.http"]

        assert await running.token("chat") == (200, chat)
        assert await running.clients() == FIRST
        exported = await running.exported()
        assert 'token_broker_config_reloads_total{result="failed"} 1.0' in exported
        assert 'token_broker_config_reloads_total{result="refused"} 1.0' in exported

        replace(path, served(workdir, port, SECOND))
        broker.process.send_signal(signal.SIGHUP)
        await logged(broker, lambda e: e.get("event") == "config.reloaded")
        assert await running.clients() == SECOND

    assert await broker.stop() == 0
    assert SECRET not in broker.output()
