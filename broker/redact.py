"""Redaction: the second line of defence behind :class:`broker.secret.Secret`.

The :func:`redact` processor masks fields whose name says secret, every value
handed to :func:`remember_secret`, and anything shaped like a credential or a
JWT, wherever it sits in a log event.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping

from structlog.typing import EventDict, WrappedLogger

from broker.secret import MASK

UNLOGGABLE = "[unloggable]"


# Shorter values turn up inside ordinary words and numbers and would mangle
# every line; short credentials in headers are still caught by _CREDENTIAL.
_MIN_SECRET_LEN = 6
_MAX_SECRETS = 4096
# Deeper nesting is almost surely a cycle; cut it instead of recursing forever.
_MAX_DEPTH = 16

_SECRET_NAMES = frozenset(
    {
        "secret",
        "client_secret",
        "password",
        "token",
        "access_token",
        "authorization",
        "cookie",
        "assertion",
        "key",
    }
)
_SECRET_SUFFIXES = (
    "_secret",
    "_password",
    "_token",
    "_key",
    "_authorization",
    "_cookie",
    "_assertion",
)

_CREDENTIAL = re.compile(
    # An HTTP credential (RFC 7235 scheme, RFC 6750 b64token syntax).
    r"\b(?P<scheme>(?i:bearer|basic)\s+)[\w\-.~+/]+=*"
    # A secret in a form body, a query string or JSON text.
    r"|\b(?P<name>(?:client_secret|access_token|refresh_token|id_token"
    r"|client_assertion|password)[\"']?\s*[=:]\s*[\"']?)[^\s&\"',;}]+"
    # A JWS (three segments) or JWE (five); the header is JSON, so base64url "eyJ".
    r"|eyJ[\w-]+(?:\.[\w-]*){2,4}",
    re.ASCII,
)
# Text holding none of these cannot match _CREDENTIAL: skip the regex scan.
_TRIGGERS = ("bearer", "basic", "eyj", "_secret", "_token", "password", "_assertion")


class _Remembered:
    """Live secret values, oldest first, bounded, with a snapshot for lookups."""

    def __init__(self) -> None:
        self._values: dict[str, None] = {}
        self._lock = threading.Lock()
        self._snapshot: tuple[str, ...] | None = ()

    def add(self, value: str) -> None:
        if len(value) < _MIN_SECRET_LEN:
            return

        with self._lock:
            self._values.pop(value, None)
            self._values[value] = None
            while len(self._values) > _MAX_SECRETS:
                del self._values[next(iter(self._values))]
            self._snapshot = None

    def discard(self, value: str) -> None:
        with self._lock:
            if self._values.pop(value, 0) is None:
                self._snapshot = None

    def snapshot(self) -> tuple[str, ...]:
        snapshot = self._snapshot
        if snapshot is None:
            with self._lock:
                # Longest first: masking a value that sits inside a longer one
                # would leave the rest of the longer one in clear.
                snapshot = tuple(sorted(self._values, key=len, reverse=True))
                self._snapshot = snapshot

        return snapshot


_remembered = _Remembered()


def remember_secret(value: str) -> None:
    """Mask ``value`` wherever it appears in a log line, until it is forgotten.

    Values shorter than six characters are ignored. Past 4096 values the
    oldest is dropped, so a caller that forgets nothing cannot grow the set.
    """
    _remembered.add(value)


def forget_secret(value: str) -> None:
    """Stop masking ``value``, typically a token that a newer one replaced."""
    _remembered.discard(value)


def redact(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """Mask secrets in every field of ``event_dict``; never raise.

    Values that are not plain data become their (scrubbed) ``repr``, as the
    renderers would print them; a value that cannot even be looked at becomes
    ``"[unloggable]"``.
    """
    secrets = _remembered.snapshot()

    for key, value in event_dict.items():
        try:
            if _names_secret(key) and value is not None:
                cleaned: object = MASK
            else:
                cleaned = _clean(value, secrets, 0)
        except Exception:
            cleaned = UNLOGGABLE
        event_dict[key] = cleaned

    return event_dict


def _names_secret(key: str) -> bool:
    name = key.lower().replace("-", "_")
    return name in _SECRET_NAMES or name.endswith(_SECRET_SUFFIXES)


def _clean(value: object, secrets: tuple[str, ...], depth: int) -> object:
    if isinstance(value, str):
        return _scrub(value, secrets)
    if value is None or isinstance(value, int | float):
        return value
    if depth >= _MAX_DEPTH:
        return UNLOGGABLE

    if isinstance(value, Mapping):
        cleaned = {}
        for key, item in value.items():
            if isinstance(key, str) and _names_secret(key) and item is not None:
                item = MASK
            cleaned[_clean_key(key, secrets)] = _clean(item, secrets, depth + 1)
        return cleaned
    if isinstance(value, list | tuple | set | frozenset):
        items = [_clean(item, secrets, depth + 1) for item in value]
        return tuple(items) if isinstance(value, tuple) else items

    return _scrub(repr(value), secrets)


def _clean_key(key: object, secrets: tuple[str, ...]) -> object:
    if isinstance(key, str):
        return _scrub(key, secrets)
    if key is None or isinstance(key, int | float):
        return key
    # JSON refuses other key types; their text is what a reader needs anyway.
    return _scrub(repr(key), secrets)


def _scrub(text: str, secrets: tuple[str, ...]) -> str:
    if len(text) < _MIN_SECRET_LEN:
        return text

    for secret in secrets:
        if secret in text:
            text = text.replace(secret, MASK)

    lowered = text.lower()
    if any(trigger in lowered for trigger in _TRIGGERS):
        text = _CREDENTIAL.sub(_mask_match, text)

    return text


def _mask_match(match: re.Match[str]) -> str:
    return (match["scheme"] or match["name"] or "") + MASK
