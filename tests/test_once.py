"""``token-broker once``: fetch, write the files, print a summary, exit."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from broker.oneshot import Outcome, exit_code, summary
from tests import process
from tests.process import run_cli

SECRET = "once-secret-Hk42"


def once_config(workdir: Path, *, bad_required: bool = True, hook: str = "") -> Path:
    """Clients chat and models (good secret) and bad (wrong secret)."""
    (workdir / "secret").write_text(SECRET + "\n")
    (workdir / "wrong").write_text("not-the-secret\n")
    (workdir / "out").mkdir(exist_ok=True)
    port = process.free_port()
    config = workdir / "once.yaml"
    config.write_text(
        f"""
listen: {{http: 127.0.0.1:0, unix: null, metrics: null}}
environments:
  dev: {{token_url: "http://127.0.0.1:{port}/oauth2/token"}}
clients:
  chat:
    environment: dev
    client_id: once
    client_secret: {{file: secret}}
    scopes: [chat:invoke]
    sinks: [{{path: out/chat}}]
    {hook}
  models:
    environment: dev
    client_id: once
    client_secret: {{file: secret}}
    scopes: [models:read]
    sinks: [{{path: out/models.json, format: json}}]
  bad:
    environment: dev
    client_id: once
    client_secret: {{file: wrong}}
    required: {str(bad_required).lower()}
    sinks: [{{path: out/bad}}]
dev_issuer:
  listen: 127.0.0.1:{port}
  clients:
    once: {{secret: {SECRET}, scopes: [chat:invoke, models:read]}}
"""
    )
    return config


def table(out: str) -> dict[str, list[str]]:
    """The summary's rows by client: required, result, detail."""
    rows = [line.split(maxsplit=3) for line in out.splitlines()]
    assert rows[0] == ["client", "required", "result", "detail"]
    return {row[0]: row[1:] for row in rows[1:]}


def events(err: str, name: str) -> list[dict[str, object]]:
    found = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    return [event for event in found if event["event"] == name]


async def test_every_client_written_and_summarised(workdir: Path) -> None:
    """Named clients all succeed: exit 0, files written, one row each."""
    config = once_config(workdir)

    code, out, err = await run_cli("once", "-c", str(config), "chat", "models")

    assert code == 0, err
    rows = table(out)
    assert set(rows) == {"chat", "models"}
    assert rows["chat"][:2] == ["yes", "ok"]
    assert rows["chat"][2].startswith("expires 20")
    chat = (workdir / "out/chat").read_text()
    assert chat.endswith("\n")
    assert chat.count(".") == 2
    document = json.loads((workdir / "out/models.json").read_text())
    assert document["scope"] == "models:read"
    assert chat.strip() not in out + err


async def test_a_failing_required_client_exits_1(workdir: Path) -> None:
    """A refused client fails the run after one request; the others still get
    their files."""
    config = once_config(workdir)

    code, out, err = await run_cli("once", "-c", str(config))

    assert code == 1
    rows = table(out)
    assert rows["bad"][:2] == ["yes", "failed"]
    assert rows["bad"][2].startswith("invalid_client: ")
    assert rows["chat"][1] == rows["models"][1] == "ok"
    assert (workdir / "out/chat").exists()
    assert not (workdir / "out/bad").exists()
    refused = [e for e in events(err, "token.refresh_failed") if e["client"] == "bad"]
    assert len(refused) == 1
    assert "not-the-secret" not in out + err


async def test_a_failing_optional_client_does_not_fail_the_run(workdir: Path) -> None:
    """required: false clients are reported but do not change the exit code."""
    config = once_config(workdir, bad_required=False)

    code, out, _ = await run_cli("once", "-c", str(config))

    assert code == 0
    assert table(out)["bad"][:2] == ["no", "failed"]


async def test_a_named_client_counts_as_required(workdir: Path) -> None:
    """Asking for an optional client by name makes its failure fail the run."""
    config = once_config(workdir, bad_required=False)

    code, out, _ = await run_cli("once", "-c", str(config), "bad")

    assert code == 1
    assert table(out)["bad"][:2] == ["yes", "failed"]


async def test_an_unknown_client_exits_2_and_fetches_nothing(workdir: Path) -> None:
    """A name the config lacks is a usage error; no client is fetched."""
    config = once_config(workdir)

    code, out, err = await run_cli("once", "-c", str(config), "chat", "nope")

    assert code == 2
    assert out == ""
    assert f"{config} has no client 'nope'" in err
    assert list((workdir / "out").iterdir()) == []


