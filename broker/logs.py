"""Structured logs: one processor chain for structlog and stdlib, with redaction.

:func:`configure` sends structlog events and every stdlib logger (aiohttp's,
asyncio's) through the same processors to one handler, so each line has the
same shape: JSON lines for collectors, the console renderer on a terminal.

Every line passes :func:`broker.redact.redact` before it is rendered.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import TextIO

import structlog
from structlog.typing import EventDict, Processor

from broker.redact import UNLOGGABLE, forget_secret, redact, remember_secret

__all__ = [
    "UNLOGGABLE",
    "configure",
    "forget_secret",
    "redact",
    "remember_secret",
]

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
_FORMATS = ("auto", "json", "console")
_HANDLER_NAME = "token-broker"


class _Handler(logging.StreamHandler[TextIO]):
    """A stream handler whose failure report cannot leak the failed record."""

    def handleError(self, record: logging.LogRecord) -> None:
        # The stock report prints the raw message and its arguments to
        # stderr, which is exactly where a secret would escape redaction.
        stand_in = logging.LogRecord(
            record.name,
            record.levelno,
            record.pathname,
            record.lineno,
            "log.unformattable",
            None,
            None,
        )
        with contextlib.suppress(Exception):
            self.stream.write(self.format(stand_in) + self.terminator)
            self.flush()


def configure(
    level: str = "info", fmt: str = "auto", stream: TextIO | None = None
) -> None:
    """Send structlog and stdlib logging through one chain to ``stream``.

    ``level`` is debug, info, warning or error; ``fmt`` is json, console, or
    auto (console on a terminal, JSON lines otherwise); ``stream`` defaults to
    stdout. Calling it again replaces the previous set-up. Raises
    ``ValueError`` for an unknown level or format.
    """
    if level not in _LEVELS:
        raise ValueError(f"unknown log level {level!r}: use {', '.join(_LEVELS)}")
    if fmt not in _FORMATS:
        raise ValueError(f"unknown log format {fmt!r}: use {', '.join(_FORMATS)}")

    out = sys.stdout if stream is None else stream
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
        structlog.processors.format_exc_info,
    ]
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Cached loggers would keep the old chain after a reconfiguration.
        cache_logger_on_first_use=False,
    )

    handler = _Handler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                redact,
                _lead_fields,
                _renderer(fmt, out),
            ],
        )
    )
    _install(handler, _LEVELS[level])


_LEAD = ("timestamp", "level", "event", "logger")


def _lead_fields(logger: object, method_name: str, event_dict: EventDict) -> EventDict:
    """Put time, level and event first, so a JSON line reads left to right."""
    lead = {key: event_dict.pop(key) for key in _LEAD if key in event_dict}
    return {**lead, **event_dict}


def _renderer(fmt: str, stream: TextIO) -> Processor:
    tty = _isatty(stream)
    if fmt == "json" or (fmt == "auto" and not tty):
        return structlog.processors.JSONRenderer()

    # The traceback arrives as redacted text; a pretty formatter would need
    # the live exception, which redaction never sees.
    return structlog.dev.ConsoleRenderer(
        colors=tty, exception_formatter=structlog.dev.plain_traceback
    )


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


def _install(handler: logging.Handler, threshold: int) -> None:
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
        old.close()

    handler.set_name(_HANDLER_NAME)
    root.addHandler(handler)
    root.setLevel(threshold)

    # aiohttp writes one access line per request at info. Callers poll the
    # token API constantly, so at info those lines would bury the refresh
    # events and cost a rendered line on the serving path; request counts
    # are in the metrics. They appear only when debugging.
    access = logging.getLogger("aiohttp.access")
    if threshold <= logging.DEBUG:
        access.setLevel(logging.NOTSET)
    else:
        access.setLevel(max(threshold, logging.WARNING))
