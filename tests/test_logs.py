"""Tests for broker.logs: one structlog chain, and redaction on every line."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime as dt
from datetime import timedelta
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from structlog.typing import EventDict

from broker import logs, redact
from broker.secret import MASK, Secret

JWT = (
    "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9"
    ".eyJzdWIiOiJtMm0tY2xpZW50LTEyMyJ9"
    ".c2lnbmF0dXJlLWJ5dGVzLWhlcmU"
)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@contextmanager
def _only_our_handler() -> Iterator[None]:
    # pytest's capture handlers format the raw record too, and fail the test
    # on purpose when that raises; production has only our handler.
    root = logging.getLogger()
    others = [h for h in root.handlers if h.get_name() != logs._HANDLER_NAME]
    for handler in others:
        root.removeHandler(handler)
    try:
        yield
    finally:
        for handler in others:
            root.addHandler(handler)


class _BrokenTerminal(io.StringIO):
    def isatty(self) -> bool:
        raise OSError("no tty check here")


class _Unprintable:
    def __repr__(self) -> str:
        raise RuntimeError("no repr for you")


@pytest.fixture(autouse=True)
def isolated_logging() -> Iterator[None]:
    """Give each test a fresh structlog and logging state."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    access = logging.getLogger("aiohttp.access")
    access_level = access.level

    yield

    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    access.setLevel(access_level)


@pytest.fixture
def remember() -> Iterator[Callable[[str], None]]:
    """Remember secrets for one test and forget them afterwards."""
    values: list[str] = []

    def add(value: str) -> None:
        values.append(value)
        logs.remember_secret(value)

    yield add

    for value in values:
        logs.forget_secret(value)


def _capture(level: str = "info", fmt: str = "json") -> io.StringIO:
    out = io.StringIO()
    logs.configure(level, fmt, out)
    return out


def _lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def _redact(**fields: object) -> EventDict:
    return logs.redact(None, "info", {"event": "test.event", **fields})


def test_json_lines_carry_event_level_timestamp_logger() -> None:
    """A structlog event becomes one JSON line with the standard keys."""
    out = _capture()

    structlog.get_logger("broker.refresh").info(
        "token.refreshed", client="chat", expires_in=3600
    )

    [line] = _lines(out)
    assert line["event"] == "token.refreshed"
    assert line["level"] == "info"
    assert line["logger"] == "broker.refresh"
    assert line["client"] == "chat"
    assert line["expires_in"] == 3600
    stamp = dt.fromisoformat(line["timestamp"])
    assert stamp.utcoffset() == timedelta(0)


def test_auto_format_is_json_off_a_terminal() -> None:
    """fmt=auto writes JSON lines to a stream that is not a terminal."""
    out = _capture(fmt="auto")

    structlog.get_logger("t").info("broker.started")

    assert _lines(out)[0]["event"] == "broker.started"


def test_auto_format_is_console_on_a_terminal() -> None:
    """fmt=auto uses the coloured console renderer on a terminal."""
    out = _Terminal()
    logs.configure(fmt="auto", stream=out)

    structlog.get_logger("t").info("broker.started", client="chat")

    text = out.getvalue()
    assert "broker.started" in text
    assert "\x1b[" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_console_format_is_plain_key_value_text() -> None:
    """fmt=console renders level, event and key=value fields without colour."""
    out = _capture(fmt="console")

    structlog.get_logger("broker.refresh").info("token.refreshed", client="chat")

    text = out.getvalue()
    assert "[info" in text
    assert "token.refreshed" in text
    assert "client=chat" in text
    assert "[broker.refresh]" in text
    assert "\x1b[" not in text


def test_auto_format_treats_a_failing_isatty_as_no_terminal() -> None:
    """A stream whose isatty() raises gets JSON lines."""
    out = _BrokenTerminal()
    logs.configure(fmt="auto", stream=out)

    structlog.get_logger("t").info("broker.started")

    assert json.loads(out.getvalue())["event"] == "broker.started"


