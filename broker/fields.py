"""Value types of the config file: durations, numbers, addresses, URLs.

Each turns one YAML scalar into a checked Python value or raises
``ValueError`` with a message written for the person editing the file.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import sys
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    FiniteFloat,
    ValidationInfo,
    model_validator,
)

# sun_path holds 108 bytes on Linux and 104 on the BSDs, the NUL included.
SUN_PATH_MAX = 107 if sys.platform.startswith("linux") else 103

MAX_DURATION = 366 * 86400.0
_DURATION_FORM = "write 30s, 5m, 1h, 1h30m, 250ms or a number of seconds"
_PLAIN_SECONDS = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)")
# Units must come largest first, each at most once: "1h30m", never "30m1h".
_UNIT_ORDER = ("d", "h", "m", "s", "ms")
_UNIT_SECONDS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_PORT = re.compile(r"[0-9]{1,5}")
_OCTAL_MODE = re.compile(r"(?:0o|0)?([0-7]{3})")
# RFC 6749 section 3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")


def parse_duration(value: object) -> float:
    """Read ``30s``, ``5m``, ``1h``, ``1h30m``, ``250ms``, ``2d`` or plain seconds.

    Returns seconds. Raises ``ValueError`` for anything else, including
    booleans, negative, infinite and NaN values.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected a duration: {_DURATION_FORM}")

    try:
        if isinstance(value, str):
            seconds = _parse_duration_text(value.strip())
        else:
            seconds = float(value)
    except OverflowError:
        raise ValueError("the duration is too large") from None

    if not math.isfinite(seconds) or seconds > MAX_DURATION:
        # No setting here sensibly exceeds a year, and timers of 1e308 s
        # overflow the event loop's arithmetic.
        raise ValueError("the duration is too large (at most 366d)")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")

    return seconds


def _parse_duration_text(text: str) -> float:
    if _PLAIN_SECONDS.fullmatch(text):
        return float(text)

    pos, total, last_unit = 0, 0.0, -1
    for match in _DURATION_PART.finditer(text):
        unit = _UNIT_ORDER.index(match.group(2))
        if match.start() != pos or unit <= last_unit:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos, last_unit = match.end(), unit
    if not text or pos != len(text):
        raise ValueError(f"{text!r} is not a duration: {_DURATION_FORM}")

    return total


Duration = Annotated[float, BeforeValidator(parse_duration)]


def _plain_number(value: object) -> object:
    # pydantic's lax mode reads true as 1; in a config file that is a mistake.
    if isinstance(value, bool):
        raise ValueError("expected a number, not true or false")
    if isinstance(value, int) and abs(value) > sys.float_info.max:
        raise ValueError("the number is too large")
    return value


Number = Annotated[FiniteFloat, BeforeValidator(_plain_number)]
Port = Annotated[int, BeforeValidator(_plain_number)]


def _plain_bool(value: object) -> bool:
    # Only true and false; the strings come from ${VAR} interpolation. Lax
    # readings of 0, "no" or "off" would turn typos into silent choices.
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError("expected true or false")


Bool = Annotated[bool, BeforeValidator(_plain_bool)]


def is_loopback_host(host: str) -> bool:
    """True for ``localhost``, 127.0.0.0/8 and ``::1`` (brackets allowed)."""
    host = host.removeprefix("[").removesuffix("]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class StrictModel(BaseModel):
    """Base of every config model: frozen, no unknown keys, inputs hidden."""

    # Inputs stay out of pydantic's own messages: a bad value may be a secret.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


class HostPort(StrictModel):
    """A TCP listen address, written ``host:port`` or ``[v6]:port``."""

    host: str = Field(min_length=1)
    port: Port = Field(ge=0, le=65535)

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, value: object) -> object:
        if isinstance(value, dict):
            return value
        if not isinstance(value, str):
            raise ValueError("expected host:port, such as 127.0.0.1:8181")

        host, sep, port = value.strip().rpartition(":")
        bracketed = host.startswith("[") and host.endswith("]")
        if not sep or not host or not _PORT.fullmatch(port) or int(port) > 65535:
            raise ValueError(f"{value!r} is not host:port, such as 127.0.0.1:8181")
        if ":" in host and not bracketed:
            raise ValueError(
                f"{value!r}: write an IPv6 address in brackets, such as [::1]:8181"
            )

        return {"host": host.removeprefix("[").removesuffix("]"), "port": int(port)}

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def require_loopback(address: HostPort | None, what: str) -> HostPort | None:
    if address is not None and not is_loopback_host(address.host):
        raise ValueError(
            f"{what} must listen on a loopback address (127.0.0.1, ::1, "
            f"localhost), not {address}"
        )
    return address


def check_token_url(value: str) -> str:
    """Allow https anywhere and plain http only to a loopback host.

    Raises ``ValueError``. Messages never quote the URL: a mistyped one may
    carry a password.
    """
    try:
        parts = urlsplit(value)
        host = parts.hostname
        _ = parts.port
    except ValueError:
        raise ValueError("not a valid URL") from None

    if "@" in parts.netloc:
        raise ValueError("the URL must not carry credentials (user:password@)")
    if parts.scheme not in ("https", "http") or not host:
        raise ValueError(
            "expected an https URL, such as https://auth.example.com/oauth2/token"
        )
    if parts.fragment:
        raise ValueError("the URL must not have a #fragment")
    if parts.scheme == "http" and not is_loopback_host(host):
        raise ValueError(
            f"plain http to {host} would send the secret in clear; "
            "use https (http is allowed only to a loopback host)"
        )

    return value


def resolve_path(path: str, info: ValidationInfo) -> str:
    """Resolve a relative path against the config file's directory."""
    base = (info.context or {}).get("base_dir", ".")
    return str(Path(base, os.path.expanduser(path)))


def readable_file(value: str, info: ValidationInfo, what: str) -> str:
    """Resolve ``value`` against the config's directory; it must be readable.

    Raises ``ValueError`` naming ``what`` (``the CA bundle``) and the path.
    """
    path = resolve_path(value, info)
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise ValueError(f"cannot read {what} {path}")
    return path


def parse_mode(value: object) -> int:
    """Read an octal file mode such as ``"0660"``; nothing for "other" users.

    A socket or file holding tokens must not be open to every local user;
    share it through a group instead.
    """
    mode = -1
    if isinstance(value, str) and (match := _OCTAL_MODE.fullmatch(value)):
        mode = int(match.group(1), 8)
    elif isinstance(value, int) and not isinstance(value, bool):
        mode = value  # YAML 1.1 already read 0660 as octal
    if not 0 <= mode <= 0o777:
        raise ValueError('expected an octal mode in quotes, such as "0660"')
    if mode & 0o007:
        raise ValueError(
            f"mode {mode:04o} lets every local user take tokens; use 0660 or tighter"
        )
    return mode


FileMode = Annotated[int, BeforeValidator(parse_mode)]
