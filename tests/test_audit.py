"""Tests for broker.audit: tallies per caller, bounded, written per interval."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs

from broker import audit as audit_module
from broker.audit import MAX_PIDS, Audit, Who
from broker.token import rfc3339
from tests import process
from tests.fakes import FakeClock, settle

SOCKET_USER = Who("uid:1000", 1000)
TCP = Who("tcp")
KEYED = Who("key:app", None, "app")


Events = Sequence[Mapping[str, Any]]


def served(logs: Events) -> list[Mapping[str, Any]]:
    """The audit.tokens_served events among ``logs``."""
    return [e for e in logs if e["event"] == "audit.tokens_served"]


def by_combination(logs: Events) -> dict[tuple[str, ...], Mapping[str, Any]]:
    """The audit events keyed by (caller, client, listener, result)."""
    return {
        (e["caller"], e["client"], e["listener"], e["result"]): e for e in served(logs)
    }


def test_one_event_per_caller_client_listener_and_result() -> None:
    """Hand-outs are counted per (who, client, listener, result), one event each,
    with the first and last time and the caller's identity."""
    clock = FakeClock()
    audit = Audit(60.0, clock.wall)
    first = clock.wall()
    for _ in range(3):
        audit.record(SOCKET_USER, "chat", "unix", "ok", 41)
    clock.suspend(5.0)
    audit.record(SOCKET_USER, "chat", "unix", "ok", 41)
    audit.record(SOCKET_USER, "chat", "unix", "unavailable", 41)
    audit.record(SOCKET_USER, "models", "unix", "ok", 41)
    audit.record(TCP, "chat", "tcp", "ok", None)
    audit.record(KEYED, "chat", "tcp", "ok", None)
    audit.record(KEYED, "chat", "unix", "ok", 42)

    with capture_logs() as logs:
        written = audit.flush()

    events = by_combination(logs)
    assert written == len(logs) == len(events) == 6
    ok = events["uid:1000", "chat", "unix", "ok"]
    assert ok["count"] == 4
    assert (ok["uid"], ok["key_name"], ok["pids"]) == (1000, None, [41])
    assert ok["first_at"] == rfc3339(first)
    assert ok["last_at"] == rfc3339(first + 5.0)
    assert ok["log_level"] == "info"
    assert events["uid:1000", "chat", "unix", "unavailable"]["count"] == 1
    assert events["uid:1000", "models", "unix", "ok"]["count"] == 1
    tcp = events["tcp", "chat", "tcp", "ok"]
    assert (tcp["count"], tcp["uid"], tcp["pids"]) == (1, None, [])
    assert events["key:app", "chat", "tcp", "ok"]["key_name"] == "app"
    assert events["key:app", "chat", "unix", "ok"]["pids"] == [42]


def test_pids_are_capped() -> None:
    """At most MAX_PIDS distinct pids are kept per tally; every request counts."""
    audit = Audit(60.0, FakeClock().wall)
    for pid in range(100, 100 + 3 * MAX_PIDS):
        audit.record(SOCKET_USER, "chat", "unix", "ok", pid)
        audit.record(SOCKET_USER, "chat", "unix", "ok", pid)

    with capture_logs() as logs:
        audit.flush()

    [event] = served(logs)
    assert event["count"] == 6 * MAX_PIDS
    assert event["pids"] == list(range(100, 100 + MAX_PIDS))