def test_stdout_is_the_default_stream(capsys: pytest.CaptureFixture[str]) -> None:
    """Without a stream, lines go to stdout."""
    logs.configure(fmt="json")

    structlog.get_logger("t").info("broker.started")

    assert json.loads(capsys.readouterr().out)["event"] == "broker.started"


@pytest.mark.parametrize(
    ("level", "fmt", "match"),
    [("verbose", "json", "unknown log level 'verbose'"), ("info", "xml", "format")],
)
def test_bad_level_or_format_is_refused(level: str, fmt: str, match: str) -> None:
    """An unknown level or format raises ValueError naming it."""
    with pytest.raises(ValueError, match=match):
        logs.configure(level, fmt, io.StringIO())


def test_level_filters_structlog_and_stdlib() -> None:
    """Events below the level are dropped, from structlog and stdlib alike."""
    out = _capture(level="warning")
    log = structlog.get_logger("t")
    std = logging.getLogger("asyncio")

    log.info("dropped.info")
    std.info("dropped too")
    log.warning("kept.warning")
    std.error("kept too")

    assert [line["event"] for line in _lines(out)] == ["kept.warning", "kept too"]


def test_debug_level_lets_debug_through() -> None:
    """At debug, debug events are written."""
    out = _capture(level="debug")

    structlog.get_logger("t").debug("schedule.computed", delay=12.5)

    [line] = _lines(out)
    assert (line["event"], line["level"]) == ("schedule.computed", "debug")


def test_reconfiguring_replaces_the_handler() -> None:
    """A second configure writes only to the new stream, once per event."""
    first = _capture()
    second = _capture()

    structlog.get_logger("t").info("broker.started")
    logging.getLogger("aiohttp.server").warning("stdlib line")

    assert first.getvalue() == ""
    assert [line["event"] for line in _lines(second)] == [
        "broker.started",
        "stdlib line",
    ]


def test_stdlib_logger_goes_through_the_same_chain() -> None:
    """A stdlib record gets the same keys and format as a structlog event."""
    out = _capture()

    logging.getLogger("aiohttp.server").warning("peer %s went away", "127.0.0.1")

    [line] = _lines(out)
    assert line["event"] == "peer 127.0.0.1 went away"
    assert line["level"] == "warning"
    assert line["logger"] == "aiohttp.server"
    assert dt.fromisoformat(line["timestamp"]).utcoffset() == timedelta(0)


def test_stdlib_exception_is_formatted_and_scrubbed(
    remember: Callable[[str], None],
) -> None:
    """A stdlib traceback is rendered as text with remembered secrets masked."""
    remember("opaque-token-4711")
    out = _capture()

    try:
        raise RuntimeError("issuer echoed opaque-token-4711")
    except RuntimeError:
        logging.getLogger("aiohttp.server").exception(
            "Error handling request for %s", "opaque-token-4711"
        )

    assert "opaque-token-4711" not in out.getvalue()
    [line] = _lines(out)
    assert line["event"] == f"Error handling request for {MASK}"
    assert line["level"] == "error"
    assert line["exception"].startswith("Traceback (most recent call last):")
    assert f"RuntimeError: issuer echoed {MASK}" in line["exception"]


def test_structlog_exception_is_scrubbed_in_console_format(
    remember: Callable[[str], None],
) -> None:
    """structlog's exception() shows the traceback, scrubbed, on the console."""
    remember("opaque-token-4711")
    out = _capture(fmt="console")

    try:
        raise ValueError("bad answer opaque-token-4711")
    except ValueError:
        structlog.get_logger("broker.refresh").exception("token.refresh_crashed")

    text = out.getvalue()
    assert "opaque-token-4711" not in text
    assert "Traceback (most recent call last):" in text
    assert f"ValueError: bad answer {MASK}" in text