async def test_only_named_clients_are_fetched(workdir: Path) -> None:
    """Clients not named are neither requested nor written."""
    config = once_config(workdir)

    code, out, err = await run_cli("once", "-c", str(config), "models")

    assert code == 0
    assert set(table(out)) == {"models"}
    assert [e["client"] for e in events(err, "token.refreshed")] == ["models"]
    assert sorted(p.name for p in (workdir / "out").iterdir()) == ["models.json"]


async def test_on_refresh_runs_before_the_exit(workdir: Path) -> None:
    """The command runs once its files are written, and has ended by the exit."""
    marker = workdir / "out/hook"
    hook = f'on_refresh: [sh, -c, "cat $TOKEN_BROKER_SINKS > {marker}"]'
    config = once_config(workdir, hook=hook)

    code, _, _ = await run_cli("once", "-c", str(config), "chat")

    assert code == 0
    assert marker.read_text() == (workdir / "out/chat").read_text()


async def test_a_failing_on_refresh_fails_the_client(workdir: Path) -> None:
    """A command that exits non-zero makes the client's row fail."""
    config = once_config(workdir, hook="on_refresh: [sh, -c, 'exit 4']")

    code, out, _ = await run_cli("once", "-c", str(config), "chat")

    assert code == 1
    assert table(out)["chat"] == ["yes", "failed", "on_refresh: exited with status 4"]


@pytest.fixture
async def flaky_issuer() -> AsyncIterator[tuple[TestServer, list[int]]]:
    """An issuer whose first answer is a 503, then tokens."""
    answered: list[int] = []

    async def token(request: web.Request) -> web.Response:
        answered.append(503 if not answered else 200)
        if answered[-1] == 503:
            return web.json_response({"error": "temporarily_unavailable"}, status=503)
        return web.json_response({"access_token": "flaky-tok-1", "expires_in": 600})

    app = web.Application()
    app.router.add_post("/token", token)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    yield server, answered
    await server.close()


def flaky_config(workdir: Path, port: int) -> Path:
    config = workdir / "flaky.yaml"
    config.write_text(
        f"""
listen: {{http: 127.0.0.1:0, unix: null, metrics: null}}
refresh: {{backoff: {{initial: 100ms, max: 200ms}}}}
environments:
  dev: {{token_url: "http://127.0.0.1:{port}/token"}}
clients:
  chat:
    environment: dev
    client_id: flaky
    client_secret: {{file: secret}}
    sinks: [{{path: token}}]
"""
    )
    (workdir / "secret").write_text("flaky-secret\n")
    return config


async def test_a_transient_failure_is_retried(
    workdir: Path, flaky_issuer: tuple[TestServer, list[int]]
) -> None:
    """A 503 is tried again after a short backoff, and the run succeeds."""
    server, answered = flaky_issuer
    config = flaky_config(workdir, server.port or 0)

    code, out, err = await run_cli("once", "-c", str(config))

    assert code == 0, err
    assert answered == [503, 200]
    assert (workdir / "token").read_text() == "flaky-tok-1\n"
    assert table(out)["chat"][1] == "ok"
    assert len(events(err, "once.retrying")) == 1


async def test_attempts_1_makes_one_request(
    workdir: Path, flaky_issuer: tuple[TestServer, list[int]]
) -> None:
    """--attempts 1 turns retries off: the 503 fails the run."""
    server, answered = flaky_issuer
    config = flaky_config(workdir, server.port or 0)

    code, out, _ = await run_cli("once", "-c", str(config), "--attempts", "1")

    assert code == 1
    assert answered == [503]
    assert table(out)["chat"][1] == "failed"
    assert not (workdir / "token").exists()


def test_exit_code_counts_only_required_clients() -> None:
    """0 when every required client succeeded, whatever optional ones did."""
    ok = Outcome("a", True, True, "expires x")
    optional_failed = Outcome("b", False, False, "timeout: slow")
    required_failed = Outcome("c", True, False, "invalid_client: no")

    assert exit_code([ok, optional_failed]) == 0
    assert exit_code([ok, required_failed]) == 1
    assert exit_code([]) == 0


def test_summary_aligns_its_columns() -> None:
    """Each column starts at the same offset on every line."""
    text = summary(
        [
            Outcome("chat", True, True, "expires 2030-01-01T00:00:00Z"),
            Outcome("a-longer-name", False, False, "timeout: slow"),
        ]
    )

    lines = text.splitlines()
    assert text.endswith("\n")
    assert len({line.index(line.split()[1]) for line in lines}) == 1
    assert lines[2].split(maxsplit=3) == [
        "a-longer-name",
        "no",
        "failed",
        "timeout: slow",
    ]
