"""The configuration schema: every key, its type, its default and its checks.

Models are frozen and validated in one place. Reading the file, interpolating
``${VAR}`` and turning validation failures into :class:`ConfigError` happen in
:mod:`broker.loader`; this module has no I/O except proving that referenced
secret and CA files are readable.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import ssl
import sys
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    FiniteFloat,
    ValidationInfo,
    field_validator,
    model_validator,
)

from broker.secret import SecretSource, source_from_spec

# sun_path holds 108 bytes on Linux and 104 on the BSDs, the NUL included.
SUN_PATH_MAX = 107 if sys.platform.startswith("linux") else 103

_DURATION_FORM = "write 30s, 5m, 1h, 1h30m, 250ms or a number of seconds"
_PLAIN_SECONDS = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)")
# Units must come largest first, each at most once: "1h30m", never "30m1h".
_UNIT_ORDER = ("d", "h", "m", "s", "ms")
_UNIT_SECONDS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_PORT = re.compile(r"[0-9]{1,5}")
_OCTAL_MODE = re.compile(r"(?:0o|0)?([0-7]{3})")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# RFC 6749 section 3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
_RESERVED_PARAMS = frozenset(
    {
        "grant_type",
        "client_id",
        "client_secret",
        "client_assertion",
        "client_assertion_type",
        "scope",
        "audience",
        "resource",
    }
)


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

    if not math.isfinite(seconds):
        raise ValueError("the duration is too large")
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


class _Model(BaseModel):
    # Inputs stay out of pydantic's own messages: a bad value may be a secret.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


class HostPort(_Model):
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


def _require_loopback(address: HostPort | None, what: str) -> HostPort | None:
    if address is not None and not is_loopback_host(address.host):
        raise ValueError(
            f"{what} must listen on a loopback address (127.0.0.1, ::1, "
            f"localhost), not {address}"
        )
    return address


class Listen(_Model):
    """Where the token API and the metrics endpoints listen."""

    http: HostPort | None = HostPort(host="127.0.0.1", port=8181)
    unix: str | None = "/tmp/token-broker.sock"  # noqa: S108 - a documented default
    unix_mode: int = 0o660
    metrics: HostPort | None = HostPort(host="127.0.0.1", port=9464)
    drain_timeout: Duration = 5.0

    @field_validator("http")
    @classmethod
    def _http_on_loopback(cls, value: HostPort | None) -> HostPort | None:
        return _require_loopback(value, "the token API")

    @model_validator(mode="after")
    def _serves_somewhere(self) -> Listen:
        if self.http is None and self.unix is None:
            raise ValueError("the token API needs http, unix or both; both are null")
        return self

    @field_validator("unix")
    @classmethod
    def _socket_path(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        if not value:
            raise ValueError("the socket path is empty; use null to turn it off")
        if "\0" in value:
            raise ValueError("the socket path contains a NUL character")
        value = _resolve(value, info)
        directory = os.path.dirname(value)
        if not os.path.isdir(directory):
            raise ValueError(f"the socket's directory {directory} does not exist")
        size = len(os.fsencode(value))
        if size > SUN_PATH_MAX:
            raise ValueError(
                f"the socket path is {size} bytes long; this OS allows at most "
                f"{SUN_PATH_MAX}"
            )
        return value

    @field_validator("unix_mode", mode="before")
    @classmethod
    def _mode(cls, value: object) -> int:
        mode = -1
        if isinstance(value, str) and (match := _OCTAL_MODE.fullmatch(value)):
            mode = int(match.group(1), 8)
        elif isinstance(value, int) and not isinstance(value, bool):
            mode = value  # YAML 1.1 already read 0660 as octal
        if not 0 <= mode <= 0o777:
            raise ValueError('expected an octal mode in quotes, such as "0660"')
        if mode & 0o007:
            raise ValueError(
                f"mode {mode:04o} lets every local user take tokens; "
                "use 0660 or tighter"
            )
        return mode


class Backoff(_Model):
    """How long to wait between failed attempts."""

    initial: Duration = 1.0
    max: Duration = 120.0
    permanent: Duration = 600.0

    @model_validator(mode="after")
    def _ordered(self) -> Backoff:
        if self.initial <= 0:
            raise ValueError("initial must be more than 0")
        if self.max < self.initial:
            raise ValueError("max must be at least initial")
        if self.permanent < self.max:
            # Zero here would retry a refused secret in a hot loop.
            raise ValueError("permanent must be at least max")
        return self


class RefreshPolicy(_Model):
    """When to refresh, how long to trust a token, how to retry."""

    at: Number = Field(0.8, gt=0, le=1)
    before: Duration = 300.0
    jitter: Number = Field(0.1, ge=0, le=0.5)
    margin: Duration = 10.0
    default_lifetime: Duration = Field(600.0, gt=0)
    # Callers decide when this one applies: a floor keeps them from driving
    # the issuer in a loop.
    min_interval: Duration = Field(5.0, ge=1)
    timeout: Duration = Field(10.0, gt=0)
    backoff: Backoff = Backoff()


class BackoffOverride(_Model):
    """A client's own ``refresh.backoff``; keys left out keep the global value."""

    initial: Duration | None = None
    max: Duration | None = None
    permanent: Duration | None = None