def test_contextvars_reach_structlog_and_stdlib_lines() -> None:
    """Values bound with structlog.contextvars appear on every line."""
    out = _capture()
    structlog.contextvars.bind_contextvars(request_id="r-17", client="chat")

    structlog.get_logger("t").info("token.served")
    logging.getLogger("aiohttp.access").warning("slow request")

    for line in _lines(out):
        assert (line["request_id"], line["client"]) == ("r-17", "chat")
    assert len(_lines(out)) == 2


async def _one_request(level: str) -> io.StringIO:
    out = _capture(level=level)

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/v1/tokens/chat", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/v1/tokens/chat") as response,
        ):
            assert await response.text() == "ok"
    finally:
        # Cleanup waits for the handler, so its access line is written by then.
        await runner.cleanup()

    return out


async def test_access_log_is_silent_at_info() -> None:
    """aiohttp writes no per-request access line at info."""
    out = await _one_request("info")

    loggers = [line["logger"] for line in _lines(out)]
    assert "aiohttp.access" not in loggers


async def test_access_log_appears_at_debug() -> None:
    """At debug, aiohttp's access line comes out through the same chain."""
    out = await _one_request("debug")

    access = [line for line in _lines(out) if line["logger"] == "aiohttp.access"]
    assert len(access) == 1
    assert "GET /v1/tokens/chat" in access[0]["event"]
    assert access[0]["level"] == "info"


@pytest.mark.parametrize(
    "key",
    [
        "secret",
        "client_secret",
        "password",
        "token",
        "access_token",
        "authorization",
        "cookie",
        "assertion",
        "key",
        "Authorization",
        "ACCESS_TOKEN",
        "refresh_token",
        "client_assertion",
        "x-api-key",
        "Proxy-Authorization",
        "Set-Cookie",
    ],
)
def test_fields_named_like_secrets_are_masked(key: str) -> None:
    """A field whose name says secret has its value masked, whatever it is."""
    assert _redact(**{key: "plain-value"})[key] == MASK


@pytest.mark.parametrize(
    "key", ["token_type", "token_url", "client", "expires_in", "keys_loaded"]
)
def test_ordinary_fields_are_kept(key: str) -> None:
    """Fields that merely mention tokens keep their values."""
    assert _redact(**{key: "plain-value"})[key] == "plain-value"


def test_absent_secret_stays_none() -> None:
    """A secret-named field holding None shows None, which leaks nothing."""
    assert _redact(token=None)["token"] is None


def test_headers_in_nested_structures_are_masked() -> None:
    """Secret-named keys are masked at any depth of dicts, lists and tuples."""
    fields = _redact(
        request={
            "headers": {"Authorization": "opaque", "Accept": "application/json"},
            "attempts": [({"cookie": "sid=1"}, "kept")],
        }
    )

    assert fields["request"] == {
        "headers": {"Authorization": MASK, "Accept": "application/json"},
        "attempts": [({"cookie": MASK}, "kept")],
    }


def test_remembered_value_is_scrubbed_everywhere(
    remember: Callable[[str], None],
) -> None:
    """A remembered value is masked inside the event and nested strings."""
    remember("s3cr3t-rotated")

    fields = logs.redact(
        None,
        "info",
        {
            "event": "issuer said s3cr3t-rotated",
            "detail": ["x", ("body: s3cr3t-rotated!",), {"s3cr3t-rotated": 1}],
        },
    )

    assert fields == {
        "event": f"issuer said {MASK}",
        "detail": ["x", (f"body: {MASK}!",), {MASK: 1}],
    }


def test_short_remembered_values_are_ignored(
    remember: Callable[[str], None],
) -> None:
    """Values under six characters are not scrubbed, to keep lines readable."""
    remember("abc12")

    assert _redact(note="id abc12 found")["note"] == "id abc12 found"


def test_forgotten_value_is_no_longer_scrubbed() -> None:
    """After forget_secret, the value is logged as is."""
    logs.remember_secret("retired-opaque-1")
    assert _redact(note="retired-opaque-1")["note"] == MASK

    logs.forget_secret("retired-opaque-1")

    assert _redact(note="retired-opaque-1")["note"] == "retired-opaque-1"


