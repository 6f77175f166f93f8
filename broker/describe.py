"""The summary ``token-broker check-config`` prints: what a config will do.

It says where every secret comes from and never what it is.
"""

from __future__ import annotations

import shlex

from broker.config import Client, Config, HostPort, Sink
from broker.loader import Loaded

_INDENT = "  "


def describe(loaded: Loaded) -> str:
    """Render listeners, clients and warnings of ``loaded`` as aligned text."""
    config = loaded.config
    lines = [f"config {loaded.path}", "", "listeners"]
    lines += _table(_listeners(config))

    lines += ["", f"clients ({len(config.clients)})"]
    blocks = {name: _client_rows(config, spec) for name, spec in config.clients.items()}
    width = max(len(label) for rows in blocks.values() for label, _ in rows)
    for name, rows in blocks.items():
        lines.append(f"{_INDENT}{name}")
        lines += _table(rows, depth=2, width=width)

    if loaded.warnings:
        lines.append("")
    for kind, name in loaded.warnings:
        lines.append(_warning(kind, name))

    return "\n".join(lines) + "\n"


def _listeners(config: Config) -> list[tuple[str, str]]:
    listen = config.listen
    unix = "off"
    if listen.unix is not None:
        unix = f"{listen.unix} (mode {listen.unix_mode:04o})"
    guard = listen.guard
    required = [name for name, on in (("http", guard.http), ("unix", guard.unix)) if on]
    header = f"'{guard.header}: 1' on {' and '.join(required) or 'no listener'}"
    hosts = ", ".join(("loopback names", *guard.hosts))
    limits = listen.limits
    rate = "no rate limit"
    if limits.rate is not None:
        rate = f"{limits.rate:g}/s per caller (burst {limits.burst})"
    rows = [
        ("token API (http)", _address(listen.http)),
        ("token API (unix)", unix),
        ("metrics", _address(listen.metrics)),
        ("guard", f"{header}; Host: {hosts}"),
        (
            "limits",
            f"{limits.connections} connections per listener, idle "
            f"{limits.idle_timeout:g}s, {rate}",
        ),
        ("quit", _quit(config)),
    ]
    if config.dev_issuer is not None:
        rows.append(("dev issuer", _address(config.dev_issuer.listen)))

    return rows


def _address(address: HostPort | None) -> str:
    return "off" if address is None else f"http://{address}"


def _client_rows(config: Config, client: Client) -> list[tuple[str, str]]:
    environment = config.environments[client.environment]
    if environment.token_url is not None:
        endpoint = ("token URL", _without_query(environment.token_url))
    else:
        endpoint = ("issuer", f"{environment.issuer} (token URL discovered)")
    rows = [
        ("environment", client.environment),
        endpoint,
        ("client id", client.client_id),
        ("scopes", " ".join(client.scopes) or "(none)"),
        ("auth", client.auth),
        ("encoding", client.encoding),
        ("required", "yes" if client.required else "no"),
        ("callers", _callers(client)),
    ]
    if client.client_secret is not None:
        rows.append(("secret", client.client_secret.describe()))
    if client.private_key is not None:
        rows.append(("private key", client.private_key.describe()))
        if client.signing_alg is not None:
            rows.append(("signing alg", client.signing_alg))
    if client.client_cert is not None:
        rows.append(("client cert", client.client_cert.cert.describe()))
    if environment.ca_file is not None:
        rows.append(("CA bundle", environment.ca_file))
    if client.audience is not None:
        rows.append(("audience", client.audience))
    resources = client.resource
    if isinstance(resources, str):
        resources = (resources,)
    if resources:
        rows.append(("resource", " ".join(resources)))
    if client.params:
        # Names only: an extra parameter may carry something private.
        rows.append(("extra params", ", ".join(sorted(client.params))))
    rows += [("token file", _sink(sink)) for sink in client.sinks]
    if client.on_refresh is not None:
        rows.append(("on_refresh", shlex.join(client.on_refresh)))

    return rows


def _callers(client: Client) -> str:
    if client.callers is None:
        return "open: any local caller that passes the guard"
    return client.callers.describe()


def _quit(config: Config) -> str:
    if config.listen.unix is None:
        return "off (POST /v1/quit needs the Unix socket)"
    if config.listen.quit_callers is None:
        return "the broker's own user and root, on the Unix socket"
    return config.listen.quit_callers.describe() + ", on the Unix socket"


def _sink(sink: Sink) -> str:
    details = [sink.format, f"mode {sink.mode:04o}"]
    if sink.format == "env":
        details.insert(1, f"variable {sink.variable}")
    if sink.owner is not None:
        details.append(f"owner {sink.owner}")

    return f"{sink.path} ({', '.join(details)})"


def _table(rows: list[tuple[str, str]], depth: int = 1, width: int = 0) -> list[str]:
    width = max(width, *(len(label) for label, _ in rows))
    indent = _INDENT * depth

    return [f"{indent}{label.ljust(width)}  {value}" for label, value in rows]


def _warning(kind: str, client: str) -> str:
    if kind == "literal_secret":
        return (
            f"warning: client {client}: literal secret in the config file; "
            "use {env: NAME} or {file: PATH}"
        )
    return f"warning: client {client}: {kind}"


def _without_query(url: str) -> str:
    """The URL with any query replaced by ``?…``: it may carry a key."""
    base, sep, _ = url.partition("?")
    return base + ("?…" if sep else "")
