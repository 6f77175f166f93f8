"""The configuration schema: every key, its type, its default and its checks.

Models are frozen and validated in one place. Reading the file, interpolating
``${VAR}`` and turning validation failures into :class:`ConfigError` happen in
:mod:`broker.loader`; this module has no I/O except proving that referenced
secret and CA files are readable.
"""

from __future__ import annotations

import grp
import os
import re
import ssl
from typing import Any, Literal

from pydantic import (
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from broker.callers import Callers
from broker.devconfig import DevClient, DevIssuer
from broker.fields import (
    SCOPE_TOKEN,
    SUN_PATH_MAX,
    Bool,
    Duration,
    FileMode,
    HostPort,
    Number,
    StrictModel,
    check_token_url,
    is_loopback_host,
    parse_duration,
    readable_file,
    require_loopback,
    resolve_path,
)
from broker.secret import (
    PemFile,
    SecretSource,
    load_chain,
    pem_from_spec,
    source_from_spec,
)
from broker.unixsock import SocketError, check_directory

__all__ = [
    "SUN_PATH_MAX",
    "Client",
    "Config",
    "DevClient",
    "DevIssuer",
    "Environment",
    "HostPort",
    "Listen",
    "RefreshPolicy",
    "check_token_url",
    "is_loopback_host",
    "parse_duration",
]

_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HOST_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")
# Headers a client library or proxy sets by itself: as the guard header
# they would be sent, or rewritten, without the caller meaning it.
_STANDARD_HEADERS = frozenset(
    {
        "host",
        "authorization",
        "cookie",
        "origin",
        "referer",
        "user-agent",
        "accept",
        "connection",
        "content-type",
        "content-length",
        "transfer-encoding",
    }
)
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


class Guard(StrictModel):
    """The caller guard: what a request must carry to be served at all."""

    # Callers send "<header>: 1"; required on TCP, where SSRF and browser
    # requests arrive and cannot add it, optional on the socket.
    header: str = Field("Token-Broker", pattern=r"^[A-Za-z0-9-]{1,64}$")
    http: Bool = True
    unix: Bool = False
    # Host names accepted on TCP besides the loopback ones.
    hosts: tuple[str, ...] = ()

    @field_validator("header")
    @classmethod
    def _own_header(cls, value: str) -> str:
        if value.lower() in _STANDARD_HEADERS:
            raise ValueError(
                f"{value} is a standard HTTP header; pick a name of its own"
            )
        return value

    @field_validator("hosts")
    @classmethod
    def _host_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for host in value:
            if not _HOST_NAME.fullmatch(host):
                raise ValueError(f"{host!r} is not a host name (no port, no scheme)")
        return tuple(host.lower() for host in value)


class Limits(StrictModel):
    """Bounds that keep one misbehaving caller from starving the others."""

    connections: int = Field(1024, ge=1, le=1_000_000)
    header_bytes: int = Field(8190, ge=1024, le=65536)
    headers: int = Field(64, ge=8, le=512)
    idle_timeout: Duration = Field(30.0, gt=0)
    # Requests per second per caller, with bursts up to burst; null: no limit.
    rate: Number | None = Field(1000.0, gt=0)
    burst: int = Field(2000, ge=1)


class Listen(StrictModel):
    """Where the token API and the metrics endpoints listen."""

    http: HostPort | None = HostPort(host="127.0.0.1", port=8181)
    # Accept a socket directory anyone may write to, such as a Kubernetes
    # emptyDir (0777, shared by the pod's containers only). Declared before
    # unix, whose check reads it.
    unix_shared_dir: Bool = False
    unix: str | None = "/tmp/token-broker.sock"  # noqa: S108 - a documented default
    unix_mode: FileMode = 0o660
    unix_group: int | None = None
    metrics: HostPort | None = HostPort(host="127.0.0.1", port=9464)
    drain_timeout: Duration = 5.0
    guard: Guard = Guard()
    limits: Limits = Limits()
    # Who may POST /v1/quit on the socket; null: the broker's own user and root.
    quit_callers: Callers | None = None

    @field_validator("http")
    @classmethod
    def _http_on_loopback(cls, value: HostPort | None) -> HostPort | None:
        return require_loopback(value, "the token API")

    @field_validator("unix_group", mode="before")
    @classmethod
    def _group(cls, value: object) -> int | None:
        """A group name or number, resolved to a gid now."""
        if value is None or (isinstance(value, int) and not isinstance(value, bool)):
            return value
        if isinstance(value, str) and value.isdigit():
            return int(value)
        if isinstance(value, str) and value:
            try:
                return grp.getgrnam(value).gr_gid
            except KeyError:
                raise ValueError(f"there is no group named {value!r}") from None
        raise ValueError("expected a group name or number")

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
        value = resolve_path(value, info)
        try:
            shared = info.data.get("unix_shared_dir", False)
            check_directory(os.path.dirname(value), shared)
        except SocketError as exc:
            raise ValueError(str(exc)) from None
        size = len(os.fsencode(value))
        if size > SUN_PATH_MAX:
            raise ValueError(
                f"the socket path is {size} bytes long; this OS allows at most "
                f"{SUN_PATH_MAX}"
            )
        return value


class Backoff(StrictModel):
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


class RefreshPolicy(StrictModel):
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


class BackoffOverride(StrictModel):
    """A client's own ``refresh.backoff``; keys left out keep the global value."""

    initial: Duration | None = None
    max: Duration | None = None
    permanent: Duration | None = None


class RefreshOverride(StrictModel):
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


class Environment(StrictModel):
    """One issuer: staging, production, or the embedded dev issuer."""

    token_url: str | None = None
    issuer: str | None = None
    ca_file: str | None = None

    @field_validator("token_url", "issuer")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return None if value is None else check_token_url(value)

    @field_validator("issuer")
    @classmethod
    def _bare_issuer(cls, value: str | None) -> str | None:
        # RFC 8414 2: an issuer identifier has no query or fragment.
        if value is not None and "?" in value:
            raise ValueError("an issuer identifier has no ?query (RFC 8414)")
        return value

    @model_validator(mode="after")
    def _one_way_to_the_endpoint(self) -> Environment:
        if (self.token_url is None) == (self.issuer is None):
            raise ValueError(
                "give token_url, or issuer to discover it (RFC 8414), not both"
            )
        return self

    @field_validator("ca_file")
    @classmethod
    def _ca_readable(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        path = readable_file(value, info, "the CA bundle")
        try:
            ssl.create_default_context().load_verify_locations(cafile=path)
        except (ssl.SSLError, ValueError, OSError):
            raise ValueError(
                f"{path} holds no usable PEM certificate for a CA bundle"
            ) from None
        return path


AuthMethod = Literal[
    "client_secret_basic", "client_secret_post", "private_key_jwt", "tls_client_auth"
]
SECRET_METHODS = ("client_secret_basic", "client_secret_post")


class ClientCert(StrictModel):
    """A client certificate and its key (PEM files) for mutual TLS."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    cert: PemFile
    key: PemFile

    @field_validator("cert", "key", mode="before")
    @classmethod
    def _pem(cls, value: object, info: ValidationInfo) -> PemFile:
        if isinstance(value, PemFile):
            return value
        if isinstance(value, str):
            value = {"file": value}
        return pem_from_spec(value, (info.context or {}).get("base_dir", "."))

    @model_validator(mode="after")
    def _usable(self) -> ClientCert:
        # Load it once now: a swapped, mismatched or encrypted key fails the
        # config, not the first request (and never prompts for a password).
        try:
            load_chain(
                ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), self.cert.path, self.key.path
            )
        except (ssl.SSLError, OSError):
            raise ValueError(
                f"{self.cert.path} and {self.key.path} are not a certificate and "
                "its matching unencrypted PEM key"
            ) from None
        return self


class Client(StrictModel):
    """One client-credentials client, served under its name."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    environment: str
    client_id: str = Field(min_length=1)
    client_secret: SecretSource | None = None
    scopes: tuple[str, ...] = ()
    auth: AuthMethod = "client_secret_basic"
    encoding: Literal["form", "json"] = "form"
    audience: str | None = None
    # Other audiences callers may ask for with ?audience= (besides audience).
    audiences: tuple[str, ...] = ()
    resource: str | tuple[str, ...] | None = None
    params: dict[str, str] = Field(default_factory=dict)
    required: Bool = True
    refresh: RefreshOverride | None = None
    private_key: PemFile | None = None
    signing_alg: Literal["RS256", "ES256"] | None = None
    key_id: str | None = Field(None, min_length=1)
    assertion_audience: str | None = Field(None, min_length=1)
    client_cert: ClientCert | None = None
    sinks: tuple[Sink, ...] = ()
    on_refresh: tuple[str, ...] | None = Field(None, min_length=1)
    # Who may take this client's token; null: any caller the guard lets in.
    callers: Callers | None = None

    @field_validator("private_key", mode="before")
    @classmethod
    def _key(cls, value: object, info: ValidationInfo) -> PemFile | None:
        if value is None or isinstance(value, PemFile):
            return value
        return pem_from_spec(value, (info.context or {}).get("base_dir", "."))

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
            if not SCOPE_TOKEN.fullmatch(scope):
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
        needs = {
            "client_secret": self.auth in SECRET_METHODS,
            "private_key": self.auth == "private_key_jwt",
        }
        for key, needed in needs.items():
            present = getattr(self, key) is not None
            if needed and not present:
                raise ValueError(f"auth {self.auth} needs {key}")
            if present and not needed:
                raise ValueError(f"auth {self.auth} does not use {key}; remove it")
        if self.auth == "tls_client_auth" and self.client_cert is None:
            raise ValueError("auth tls_client_auth needs client_cert")
        if self.auth == "private_key_jwt" and self.private_key is not None:
            # Imported here: PyJWT and cryptography load only for this method.
            from broker.assertion import check_key

            check_key(self.private_key.read().reveal(), self.signing_alg)
        return self


class Sink(StrictModel):
    """A file kept holding a client's current token, for apps that read files."""

    path: str
    format: Literal["raw", "json", "header", "env"] = "raw"
    mode: FileMode = 0o600
    owner: str | None = Field(None, min_length=1)
    variable: str = "ACCESS_TOKEN"

    @field_validator("path")
    @classmethod
    def _in_a_directory(cls, value: str, info: ValidationInfo) -> str:
        path = resolve_path(value, info)
        directory = os.path.dirname(path)
        if not os.path.isdir(directory):
            raise ValueError(f"the sink's directory {directory} does not exist")
        return path

    @field_validator("variable")
    @classmethod
    def _variable(cls, value: str) -> str:
        if not _VARIABLE.fullmatch(value):
            raise ValueError(f"{value!r} is not a shell variable name")
        return value


class Log(StrictModel):
    """Log level and output format."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class Config(StrictModel):
    """A whole, validated configuration file."""

    listen: Listen = Listen()
    refresh: RefreshPolicy = RefreshPolicy()
    environments: dict[str, Environment] = Field(min_length=1)
    clients: dict[str, Client] = Field(min_length=1)
    log: Log = Log()
    dev_issuer: DevIssuer | None = None
    exit_when_file_exists: str | None = Field(None, min_length=1)
    watch_config: Duration | None = Field(2.0, ge=0.1)
    # One aggregated log event per caller, client and interval.
    audit: Bool = False
    audit_interval: Duration = Field(60.0, ge=1.0)

    @field_validator("exit_when_file_exists")
    @classmethod
    def _exit_file(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else resolve_path(value, info)

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