def test_longer_secret_is_masked_whole(remember: Callable[[str], None]) -> None:
    """A remembered value inside a longer one does not unmask the rest."""
    remember("abcdef123")
    remember("abcdef123456789")

    assert _redact(note="x abcdef123456789 y")["note"] == f"x {MASK} y"


def test_remembered_set_drops_the_oldest_past_its_cap(
    remember: Callable[[str], None],
) -> None:
    """Past the cap, the oldest remembered value is forgotten first."""
    values = [f"opaque-{n:06d}" for n in range(redact._MAX_SECRETS + 1)]

    for value in values:
        remember(value)

    assert _redact(note=values[0])["note"] == values[0]
    assert _redact(note=values[1])["note"] == MASK
    assert _redact(note=values[-1])["note"] == MASK


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Authorization: Bearer abc.DEF-123_~+/x==", f"Authorization: Bearer {MASK}"),
        ("sent bearer opaque42 upstream", f"sent bearer {MASK} upstream"),
        ("Basic bTJtLWNsaWVudDpzM2NyM3Q=", f"Basic {MASK}"),
        (f"got {JWT} back", f"got {MASK} back"),
        (f"url?assertion={JWT}.", f"url?assertion={MASK}"),
        (
            "grant_type=x&client_secret=p4ss&scope=a",
            f"grant_type=x&client_secret={MASK}&scope=a",
        ),
        (
            '{"access_token": "opaque", "expires_in": 1}',
            f'{{"access_token": "{MASK}", "expires_in": 1}}',
        ),
    ],
)
def test_credential_shapes_are_masked_in_text(text: str, expected: str) -> None:
    """Bearer and Basic credentials, JWTs and form/JSON secrets are masked."""
    assert _redact(note=text)["note"] == expected


def test_text_without_credentials_is_returned_untouched() -> None:
    """A field with nothing to mask keeps its very string object."""
    note = "token.refreshed for client chat with scope chat:invoke, basically fine"

    assert _redact(note=note)["note"] is note


def test_secret_object_renders_masked() -> None:
    """A Secret logged as a field renders as its masked repr."""
    out = _capture()

    structlog.get_logger("t").info("client.loaded", value=Secret("hunter2-long"))

    assert "hunter2-long" not in out.getvalue()
    assert _lines(out)[0]["value"] == f"Secret({MASK})"


def test_broken_value_becomes_unloggable() -> None:
    """A value whose repr raises is replaced; the rest of the line survives."""
    out = _capture()

    with _only_our_handler():
        structlog.get_logger("t").info("odd.value", bad=_Unprintable(), client="chat")

    [line] = _lines(out)
    assert (line["bad"], line["client"]) == (logs.UNLOGGABLE, "chat")


def test_cycles_and_odd_containers_still_render() -> None:
    """Cycles are cut, sets become lists and odd keys become text."""
    loop: list[object] = []
    loop.append(loop)
    out = _capture()

    structlog.get_logger("t").info(
        "odd.shapes", loop=loop, scopes={"a"}, by_pair={("a", "b"): 1}, by_id={7: "a"}
    )

    [line] = _lines(out)
    assert logs.UNLOGGABLE in json.dumps(line["loop"])
    assert line["scopes"] == ["a"]
    assert line["by_pair"] == {"('a', 'b')": 1}
    assert line["by_id"] == {"7": "a"}


def test_unformattable_stdlib_record_leaks_nothing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A record whose arguments do not fit is replaced, not dumped to stderr."""
    out = _capture()

    with _only_our_handler():
        logging.getLogger("aiohttp.client").info("token %d", JWT)

    assert JWT not in capsys.readouterr().err
    [line] = _lines(out)
    assert (line["event"], line["logger"]) == ("log.unformattable", "aiohttp.client")