class RefreshOverride(_Model):
    """A client's own ``refresh:``; keys left out keep the global value."""

    at: Number | None = Field(None, gt=0, le=1)
    before: Duration | None = None
    jitter: Number | None = Field(None, ge=0, le=0.5)
    margin: Duration | None = None
    default_lifetime: Duration | None = Field(None, gt=0)
    min_interval: Duration | None = None
    timeout: Duration | None = Field(None, gt=0)
    backoff: BackoffOverride | None = None

    def apply(self, base: RefreshPolicy) -> RefreshPolicy:
        """Return ``base`` with this override's keys laid over it.

        Raises ``pydantic.ValidationError`` when the merged policy is invalid.
        """
        data = base.model_dump()
        for key, value in self.model_dump(exclude_none=True).items():
            if key == "backoff":
                data["backoff"].update(value)
            else:
                data[key] = value

        return RefreshPolicy.model_validate(data)


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


def _resolve(path: str, info: ValidationInfo) -> str:
    """Resolve a relative path against the config file's directory."""
    base = (info.context or {}).get("base_dir", ".")
    return str(Path(base, os.path.expanduser(path)))


class Environment(_Model):
    """One issuer: staging, production, or the embedded dev issuer."""

    token_url: str
    ca_file: str | None = None

    @field_validator("token_url")
    @classmethod
    def _url(cls, value: str) -> str:
        return check_token_url(value)

    @field_validator("ca_file")
    @classmethod
    def _ca_readable(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        path = _resolve(value, info)
        if not os.path.isfile(path) or not os.access(path, os.R_OK):
            raise ValueError(f"cannot read the CA bundle {path}")
        try:
            ssl.create_default_context().load_verify_locations(cafile=path)
        except (ssl.SSLError, ValueError, OSError):
            raise ValueError(
                f"{path} holds no usable PEM certificate for a CA bundle"
            ) from None
        return path


AuthMethod = Literal["client_secret_basic", "client_secret_post", "private_key_jwt"]


class Client(_Model):
    """One client-credentials client, served under its name."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    environment: str
    client_id: str = Field(min_length=1)
    client_secret: SecretSource | None = None
    scopes: tuple[str, ...] = ()
    auth: AuthMethod = "client_secret_basic"
    encoding: Literal["form", "json"] = "form"
    audience: str | None = None
    resource: str | tuple[str, ...] | None = None
    params: dict[str, str] = {}
    required: Bool = True
    refresh: RefreshOverride | None = None

    @field_validator("client_secret", mode="before")
    @classmethod
    def _secret(cls, value: object, info: ValidationInfo) -> SecretSource | None:
        if value is None or isinstance(value, SecretSource):
            return value
        context = info.context or {}
        return source_from_spec(
            value, context.get("environ", {}), context.get("base_dir", ".")
        )

    @field_validator("scopes", mode="before")
    @classmethod
    def _scope_list(cls, value: object) -> object:
        if isinstance(value, str):
            raise ValueError(
                "expected a list of scopes, such as [chat:invoke, chat:read]"
            )
        return value

    @field_validator("scopes")
    @classmethod
    def _scopes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for scope in value:
            if not _SCOPE_TOKEN.fullmatch(scope):
                raise ValueError(
                    f"{scope!r} is not a scope token (RFC 6749 3.3: printable "
                    "ASCII without spaces, double quotes or backslashes)"
                )
        if len(set(value)) != len(value):
            raise ValueError("a scope is listed twice")
        return value

    @field_validator("resource", mode="before")
    @classmethod
    def _resource(cls, value: object) -> object:
        if value is None or (isinstance(value, str) and value):
            return value
        if isinstance(value, list | tuple) and value:
            items = tuple(value)
            if all(isinstance(item, str) and item for item in items):
                return items
        raise ValueError("expected a URI or a list of URIs")

    @field_validator("params")
    @classmethod
    def _params(cls, value: dict[str, str]) -> dict[str, str]:
        clash = sorted(_RESERVED_PARAMS.intersection(value))
        if clash:
            raise ValueError(
                f"{clash[0]} is set by token-broker itself; use the client's "
                "own key for it"
            )
        return value

    @model_validator(mode="after")
    def _auth_needs(self) -> Client:
        if self.auth == "private_key_jwt":
            raise ValueError("auth private_key_jwt is not supported by this version")
        if self.client_secret is None:
            raise ValueError(f"auth {self.auth} needs client_secret")
        return self


class Log(_Model):
    """Log level and output format."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class DevClient(_Model):
    """A client the embedded dev issuer knows (literal secrets: a dev tool)."""

    secret: str = Field(min_length=1, repr=False)
    scopes: tuple[str, ...] = ()


class DevIssuer(_Model):
    """The embedded development issuer; loopback only."""

    listen: HostPort = HostPort(host="127.0.0.1", port=8180)
    token_lifetime: Duration = Field(3600.0, gt=0)
    audience: str = "token-broker-dev"
    clients: dict[str, DevClient] = Field(min_length=1)

    @field_validator("listen")
    @classmethod
    def _on_loopback(cls, value: HostPort) -> HostPort | None:
        return _require_loopback(value, "the dev issuer")


class Config(_Model):
    """A whole, validated configuration file."""

    listen: Listen = Listen()
    refresh: RefreshPolicy = RefreshPolicy()
    environments: dict[str, Environment] = Field(min_length=1)
    clients: dict[str, Client] = Field(min_length=1)
    log: Log = Log()
    dev_issuer: DevIssuer | None = None

    @field_validator("clients", "environments")
    @classmethod
    def _names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            if not _NAME.fullmatch(name):
                raise ValueError(
                    f"{name!r} is not a usable name: letters, digits, '.', '_' "
                    "and '-', at most 64, starting with a letter or digit"
                )
        return value

    def policy(self, client: str) -> RefreshPolicy:
        """Return the refresh policy in force for one client."""
        override = self.clients[client].refresh
        return override.apply(self.refresh) if override else self.refresh