def test_overflow_is_counted_and_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past MAX_ENTRIES combinations new ones are only counted, then reported
    once as ``audit.overflow``; combinations already kept still count."""
    monkeypatch.setattr(audit_module, "MAX_ENTRIES", 2)
    audit = Audit(60.0, FakeClock().wall)
    audit.record(SOCKET_USER, "chat", "unix", "ok", 1)
    audit.record(TCP, "chat", "tcp", "ok", None)
    audit.record(KEYED, "chat", "tcp", "ok", None)
    audit.record(KEYED, "chat", "tcp", "refused", None)
    audit.record(KEYED, "chat", "tcp", "ok", None)
    audit.record(SOCKET_USER, "chat", "unix", "ok", 1)

    with capture_logs() as logs:
        written = audit.flush()
        again = audit.flush()

    assert (written, again) == (2, 0)
    assert by_combination(logs)["uid:1000", "chat", "unix", "ok"]["count"] == 2
    assert "key:app" not in {e["caller"] for e in served(logs)}
    [overflow] = [e for e in logs if e["event"] == "audit.overflow"]
    assert (overflow["dropped"], overflow["limit"]) == (3, 2)
    assert overflow["log_level"] == "warning"


def test_flush_empties_the_tallies() -> None:
    """After a flush the next one writes nothing, until new hand-outs come."""
    audit = Audit(60.0, FakeClock().wall)
    audit.record(TCP, "chat", "tcp", "ok", None)

    with capture_logs() as logs:
        assert audit.flush() == 1
        assert audit.flush() == 0
        audit.record(TCP, "chat", "tcp", "ok", None)
        assert audit.flush() == 1

    assert [e["count"] for e in served(logs)] == [1, 1]


async def test_run_flushes_every_interval() -> None:
    """While running, the tallies are written out once per interval."""
    audit = Audit(0.01, FakeClock().wall)
    flushed = asyncio.Event()
    flush = audit.flush

    def flush_and_tell() -> int:
        written = flush()
        if written:
            flushed.set()
        return written

    audit.flush = flush_and_tell  # type: ignore[method-assign]
    audit.record(TCP, "chat", "tcp", "ok", None)

    with capture_logs() as logs:
        runner = asyncio.create_task(audit.run())
        async with asyncio.timeout(5):
            await flushed.wait()
        assert not runner.done()
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)

    assert [e["count"] for e in served(logs)] == [1]


async def test_run_flushes_what_is_left_when_cancelled() -> None:
    """Cancelling run() (the broker stopping) writes the tallies not yet out."""
    audit = Audit(3600.0, FakeClock().wall)
    audit.record(SOCKET_USER, "chat", "unix", "ok", 7)
    audit.record(SOCKET_USER, "chat", "unix", "ok", 7)

    with capture_logs() as logs:
        runner = asyncio.create_task(audit.run())
        await settle()
        assert served(logs) == []
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner

    [event] = served(logs)
    assert (event["count"], event["pids"]) == (2, [7])


SECRET = "audit-secret-Wd83kQ"
CALLER_KEY = "caller-key-Pz61tRv0aQ"


def write_config(workdir: Path, issuer_port: int, level: str) -> Path:
    """A broker with the audit on, a long interval, and three clients."""
    (workdir / "secret").write_text(SECRET + "\n")
    (workdir / "app.key").write_text(CALLER_KEY + "\n")
    client = "environment: dev, client_id: audit, client_secret: {file: secret}"
    config = workdir / "broker.yaml"
    config.write_text(
        f"""
listen: {{http: 127.0.0.1:0, unix: {workdir}/b.sock, metrics: null}}
audit: true
audit_interval: 1h
watch_config: null
environments:
  dev: {{token_url: "http://127.0.0.1:{issuer_port}/oauth2/token"}}
clients:
  chat: {{{client}}}
  keyed: {{{client}, callers: {{keys: [{{name: app, file: app.key}}]}}}}
  theirs: {{{client}, callers: {{uids: [{os.getuid() + 1}]}}}}
log: {{level: {level}, format: json}}
dev_issuer:
  listen: 127.0.0.1:{issuer_port}
  clients:
    audit: {{secret: {SECRET}}}
"""
    )
    return config


async def take(
    session: aiohttp.ClientSession, url: str, **headers: str
) -> tuple[int, str | None]:
    """GET a token: the status, and the token when one came back."""
    async with session.get(url, headers=headers) as answer:
        body = await answer.json()
        return answer.status, body.get("access_token")


async def test_the_final_flush_writes_the_audit_at_warning_level(
    workdir: Path,
) -> None:
    """At SIGTERM the tallies are written as audit.tokens_served, with the
    right counts, uid and pids, even under log level warning; no token,
    secret or caller key appears anywhere in the output."""
    issuer_port = process.free_port()
    config = write_config(workdir, issuer_port, "info")
    broker = await process.start(config)
    # Quietened by a reload: with level warning from the start, the broker
    # would never print the broker.started line that says it is up.
    config.write_text(config.read_text().replace("level: info", "level: warning"))
    broker.process.send_signal(signal.SIGHUP)
    await broker.wait_for_event("config.reloaded")
    quiet_from = len(broker.events)
    http = f"http://{broker.started()['http']}"

    unix = aiohttp.UnixConnector(path=str(workdir / "b.sock"))
    async with aiohttp.ClientSession(connector=unix) as session:
        answers = [await take(session, "http://b/v1/tokens/chat") for _ in range(3)]
        answers.append(await take(session, "http://b/v1/tokens/theirs"))
    async with aiohttp.ClientSession() as session:
        guard = {"Token-Broker": "1"}
        for _ in range(2):
            answers.append(await take(session, f"{http}/v1/tokens/chat", **guard))
        bearer = f"Bearer {CALLER_KEY}"
        answers.append(
            await take(
                session, f"{http}/v1/tokens/keyed", **guard, Authorization=bearer
            )
        )
    assert await broker.stop() == 0

    assert [status for status, _ in answers] == [200] * 3 + [403] + [200] * 3
    events = by_combination(broker.events)
    uid = os.getuid()
    assert len(served(broker.events)) == len(events) == 4
    socket_ok = events[f"uid:{uid}", "chat", "unix", "ok"]
    assert (socket_ok["count"], socket_ok["uid"]) == (3, uid)
    assert socket_ok["pids"] == [os.getpid()]
    refused = events[f"uid:{uid}", "theirs", "unix", "refused"]
    assert (refused["count"], refused["pids"]) == (1, [os.getpid()])
    tcp = events["tcp", "chat", "tcp", "ok"]
    assert (tcp["count"], tcp["uid"], tcp["pids"]) == (2, None, [])
    keyed = events["key:app", "keyed", "tcp", "ok"]
    assert (keyed["count"], keyed["uid"], keyed["pids"]) == (1, None, [])
    # The name, as written by the real log chain (which masks secret fields).
    assert keyed["key_name"] == "app"
    # Nothing below warning but the audit got through after the reload.
    quiet = broker.events[quiet_from:]
    assert {e["event"] for e in quiet if e["level"] == "info"} == {
        "audit.tokens_served"
    }
    assert "broker.stopped" not in {e["event"] for e in quiet}
    everything = broker.output()
    tokens = {token for _, token in answers if token}
    assert len(tokens) == 2
    for needle in (*tokens, SECRET, CALLER_KEY):
        assert needle not in everything


async def test_a_hand_out_finished_during_the_drain_is_audited(
    workdir: Path, held_issuer: tuple[TestServer, asyncio.Event]
) -> None:
    """A request still in flight at SIGTERM and answered during the drain is
    in the final audit flush."""
    server, release = held_issuer
    config = workdir / "held.yaml"
    config.write_text(
        f"""
listen: {{http: null, unix: {workdir}/h.sock, metrics: null, drain_timeout: 30s}}
audit: true
audit_interval: 1h
environments:
  slow: {{token_url: "http://127.0.0.1:{server.port}/token"}}
clients:
  slow: {{environment: slow, client_id: s, client_secret: x-secret-value}}
"""
    )
    broker = await process.start(config, "--log-level", "debug")
    unix = aiohttp.UnixConnector(path=str(workdir / "h.sock"))
    async with aiohttp.ClientSession(connector=unix) as session:
        caller = asyncio.create_task(take(session, "http://b/v1/tokens/slow"))
        await broker.wait_for_event("token.waiting")
        broker.process.terminate()
        await broker.wait_for_event("broker.stopping")
        release.set()
        status, _ = await caller
    assert await broker.stop(signum=None) == 0

    assert status == 200
    [event] = served(broker.events)
    assert (event["client"], event["result"], event["count"]) == ("slow", "ok", 1)
