"""The configuration contract: keys, defaults, checks and the errors they raise."""

from __future__ import annotations

import re
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from broker.config import (
    SUN_PATH_MAX,
    Config,
    HostPort,
    RefreshPolicy,
    check_token_url,
    is_loopback_host,
    parse_duration,
)
from broker.errors import ConfigError
from broker.loader import Loaded, load, load_text
from tests.pki import make_pki

NAME = "/etc/token-broker/broker.yaml"
SECRET = "s3cr3t-Value-42"
ENVIRON = {"CHAT_SECRET": SECRET}
MINIMAL = """\
environments:
  prod: {token_url: "https://auth.example.com/oauth2/token"}
clients:
  chat:
    environment: prod
    client_id: m2m-chat
    client_secret: {env: CHAT_SECRET}
"""
DEV_ISSUER = {"clients": {"m2m-demo": {"secret": "demo-secret"}}}


def minimal() -> dict[str, Any]:
    """Return the smallest valid config as data, fresh for each change."""
    data: dict[str, Any] = yaml.safe_load(MINIMAL)
    return data


def with_client(**fields: Any) -> dict[str, Any]:
    """Return the minimal config with fields of client ``chat`` replaced."""
    data = minimal()
    data["clients"]["chat"].update(fields)
    return data


def with_section(section: str, value: Any) -> dict[str, Any]:
    """Return the minimal config with one top-level section set."""
    data = minimal()
    data[section] = value
    return data


def dump(data: dict[str, Any] | str) -> str:
    """Return YAML text for ``data`` (text passes through)."""
    return data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False)


def loaded(data: dict[str, Any] | str, environ: Mapping[str, str] = ENVIRON) -> Loaded:
    """Load ``data`` as if read from ``NAME``."""
    return load_text(dump(data), NAME, environ)


def config(data: dict[str, Any] | str, environ: Mapping[str, str] = ENVIRON) -> Config:
    """Load ``data`` and return the validated config."""
    return loaded(data, environ).config


def refused(
    data: dict[str, Any] | str, match: str, environ: Mapping[str, str] = ENVIRON
) -> ConfigError:
    """Load ``data``, expect a ConfigError matching ``match`` and return it."""
    with pytest.raises(ConfigError, match=match) as info:
        load_text(dump(data), NAME, environ)
    assert info.value.file == NAME
    return info.value


# Defaults


def test_minimal_config_fills_every_listen_default() -> None:
    """Without listen:, the API is on 127.0.0.1:8181 and a 0660 socket."""
    listen = config(MINIMAL).listen

    assert listen.http == HostPort(host="127.0.0.1", port=8181)
    assert listen.unix == "/tmp/token-broker.sock"
    assert listen.unix_mode == 0o660
    assert listen.metrics == HostPort(host="127.0.0.1", port=9464)
    assert listen.drain_timeout == 5.0


def test_minimal_config_fills_every_refresh_default() -> None:
    """Without refresh:, the documented policy applies."""
    refresh = config(MINIMAL).refresh

    assert (refresh.at, refresh.before, refresh.jitter) == (0.8, 300.0, 0.1)
    assert (refresh.margin, refresh.default_lifetime) == (10.0, 600.0)
    assert (refresh.min_interval, refresh.timeout) == (5.0, 10.0)
    backoff = refresh.backoff
    assert (backoff.initial, backoff.max, backoff.permanent) == (1.0, 120.0, 600.0)


def test_minimal_config_fills_every_client_default() -> None:
    """A client needs only environment, client_id and client_secret."""
    loaded_config = config(MINIMAL)
    client = loaded_config.clients["chat"]

    assert client.scopes == ()
    assert client.auth == "client_secret_basic"
    assert client.encoding == "form"
    assert client.audience is None
    assert client.resource is None
    assert client.params == {}
    assert client.required is True
    assert client.refresh is None
    assert loaded_config.environments["prod"].ca_file is None
    assert loaded_config.policy("chat") == loaded_config.refresh


def test_minimal_config_fills_log_and_dev_issuer_defaults() -> None:
    """Logging is info/auto and the dev issuer is off unless configured."""
    loaded_config = config(MINIMAL)

    assert (loaded_config.log.level, loaded_config.log.format) == ("info", "auto")
    assert loaded_config.dev_issuer is None


def test_dev_issuer_defaults() -> None:
    """A dev_issuer: block with only clients gets loopback:8180, 1h tokens."""
    dev = config(with_section("dev_issuer", DEV_ISSUER)).dev_issuer

    assert dev is not None
    assert dev.listen == HostPort(host="127.0.0.1", port=8180)
    assert dev.token_lifetime == 3600.0
    assert dev.audience == "token-broker-dev"
    assert dev.clients["m2m-demo"].secret == "demo-secret"
    assert dev.clients["m2m-demo"].scopes == ()


def test_null_turns_listeners_off() -> None:
    """http, unix and metrics each accept null."""
    tcp_only = config(with_section("listen", {"unix": None, "metrics": None}))
    unix_only = config(with_section("listen", {"http": None}))

    assert (tcp_only.listen.unix, tcp_only.listen.metrics) == (None, None)
    assert unix_only.listen.http is None


def test_the_token_api_must_listen_somewhere() -> None:
    """http and unix both null is refused: no caller could get a token."""
    error = refused(
        with_section("listen", {"http": None, "unix": None}),
        "needs http, unix or both",
    )

    assert error.key_path == "listen"


def test_loaded_remembers_its_file_and_no_warnings() -> None:
    """Loaded carries the file name; env secrets warrant no warning."""
    result = loaded(MINIMAL)

    assert result.path == NAME
    assert result.warnings == ()


def test_config_is_frozen() -> None:
    """A loaded config cannot be changed in place."""
    loaded_config = config(MINIMAL)

    with pytest.raises(ValueError, match="frozen"):
        loaded_config.log = loaded_config.log  # type: ignore[misc]


# Durations


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("2d", 172800.0),
        ("1h30m", 5400.0),
        ("1m30s", 90.0),
        ("1s500ms", 1.5),
        ("250ms", 0.25),
        ("1.5s", 1.5),
        ("90", 90.0),
        ("0.5", 0.5),
        (" 5m ", 300.0),
        ("0s", 0.0),
        (90, 90.0),
        (0, 0.0),
        (1.5, 1.5),
    ],
)
def test_durations_read_units_and_plain_seconds(value: object, seconds: float) -> None:
    """Durations accept s, m, h, d, ms, combinations and plain seconds."""
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "not a duration"),
        ("5 m", "not a duration"),
        ("5x", "not a duration"),
        ("m", "not a duration"),
        ("5M", "not a duration"),
        ("30m1h", "not a duration"),
        ("1h1h", "not a duration"),
        ("1h-5m", "not a duration"),
        ("-5s", "not a duration"),
        ("1e3", "not a duration"),
        ("inf", "not a duration"),
        ("nan", "not a duration"),
        ("-5", "cannot be negative"),
        (-1, "cannot be negative"),
        (-0.5, "cannot be negative"),
        (float("inf"), "too large"),
        (float("nan"), "too large"),
        (10**400, "too large"),
        ("9" * 400, "too large"),
        (True, "expected a duration"),
        (False, "expected a duration"),
        (None, "expected a duration"),
        ([5], "expected a duration"),
    ],
)
def test_bad_durations_are_refused(value: object, message: str) -> None:
    """Anything but a non-negative finite duration raises ValueError."""
    with pytest.raises(ValueError, match=message):
        parse_duration(value)


def test_durations_in_the_file_become_seconds() -> None:
    """Every duration key accepts the unit forms."""
    data = with_section(
        "refresh",
        {"before": "1h30m", "timeout": "250ms", "backoff": {"max": "2m"}},
    )
    refresh = config(data).refresh

    assert (refresh.before, refresh.timeout, refresh.backoff.max) == (5400, 0.25, 120)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("true", "expected a duration"),
        ("-5", "cannot be negative"),
        ("5 minutes", re.escape("'5 minutes' is not a duration: write 30s")),
        ("1" + "0" * 400, "too large"),
        ("[5s]", "expected a duration"),
    ],
)
def test_bad_durations_in_the_file_name_the_key(value: str, message: str) -> None:
    """A bad duration is reported at its key path, with the accepted forms."""
    error = refused(MINIMAL + f"refresh:\n  timeout: {value}\n", message)

    assert error.key_path == "refresh.timeout"


def test_zero_is_refused_where_a_wait_must_be_positive() -> None:
    """timeout, default_lifetime and backoff.initial must be more than zero."""
    for key in ("timeout", "default_lifetime"):
        error = refused(with_section("refresh", {key: "0s"}), "must be more than 0")
        assert error.key_path == f"refresh.{key}"

    error = refused(
        with_section("refresh", {"backoff": {"initial": 0}}), "initial must be more"
    )
    assert error.key_path == "refresh.backoff"


# Refresh policy ranges


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("at", 0, "must be more than 0"),
        ("at", 1.5, "must be at most 1"),
        ("at", "often", "expected a number"),
        ("at", True, "not true or false"),
        ("jitter", -0.1, "must be at least 0"),
        ("jitter", 0.9, "must be at most 0.5"),
        ("jitter", False, "not true or false"),
    ],
)
def test_refresh_fractions_are_range_checked(
    key: str, value: object, message: str
) -> None:
    """at lies in (0, 1] and jitter in [0, 0.5]; booleans are not numbers."""
    error = refused(with_section("refresh", {key: value}), message)

    assert error.key_path == f"refresh.{key}"


@pytest.mark.parametrize("written", [".nan", ".inf", "-.inf"])
def test_refresh_fractions_must_be_finite(written: str) -> None:
    """YAML's .nan and .inf are not fractions."""
    error = refused(MINIMAL + f"refresh: {{at: {written}}}\n", "a finite number")

    assert error.key_path == "refresh.at"


def test_backoff_max_must_cover_initial() -> None:
    """backoff.max below backoff.initial is refused."""
    data = with_section("refresh", {"backoff": {"initial": "10s", "max": "5s"}})

    assert refused(data, "max must be at least initial").key_path == "refresh.backoff"


# Client refresh overrides


def test_client_refresh_override_is_merged_over_the_global_policy() -> None:
    """Keys a client sets win; the rest, nested backoff keys too, come from refresh:."""
    data = with_client(refresh={"before": "1m", "backoff": {"max": "30s"}})
    data["refresh"] = {"at": 0.5, "backoff": {"initial": "2s"}}
    policy = config(data).policy("chat")

    assert policy.before == 60.0
    assert policy.at == 0.5
    assert policy.backoff.initial == 2.0
    assert policy.backoff.max == 30.0
    assert isinstance(policy, RefreshPolicy)


def test_clients_without_override_share_the_global_policy() -> None:
    """A client without refresh: gets refresh: exactly."""
    data = with_section("refresh", {"before": "2m"})

    assert config(data).policy("chat").before == 120.0


def test_a_bad_merged_policy_is_reported_under_the_client() -> None:
    """Valid halves that clash once merged are reported at clients.NAME.refresh."""
    data = with_client(refresh={"backoff": {"max": "5s"}})
    data["refresh"] = {"backoff": {"initial": "10s"}}
    error = refused(data, "max must be at least initial")

    assert error.key_path == "clients.chat.refresh.backoff"


def test_a_bad_override_value_is_reported_at_its_key() -> None:
    """A value out of range in a client's refresh: names the client's key."""
    error = refused(with_client(refresh={"at": 2}), "must be at most 1")

    assert error.key_path == "clients.chat.refresh.at"


def test_a_bad_override_duration_is_reported_at_its_key() -> None:
    """Override durations are parsed like global ones."""
    error = refused(
        with_client(refresh={"backoff": {"initial": "soon"}}), "not a duration"
    )

    assert error.key_path == "clients.chat.refresh.backoff.initial"


# Interpolation


def test_variables_are_interpolated() -> None:
    """${VAR} is replaced with the variable's value, also inside longer text."""
    data = with_client(client_id="m2m-${TEAM}-chat")

    client = config(data, {**ENVIRON, "TEAM": "search"}).clients["chat"]
    assert client.client_id == "m2m-search-chat"


def test_default_applies_when_unset_or_empty() -> None:
    """${VAR:-default} uses the default when VAR is unset or empty."""
    data = with_client(client_id="${CLIENT_ID:-m2m-default}")

    assert config(data).clients["chat"].client_id == "m2m-default"
    empty = config(data, {**ENVIRON, "CLIENT_ID": ""})
    assert empty.clients["chat"].client_id == "m2m-default"
    set_ = config(data, {**ENVIRON, "CLIENT_ID": "m2m-set"})
    assert set_.clients["chat"].client_id == "m2m-set"


def test_empty_default_is_allowed() -> None:
    """${VAR:-} gives an empty string."""
    data = with_client(client_id="m2m${SUFFIX:-}")

    assert config(data).clients["chat"].client_id == "m2m"


def test_double_dollar_is_a_literal_dollar() -> None:
    """$$ writes $, so $${VAR} stays as the text ${VAR}."""
    data = with_client(client_id="a$$b-$${NOT_A_VAR}")

    assert config(data).clients["chat"].client_id == "a$b-${NOT_A_VAR}"


def test_a_lone_dollar_is_kept() -> None:
    """A $ not followed by { or $ is plain text."""
    data = with_client(client_id="price$5")

    assert config(data).clients["chat"].client_id == "price$5"


def test_undefined_variable_names_the_variable_and_key() -> None:
    """A variable that is not set and has no default is an error at its key."""
    error = refused(
        with_client(client_id="${MISSING_ID}"),
        "environment variable MISSING_ID is not set and has no default",
    )

    assert error.key_path == "clients.chat.client_id"


def test_undefined_variable_in_a_list_names_the_index() -> None:
    """The key path of a list item ends in its index."""
    error = refused(with_client(scopes=["a", "${MISSING}"]), "MISSING is not set")

    assert error.key_path == "clients.chat.scopes[1]"


@pytest.mark.parametrize("text", ["${A-b}", "${}", "${A", "${1A}", "${A B}"])
def test_malformed_references_are_refused(text: str) -> None:
    """A ${ that starts no valid reference is an error, not silent text."""
    error = refused(with_client(client_id=text), re.escape("malformed ${...}"))

    assert error.key_path == "clients.chat.client_id"


def test_a_variable_cannot_inject_yaml_structure() -> None:
    """Values are substituted after parsing: YAML inside a value stays text."""
    injected = "x\n    scopes: [admin]\n    auth: client_secret_post"
    data = with_client(client_id="${INJECT}")

    client = config(data, {**ENVIRON, "INJECT": injected}).clients["chat"]
    assert client.client_id == injected
    assert client.scopes == ()
    assert client.auth == "client_secret_basic"


def test_a_variable_cannot_add_list_items() -> None:
    """A value with a comma stays one list item."""
    data = with_client(scopes=["${SCOPES}"])

    refused(data, "is not a scope token", {**ENVIRON, "SCOPES": "a, admin"})


def test_substituted_values_are_not_interpolated_again() -> None:
    """A value that itself contains ${...} is taken literally."""
    data = with_client(client_id="${OUTER}")

    client = config(data, {**ENVIRON, "OUTER": "${CHAT_SECRET}"}).clients["chat"]
    assert client.client_id == "${CHAT_SECRET}"


def test_keys_are_not_interpolated() -> None:
    """Only values are interpolated; a ${...} key is checked as a name."""
    data = minimal()
    data["clients"] = {"${NAME}": data["clients"]["chat"]}

    refused(data, "is not a usable name", {**ENVIRON, "NAME": "chat"})


def test_interpolated_text_is_validated_as_the_key_type() -> None:
    """Interpolated strings become durations, booleans, numbers and addresses."""
    data = with_client(required="${REQUIRED}")
    data["refresh"] = {"before": "${BEFORE}", "at": "${AT}"}
    data["listen"] = {"http": "127.0.0.1:${PORT}"}
    environ = {**ENVIRON, "REQUIRED": "false", "BEFORE": "2m", "AT": "0.5"}
    result = config(data, {**environ, "PORT": "9000"})

    assert result.clients["chat"].required is False
    assert (result.refresh.before, result.refresh.at) == (120.0, 0.5)
    assert result.listen.http == HostPort(host="127.0.0.1", port=9000)


# Unknown keys


@pytest.mark.parametrize(
    ("section", "value", "key_path", "allowed"),
    [
        ("bogus", 1, "bogus", "listen, refresh, environments, clients, log"),
        (
            "listen",
            {"bogus": 1},
            "listen.bogus",
            "http, unix_shared_dir, unix, unix_mode, unix_group, metrics",
        ),
        ("refresh", {"bogus": 1}, "refresh.bogus", "at, before, jitter, margin"),
        (
            "refresh",
            {"backoff": {"bogus": 1}},
            "refresh.backoff.bogus",
            "initial, max, permanent",
        ),
        ("log", {"bogus": 1}, "log.bogus", "level, format"),
        (
            "dev_issuer",
            {**DEV_ISSUER, "bogus": 1},
            "dev_issuer.bogus",
            "listen, token_lifetime, audience, tls, clients",
        ),
        (
            "dev_issuer",
            {"clients": {"m2m-demo": {"secret": "x", "bogus": 1}}},
            "dev_issuer.clients.m2m-demo.bogus",
            "secret, public_key, scopes",
        ),
        (
            "environments",
            {"prod": {"token_url": "https://a.example.com/t", "bogus": 1}},
            "environments.prod.bogus",
            "token_url, issuer, ca_file",
        ),
    ],
)
def test_unknown_keys_are_refused_at_every_level(
    section: str, value: object, key_path: str, allowed: str
) -> None:
    """An unknown key names its path and lists the keys allowed there."""
    error = refused(
        with_section(section, value), f"unknown key.*allowed here: {allowed}"
    )

    assert error.key_path == key_path


@pytest.mark.parametrize(
    ("fields", "key_path", "allowed"),
    [
        ({"bogus": 1}, "clients.chat.bogus", "environment, client_id, client_secret"),
        (
            {"refresh": {"bogus": 1}},
            "clients.chat.refresh.bogus",
            "at, before, jitter",
        ),
        (
            {"refresh": {"backoff": {"bogus": 1}}},
            "clients.chat.refresh.backoff.bogus",
            "initial, max, permanent",
        ),
    ],
)
def test_unknown_client_keys_are_refused(
    fields: dict[str, Any], key_path: str, allowed: str
) -> None:
    """Unknown keys inside a client, its refresh and its secret are refused."""
    error = refused(with_client(**fields), f"unknown key; allowed here: {allowed}")

    assert error.key_path == key_path


def test_unknown_key_suggests_a_close_match() -> None:
    """A near miss such as scope for scopes gets a suggestion."""
    refused(with_client(scope=["a"]), "unknown key; did you mean scopes\\?")


def test_a_misspelt_required_key_is_reported_as_unknown() -> None:
    """A typo is reported as the unknown key, not as the missing one."""
    data = minimal()
    data["enviroments"] = data.pop("environments")

    error = refused(data, "unknown key; did you mean environments\\?")
    assert error.key_path == "enviroments"


# Duplicate keys


def test_duplicate_top_level_key_names_path_and_lines() -> None:
    """A key given twice is refused with both line numbers."""
    error = refused(MINIMAL + "log: {level: info}\nlog: {level: debug}\n", "duplicate")

    assert error.key_path == "log"
    assert error.reason == "duplicate key (lines 8 and 9)"


def test_duplicate_nested_key_names_its_full_path() -> None:
    """Duplicates are found at any depth, flow mappings included."""
    text = MINIMAL.replace("client_id: m2m-chat", "client_id: a\n    client_id: b")
    error = refused(text, re.escape("duplicate key (lines 6 and 7)"))
    assert error.key_path == "clients.chat.client_id"

    error = refused(MINIMAL + "log: {level: info, level: debug}\n", "duplicate key")
    assert error.key_path == "log.level"


def test_same_key_in_different_mappings_is_fine() -> None:
    """Only keys of one mapping must be unique."""
    text = MINIMAL + "log: {level: info}\nrefresh: {backoff: {max: 1m}, before: 1m}\n"

    assert config(text).refresh.before == 60.0


def test_keys_that_read_as_other_types_are_refused() -> None:
    """Unquoted keys that YAML reads as numbers or booleans must be quoted."""
    number = refused(MINIMAL.replace("  chat:", "  123:"), "reads as a number; put")
    assert number.key_path == "clients.123"

    boolean = refused(MINIMAL.replace("  chat:", "  yes:"), "reads as true or false")
    assert boolean.key_path == "clients.yes"


def test_quoted_numeric_names_are_fine() -> None:
    """A quoted numeric key is text and a valid client name."""
    assert "123" in config(MINIMAL.replace("  chat:", '  "123":')).clients


# Anchors and aliases


def test_anchors_and_merge_keys_work() -> None:
    """Shared blocks can be written once and merged into clients."""
    text = """\
environments:
  prod: {token_url: "https://auth.example.com/oauth2/token"}
clients:
  chat: &base
    environment: prod
    client_id: m2m-chat
    client_secret: {env: CHAT_SECRET}
    scopes: [chat:invoke]
  files:
    <<: *base
    scopes: [files:write]
"""
    clients = config(text).clients

    assert clients["files"].client_id == "m2m-chat"
    assert clients["files"].scopes == ("files:write",)


# Wrong types


@pytest.mark.parametrize(
    ("data", "key_path", "message"),
    [
        (with_client(scopes="chat:invoke"), "clients.chat.scopes", "a list of scopes"),
        (with_client(scopes={"a": 1}), "clients.chat.scopes", "expected a list"),
        (with_client(scopes=[1]), "clients.chat.scopes[0]", "expected text"),
        (with_client(client_id=12345), "clients.chat.client_id", "put numbers"),
        (with_client(params=["a"]), "clients.chat.params", "a mapping"),
        (with_client(params={"tenant": 5}), "clients.chat.params.tenant", "text"),
        (with_client(required="maybe"), "clients.chat.required", "true or false"),
        (with_client(resource=5), "clients.chat.resource", "a URI or a list"),
        (with_client(resource=[]), "clients.chat.resource", "a URI or a list"),
        (with_section("listen", 5), "listen", "expected a mapping"),
        (with_section("listen", ["a"]), "listen", "expected a mapping"),
        (with_section("refresh", {"backoff": 5}), "refresh.backoff", "a mapping"),
        (with_section("clients", ["chat"]), "clients", "expected a mapping"),
        (with_section("environments", "prod"), "environments", "a mapping"),
        (
            with_section("listen", {"http": {"host": "127.0.0.1", "port": "x"}}),
            "listen.http.port",
            "a whole number",
        ),
        (with_section("log", {"level": "loud"}), "log.level", "expected 'debug'"),
        (with_client(encoding="xml"), "clients.chat.encoding", "'form' or 'json'"),
        (with_client(auth="magic"), "clients.chat.auth", "'client_secret_basic'"),
    ],
)
def test_wrong_types_are_explained_in_yaml_terms(
    data: dict[str, Any], key_path: str, message: str
) -> None:
    """Type errors speak of lists, mappings and text, not of Python types."""
    error = refused(data, message)

    assert error.key_path == key_path
    for jargon in ("tuple", "dict", "Input should", "instance of", "str"):
        assert jargon not in error.reason


def test_client_secret_is_required() -> None:
    """A client without a secret is refused."""
    data = minimal()
    del data["clients"]["chat"]["client_secret"]

    assert refused(data, "needs client_secret").key_path == "clients.chat"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"auth": "private_key_jwt", "client_secret": None},
            "auth private_key_jwt needs private_key",
        ),
        ({"auth": "private_key_jwt"}, "does not use client_secret"),
        (
            {"auth": "tls_client_auth", "client_secret": None},
            "auth tls_client_auth needs client_cert",
        ),
        ({"client_secret": None}, "auth client_secret_basic needs client_secret"),
    ],
)
def test_each_auth_method_needs_its_credential(
    fields: dict[str, Any], message: str
) -> None:
    """A client without the credential its auth method uses is refused."""
    error = refused(with_client(**fields), message)

    assert error.key_path == "clients.chat"


def test_a_key_client_may_not_also_carry_a_secret(tmp_path: Path) -> None:
    """A credential the auth method does not use is refused, not ignored."""
    pki = make_pki(tmp_path)
    error = refused(
        with_client(auth="client_secret_post", private_key={"file": str(pki.ca_file)}),
        "does not use private_key",
    )

    assert error.key_path == "clients.chat"


def test_an_environment_names_an_endpoint_or_an_issuer() -> None:
    """token_url and issuer: exactly one of them."""
    both = {
        "token_url": "https://auth.example.com/t",
        "issuer": "https://auth.example.com",
    }
    for env in (both, {}):
        error = refused(
            with_section("environments", {"prod": env}),
            "give token_url, or issuer",
        )
        assert error.key_path == "environments.prod"


@pytest.mark.parametrize(
    ("data", "key_path", "message"),
    [
        (with_section("environments", {}), "environments", "at least one"),
        (with_section("clients", {}), "clients", "at least one"),
        (with_client(client_id=""), "clients.chat.client_id", "must not be empty"),
        (with_section("dev_issuer", {}), "dev_issuer.clients", "is missing"),
    ],
)
def test_required_keys_and_empty_sections(
    data: dict[str, Any], key_path: str, message: str
) -> None:
    """Required keys and sections must be present and non-empty."""
    assert refused(data, message).key_path == key_path


@pytest.mark.parametrize("missing", ["environments", "clients"])
def test_missing_top_level_sections(missing: str) -> None:
    """environments and clients are required."""
    data = minimal()
    del data[missing]

    assert refused(data, "required key is missing").key_path == missing


def test_undefined_environment_is_refused() -> None:
    """A client's environment must be one of environments:, which are listed."""
    error = refused(
        with_client(environment="staging"),
        re.escape("environment 'staging' is not defined (defined: prod)"),
    )

    assert error.key_path == "clients.chat.environment"


# Token URLs


@pytest.mark.parametrize(
    "url",
    [
        "https://auth.example.com/oauth2/token",
        "https://auth.example.com:8443/token?tenant=a",
        "http://localhost:8180/token",
        "http://127.0.0.1/token",
        "http://127.8.9.10:9000/token",
        "http://[::1]:8180/token",
        "HTTP://LOCALHOST/token",
    ],
)
def test_https_and_loopback_http_token_urls_are_accepted(url: str) -> None:
    """https anywhere, plain http only to loopback."""
    data = with_section("environments", {"prod": {"token_url": url}})

    assert config(data).environments["prod"].token_url == url


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://auth.example.com/token", "plain http to auth.example.com"),
        ("http://10.0.0.8/token", "in clear"),
        ("http://localhost.example.com/token", "in clear"),
        ("http://127.0.0.1.example.com/token", "in clear"),
        ("http://0.0.0.0/token", "in clear"),
        ("ftp://auth.example.com/token", "expected an https URL"),
        ("auth.example.com/token", "expected an https URL"),
        ("https:///token", "expected an https URL"),
        ("https://auth.example.com/token#frag", "#fragment"),
        ("https://auth.example.com:99999/token", "not a valid URL"),
        ("https://[::1/token", "not a valid URL"),
    ],
)
def test_unsafe_or_malformed_token_urls_are_refused(url: str, message: str) -> None:
    """Cleartext to a remote host and malformed URLs are refused at the key."""
    data = with_section("environments", {"prod": {"token_url": url}})

    assert refused(data, message).key_path == "environments.prod.token_url"


@pytest.mark.parametrize(
    "url",
    [
        f"https://m2m:{SECRET}@auth.example.com/token",
        f"https://{SECRET}@auth.example.com/token",
        f"ftp://m2m:{SECRET}@auth.example.com/token",
        f"http://m2m:{SECRET}@auth.example.com/token",
    ],
)
def test_credentials_in_token_urls_are_refused_unquoted(url: str) -> None:
    """user:password@ in a URL is refused and the password is not echoed."""
    data = with_section("environments", {"prod": {"token_url": url}})
    error = refused(data, "must not carry credentials")

    assert SECRET not in str(error)


def test_check_token_url_returns_the_url() -> None:
    """The public check returns a good URL unchanged and raises ValueError."""
    assert check_token_url("https://a.example.com/t") == "https://a.example.com/t"
    with pytest.raises(ValueError, match="in clear"):
        check_token_url("http://a.example.com/t")


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("LOCALHOST", True),
        ("127.0.0.1", True),
        ("127.255.0.9", True),
        ("::1", True),
        ("[::1]", True),
        ("0.0.0.0", False),
        ("10.0.0.1", False),
        ("169.254.169.254", False),
        ("example.com", False),
        ("localhost.example.com", False),
        ("foo.localhost", False),
        ("::", False),
        ("", False),
    ],
)
def test_is_loopback_host(host: str, loopback: bool) -> None:
    """Loopback means localhost, 127.0.0.0/8 and ::1, nothing else."""
    assert is_loopback_host(host) is loopback


def test_ca_file_is_resolved_against_the_config_directory(tmp_path: Path) -> None:
    """A relative ca_file is found next to the config file, whatever the cwd."""
    make_pki(tmp_path)
    text = MINIMAL.replace(
        'prod: {token_url: "https://auth.example.com/oauth2/token"}',
        'prod: {token_url: "https://auth.example.com/oauth2/token", ca_file: ca.pem}',
    )
    (tmp_path / "broker.yaml").write_text(text)

    result = load(tmp_path / "broker.yaml", ENVIRON)
    assert result.config.environments["prod"].ca_file == str(tmp_path / "ca.pem")


def test_unreadable_ca_file_is_refused() -> None:
    """A CA bundle that cannot be read is an error at its key."""
    data = with_section(
        "environments",
        {"prod": {"token_url": "https://a.example.com/t", "ca_file": "/nonexistent"}},
    )

    error = refused(data, "cannot read the CA bundle /nonexistent")
    assert error.key_path == "environments.prod.ca_file"


# Listeners


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:9000", HostPort(host="127.0.0.1", port=9000)),
        ("localhost:9000", HostPort(host="localhost", port=9000)),
        ("[::1]:9000", HostPort(host="::1", port=9000)),
        ("127.0.0.1:0", HostPort(host="127.0.0.1", port=0)),
        ({"host": "127.0.0.1", "port": 9000}, HostPort(host="127.0.0.1", port=9000)),
    ],
)
def test_token_api_listens_on_loopback_addresses(
    value: object, expected: HostPort
) -> None:
    """listen.http takes host:port, [v6]:port or a host/port mapping."""
    listen = config(with_section("listen", {"http": value})).listen

    assert listen.http == expected


@pytest.mark.parametrize("value", ["0.0.0.0:8181", "10.0.0.1:8181", "[::]:8181"])
def test_token_api_on_a_non_loopback_address_is_refused(value: str) -> None:
    """The token API must not be reachable from other hosts."""
    error = refused(
        with_section("listen", {"http": value}), "must listen on a loopback"
    )

    assert error.key_path == "listen.http"


def test_metrics_may_listen_on_every_interface() -> None:
    """Metrics reveal no token, so 0.0.0.0 is allowed (Prometheus in a pod)."""
    listen = config(with_section("listen", {"metrics": "0.0.0.0:9464"})).listen

    assert str(listen.metrics) == "0.0.0.0:9464"


def test_dev_issuer_on_a_non_loopback_address_is_refused() -> None:
    """The dev issuer hands out tokens to anyone and stays on loopback."""
    data = with_section("dev_issuer", {**DEV_ISSUER, "listen": "0.0.0.0:8180"})

    assert refused(data, "dev issuer must listen").key_path == "dev_issuer.listen"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("8181", "not host:port"),
        ("127.0.0.1:", "not host:port"),
        (":8181", "not host:port"),
        ("127.0.0.1:65536", "not host:port"),
        ("127.0.0.1:http", "not host:port"),
        ("::1:8181", "IPv6 address in brackets"),
        (8181, "expected host:port"),
        (True, "expected host:port"),
        ({"host": "127.0.0.1", "port": 70000}, "at most 65535"),
        ({"host": "127.0.0.1", "port": True}, "not true or false"),
        ({"host": "", "port": 1}, "must not be empty"),
    ],
)
def test_malformed_addresses_are_refused(value: object, message: str) -> None:
    """Addresses need a host and a port in 0..65535."""
    error = refused(with_section("listen", {"metrics": value}), message)

    assert error.key_path.startswith("listen.metrics")


def test_host_port_prints_as_written() -> None:
    """str() gives back host:port, bracketing IPv6."""
    assert str(HostPort(host="::1", port=80)) == "[::1]:80"
    assert str(HostPort(host="127.0.0.1", port=80)) == "127.0.0.1:80"


def test_two_listeners_on_one_address_are_refused() -> None:
    """The token API and metrics cannot share host:port."""
    data = with_section(
        "listen", {"http": "127.0.0.1:9000", "metrics": "127.0.0.1:9000"}
    )

    error = refused(data, "127.0.0.1:9000 is already used by listen.http")
    assert error.key_path == "listen.metrics"


def test_port_zero_never_collides() -> None:
    """Port 0 (any free port) can be used by every listener."""
    data = with_section("listen", {"http": "127.0.0.1:0", "metrics": "127.0.0.1:0"})
    data["dev_issuer"] = {**DEV_ISSUER, "listen": "127.0.0.1:0"}

    assert config(data).listen.http == HostPort(host="127.0.0.1", port=0)


# Unix socket


def test_socket_path_at_the_os_limit_is_accepted() -> None:
    """A path of exactly the sun_path size is fine."""
    path = "/tmp/" + "s" * (SUN_PATH_MAX - 5)

    assert config(with_section("listen", {"unix": path})).listen.unix == path


def test_socket_path_longer_than_the_os_allows_is_refused() -> None:
    """A path that bind() would reject is refused with its length."""
    path = "/tmp/" + "s" * (SUN_PATH_MAX - 4)
    message = f"{SUN_PATH_MAX + 1} bytes long; this OS allows at most {SUN_PATH_MAX}"

    assert refused(with_section("listen", {"unix": path}), message).key_path == (
        "listen.unix"
    )


def test_socket_path_length_counts_bytes() -> None:
    """Multi-byte characters count by their encoded size."""
    path = "/tmp/" + "é" * (SUN_PATH_MAX // 2)

    refused(with_section("listen", {"unix": path}), "bytes long")


def test_empty_socket_path_is_refused() -> None:
    """An empty path is a mistake; null is how to turn the socket off."""
    refused(with_section("listen", {"unix": ""}), "use null to turn it off")


@pytest.mark.parametrize(
    ("written", "mode"),
    [
        ('"0660"', 0o660),
        ('"0600"', 0o600),
        ('"660"', 0o660),
        ('"0o640"', 0o640),
        ("0640", 0o640),
        ("0770", 0o770),
        ("0600", 0o600),
    ],
)
def test_unix_mode_is_read_as_octal(written: str, mode: int) -> None:
    """Quoted modes and YAML octal numbers are both read as octal."""
    text = MINIMAL + f"listen:\n  unix_mode: {written}\n"

    assert config(text).listen.unix_mode == mode


@pytest.mark.parametrize("written", ["640", "440", "0x1a0", "0"])
def test_unix_mode_written_as_a_decimal_number_is_refused(written: str) -> None:
    """Unquoted 640 is decimal in YAML; the file must say what it means."""
    text = MINIMAL + f"listen:\n  unix_mode: {written}\n"

    error = refused(text, 'a mode is octal; write it in quotes, such as "0660"')
    assert error.key_path == "listen.unix_mode"


@pytest.mark.parametrize("written", ['"0666"', '"0661"', '"0777"', "0604"])
def test_unix_mode_with_world_bits_is_refused(written: str) -> None:
    """Any permission for other users would hand tokens to every local user."""
    text = MINIMAL + f"listen:\n  unix_mode: {written}\n"

    assert refused(text, "lets every local user take tokens").key_path == (
        "listen.unix_mode"
    )


@pytest.mark.parametrize("written", ['"abc"', '"01000"', '"0888"', "true", "[1]"])
def test_unix_mode_that_is_no_mode_is_refused(written: str) -> None:
    """Text that is not a three-digit octal mode is refused."""
    text = MINIMAL + f"listen:\n  unix_mode: {written}\n"

    refused(text, "expected an octal mode")


# Names


@pytest.mark.parametrize("name", ["chat", "a.b_c-d", "9lives", "C" * 64])
def test_good_client_names(name: str) -> None:
    """Names of letters, digits, '.', '_', '-' up to 64 long are accepted."""
    data = minimal()
    data["clients"] = {name: data["clients"]["chat"]}

    assert name in config(data).clients


@pytest.mark.parametrize(
    "name", ["-chat", ".chat", "_chat", "a b", "a/b", "a%2f", "é", "c" * 65, "a:b"]
)
def test_bad_client_and_environment_names(name: str) -> None:
    """Names that would not work in a URL path or a metric label are refused."""
    data = minimal()
    data["clients"] = {name: data["clients"]["chat"]}
    assert refused(data, "is not a usable name").key_path == "clients"

    data = minimal()
    data["environments"] = {name: data["environments"]["prod"]}
    assert refused(data, "is not a usable name").key_path == "environments"


# Scopes, params, resource


def test_scopes_follow_rfc_6749() -> None:
    """Every printable ASCII character but space, quote and backslash is allowed."""
    odd = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"\\')
    data = with_client(scopes=["chat:invoke", "https://api.example.com/read", odd])

    assert config(data).clients["chat"].scopes[2] == odd


@pytest.mark.parametrize("scope", ["a b", 'a"b', "a\\b", "", "é", "a\tb"])
def test_bad_scope_tokens_are_refused(scope: str) -> None:
    """A scope with a space, quote, backslash or non-ASCII is not a scope token."""
    error = refused(with_client(scopes=[scope]), "is not a scope token")

    assert error.key_path == "clients.chat.scopes"


def test_a_scope_listed_twice_is_refused() -> None:
    """Duplicate scopes are refused."""
    refused(with_client(scopes=["a", "b", "a"]), "listed twice")


@pytest.mark.parametrize(
    "name",
    [
        "grant_type",
        "client_id",
        "client_secret",
        "client_assertion",
        "client_assertion_type",
        "scope",
        "audience",
        "resource",
    ],
)
def test_reserved_params_are_refused(name: str) -> None:
    """params may not set what the broker itself sends."""
    error = refused(with_client(params={name: "x"}), f"{name} is set by token-broker")

    assert error.key_path == "clients.chat.params"


def test_extra_params_audience_and_resource_are_kept() -> None:
    """Other params pass through; resource may be one URI or several."""
    data = with_client(
        params={"tenant": "acme"}, audience="https://api.example.com", resource="r1"
    )
    client = config(data).clients["chat"]
    assert (client.params, client.audience, client.resource) == (
        {"tenant": "acme"},
        "https://api.example.com",
        "r1",
    )

    several = config(with_client(resource=["r1", "r2"])).clients["chat"]
    assert several.resource == ("r1", "r2")


# Secrets in the config


def test_env_secret_is_read_from_the_given_environment() -> None:
    """{env: NAME} reads the mapping passed to load, with the newline stripped."""
    result = config(MINIMAL, {"CHAT_SECRET": SECRET + "\n"})
    source = result.clients["chat"].client_secret

    assert source is not None
    assert source.kind == "env"
    assert source.read().reveal() == SECRET


def test_env_secret_must_be_set() -> None:
    """A missing secret variable is an error at client_secret."""
    error = refused(MINIMAL, "environment variable CHAT_SECRET is not set", {})

    assert error.key_path == "clients.chat.client_secret"


def test_file_secret_relative_to_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative {file: PATH} is resolved against the config file's directory."""
    conf = tmp_path / "conf"
    (conf / "secrets").mkdir(parents=True)
    (conf / "secrets" / "chat").write_text(SECRET + "\r\n")
    text = MINIMAL.replace("{env: CHAT_SECRET}", "{file: secrets/chat}")
    (conf / "broker.yaml").write_text(text)
    monkeypatch.chdir(tmp_path)

    source = load(conf / "broker.yaml", {}).config.clients["chat"].client_secret
    assert source is not None
    assert source.name == str(conf / "secrets" / "chat")
    assert source.read().reveal() == SECRET


def test_absolute_file_secret(tmp_path: Path) -> None:
    """An absolute path is used as written."""
    path = tmp_path / "chat"
    path.write_text(SECRET + "\n")
    text = MINIMAL.replace("{env: CHAT_SECRET}", f"{{file: {path}}}")

    source = config(text).clients["chat"].client_secret
    assert source is not None
    assert source.read().reveal() == SECRET


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "the secret is empty"),
        (b"\n", "the secret is empty"),
        (SECRET.encode() + b"\x1b\n", "control character"),
        (b"ab\rcd", "control character"),
        (b"\xff\xfe", "not UTF-8"),
    ],
)
def test_bad_file_secret_is_refused_without_its_content(
    tmp_path: Path, content: bytes, message: str
) -> None:
    """File content is checked at load; the error names the path, not the value."""
    path = tmp_path / "chat"
    path.write_bytes(content)
    text = MINIMAL.replace("{env: CHAT_SECRET}", f"{{file: {path}}}")

    error = refused(text, message)
    assert error.key_path == "clients.chat.client_secret"
    assert SECRET not in str(error)


@pytest.mark.parametrize("target", ["missing", "."])
def test_unreadable_file_secret_is_refused(tmp_path: Path, target: str) -> None:
    """A missing file or a directory is refused with the OS reason."""
    path = tmp_path / target
    text = MINIMAL.replace("{env: CHAT_SECRET}", f"{{file: {path}}}")

    error = refused(text, f"cannot read {tmp_path}")
    assert error.key_path == "clients.chat.client_secret"


def test_literal_secret_is_accepted_with_a_warning() -> None:
    """A secret written in the file works and is recorded in Loaded.warnings."""
    result = loaded(with_client(client_secret=SECRET))
    source = result.config.clients["chat"].client_secret

    assert source is not None
    assert source.kind == "literal"
    assert source.read().reveal() == SECRET
    assert result.warnings == (("literal_secret", "chat"),)


@pytest.mark.parametrize(
    "value",
    [
        {"env": ""},
        {"file": ""},
        {"env": 5},
        {"vault": "x"},
        {"env": "A", "file": "B"},
        [SECRET],
        {},
    ],
)
def test_malformed_secret_sources_are_refused(value: object) -> None:
    """client_secret must be {env: NAME}, {file: PATH} or text."""
    error = refused(with_client(client_secret=value), "expected \\{env: NAME\\}")

    assert error.key_path == "clients.chat.client_secret"


# No secret in any message or repr


def assert_secret_hidden(error: ConfigError, secret: str) -> None:
    """Check every printable view of ``error`` for ``secret``."""
    views = [
        str(error),
        repr(error),
        error.reason,
        "".join(traceback.format_exception(error)),
    ]
    for view in views:
        assert secret not in view
    assert error.__cause__ is None
    assert error.__context__ is None


@pytest.mark.parametrize(
    ("written", "match"),
    [
        ("12345678901", "write a numeric secret in quotes"),
        ("123456789.5", "write a numeric secret in quotes"),
        ("true", "write a numeric secret in quotes"),
        ("[12345678901]", "expected"),
        ("{literal: '12345678901'}", "expected"),
        ("{env: CHAT_SECRET, file: '12345678901'}", "expected"),
        ('"12345678901\\u0007"', "control character"),
        ('"12345678901\\r\\n\\n"', "control character"),
    ],
)
def test_errors_never_contain_a_bad_secret_value(written: str, match: str) -> None:
    """Even when the bad value is the secret itself, no message shows it."""
    text = MINIMAL.replace("{env: CHAT_SECRET}", written)

    error = refused(text, match)
    assert_secret_hidden(error, "12345678901")


def test_errors_never_contain_a_bad_env_secret() -> None:
    """A secret from the environment with a control character stays hidden."""
    error = refused(MINIMAL, "control character", {"CHAT_SECRET": SECRET + "\x00"})

    assert_secret_hidden(error, SECRET)


def test_errors_elsewhere_never_contain_loaded_secrets() -> None:
    """An error after secrets were read does not carry them along."""
    text = MINIMAL.replace("{env: CHAT_SECRET}", SECRET) + "log: {level: loud}\n"
    error = refused(text, "expected 'debug'")

    assert_secret_hidden(error, SECRET)


def test_errors_in_dev_issuer_secrets_do_not_show_them() -> None:
    """A dev issuer secret of the wrong type is not echoed."""
    data = with_section("dev_issuer", {"clients": {"m2m-demo": {"secret": 98765432}}})
    error = refused(data, "expected text")

    assert error.key_path == "dev_issuer.clients.m2m-demo.secret"
    assert_secret_hidden(error, "98765432")


def test_the_schema_hides_inputs_in_its_own_errors() -> None:
    """Validating without the loader also keeps values out of the message."""
    data = with_client(client_secret=12345678901)

    with pytest.raises(ValidationError) as info:
        Config.model_validate(data, context={"environ": ENVIRON})
    assert "12345678901" not in str(info.value)


def test_repr_and_str_of_a_loaded_config_hide_every_secret(tmp_path: Path) -> None:
    """Env, file, literal and dev issuer secrets never appear in repr or str."""
    path = tmp_path / "files-secret"
    path.write_text("file-secret-value\n")
    data = minimal()
    data["clients"]["files"] = {
        **data["clients"]["chat"],
        "client_secret": {"file": str(path)},
    }
    data["clients"]["legacy"] = {
        **data["clients"]["chat"],
        "client_secret": "literal-secret-value",
    }
    data["dev_issuer"] = {"clients": {"m2m-demo": {"secret": "dev-secret-value"}}}
    result = loaded(data)
    hidden = [SECRET, "file-secret-value", "literal-secret-value", "dev-secret-value"]

    for view in (repr(result), str(result), repr(result.config), str(result.config)):
        for secret in hidden:
            assert secret not in view


# The file as a whole


@pytest.mark.parametrize("text", ["", "   \n", "# only a comment\n", "---\n", "~\n"])
def test_empty_file_is_refused(text: str) -> None:
    """A file with no settings says so."""
    assert refused(text, "the file is empty").key_path == "(top level)"


@pytest.mark.parametrize("text", ["- a\n- b\n", "just text\n", "42\n"])
def test_top_level_must_be_a_mapping(text: str) -> None:
    """A list or scalar at the top is refused."""
    refused(text, "the top level must be a mapping")


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("clients:\n  chat: [unclosed\n", "line 3, column 1"),
        ("clients:\n\tchat: {}\n", "line 2, column 1"),
        ("a: b: c\n", "line 1, column 5"),
        ('a: "unterminated\n', "line 2, column 1"),
        ("a: *nowhere\n", "line 1, column 4"),
    ],
)
def test_invalid_yaml_names_line_and_column(text: str, where: str) -> None:
    """YAML syntax errors give the line and column."""
    refused(text, f"not valid YAML: .*\\({where}\\)")


def test_several_documents_are_refused() -> None:
    """A config file is one YAML document."""
    refused(MINIMAL + "---\nlog: {}\n", "not valid YAML: but found another document")


def test_load_reads_the_file(tmp_path: Path) -> None:
    """load() reads the path and records it."""
    path = tmp_path / "broker.yaml"
    path.write_text(MINIMAL)

    result = load(path, ENVIRON)
    assert result.path == str(path)
    assert "chat" in result.config.clients


def test_load_reports_a_missing_file(tmp_path: Path) -> None:
    """A missing file is a ConfigError naming it."""
    path = tmp_path / "nope.yaml"

    with pytest.raises(ConfigError, match="cannot read the file: No such file") as info:
        load(path, ENVIRON)
    assert info.value.file == str(path)


def test_load_reports_a_directory(tmp_path: Path) -> None:
    """A directory is not a config file."""
    with pytest.raises(ConfigError, match="cannot read the file"):
        load(tmp_path, ENVIRON)


def test_load_reports_non_utf8(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 are refused."""
    path = tmp_path / "broker.yaml"
    path.write_bytes(b"log: {level: \xff}\n")

    with pytest.raises(ConfigError, match="not UTF-8"):
        load(path, ENVIRON)


def test_load_refuses_an_endless_file() -> None:
    """A path that never ends, such as /dev/zero, is cut off, not read forever."""
    with pytest.raises(ConfigError, match="the file is larger than"):
        load("/dev/zero", ENVIRON)


def test_errors_render_file_path_and_reason() -> None:
    """str(ConfigError) is FILE: KEY.PATH: REASON."""
    error = refused(with_client(required="maybe"), "true or false")

    assert str(error) == f"{NAME}: clients.chat.required: expected true or false"


# Hostile input


BILLION_LAUGHS = "\n".join(
    [
        "a: &a [x, x, x, x, x, x, x, x, x, x]",
        *(
            f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]"
            for i in range(8)
        ),
    ]
)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (
            "x: !!python/object/apply:os.system [echo hi]\n",
            "the tag !!python/object/apply:os.system is not allowed",
        ),
        ("x: !!python/name:os.system ''\n", "tag !!python/name:os.system is not"),
        ("x: !custom 1\n", "tag !custom is not allowed"),
        ("x: &a [*a]\n", "an alias refers to what contains it"),
        ("x: &a {y: *a}\n", "an alias refers to what contains it"),
        (BILLION_LAUGHS, "expands past its size limit"),
        ("x: " + "[" * 100 + "]" * 100 + "\n", "nested more than 64"),
        ("x: " + "[" * 5000 + "]" * 5000 + "\n", "nested more than 64"),
        ("x: " + "9" * 5000 + "\n", "cannot be read as a number"),
        ("refresh: {before: 0000-01-01}\n", "cannot be read as a date"),
        ("refresh: {before: 2021-02-30}\n", "cannot be read as a date"),
        (MINIMAL + "x: !!binary 'a'\n", "cannot be read as base64 data"),
        ("? [a, b]\n: 1\n", "a key must be text"),
        ("? {a: 1}\n: 1\n", "a key must be text"),
        ("~: 1\n", "reads as null"),
        ("1.5: 1\n", "reads as a number"),
        ("2020-01-01: 1\n", "reads as a date"),
        ("x:\n  <<: 5\n", "<< merges a mapping"),
        ("x: \x00\n", "character #x0000 is not allowed"),
        ("x: \x1b[31m\n", "character #x001b is not allowed"),
        ("x: !!set {a, b}\n", "unknown key"),
        ("x: !!omap [a: 1]\n", "unknown key"),
        ("\ufeffx: 1\n", "unknown key"),
        ("environments: !!str\n", "expected a mapping"),
        ("environments: {prod: !!null ''}\n", "expected a mapping"),
    ],
)
def test_hostile_yaml_raises_only_config_error(text: str, match: str) -> None:
    """Tags, alias bombs, deep nesting and odd keys all end in a ConfigError."""
    refused(text, match)


def test_huge_numbers_are_refused_not_crashed_on() -> None:
    """Numbers too large for a float are range errors."""
    refused(MINIMAL + f"refresh: {{at: 1{'0' * 400}}}\n", "the number is too large")
    refused(MINIMAL + f"refresh: {{timeout: 1{'0' * 400}}}\n", "too large")
    refused(
        MINIMAL + f"listen: {{http: {{host: 127.0.0.1, port: 1{'0' * 400}}}}}\n",
        "the number is too large",
    )


# Sanity rules added after a review


@pytest.mark.parametrize("value", ["no", "yes", 0, 1, "on"])
def test_booleans_are_true_or_false_only(value: object) -> None:
    """``required: no`` or ``0`` is refused rather than guessed."""
    error = refused(with_client(required=value), "expected true or false")

    assert error.key_path == "clients.chat.required"


@pytest.mark.parametrize("value", ["true", "False"])
def test_interpolated_booleans_are_read(value: str) -> None:
    """``true``/``false`` as text (from ${VAR}) are booleans."""
    chat = config(with_client(required=value)).clients["chat"]

    assert chat.required is (value.lower() == "true")


def test_permanent_backoff_below_max_is_refused() -> None:
    """A zero permanent backoff would retry a refused secret in a loop."""
    error = refused(
        with_section("refresh", {"backoff": {"permanent": 0}}),
        "permanent must be at least max",
    )

    assert error.key_path == "refresh.backoff"


def test_min_interval_has_a_floor() -> None:
    """min_interval below one second is refused."""
    error = refused(with_section("refresh", {"min_interval": "100ms"}), "at least 1")

    assert error.key_path == "refresh.min_interval"


def test_a_ca_bundle_that_is_not_pem_is_refused(tmp_path: Path) -> None:
    """A CA file that holds no certificate fails at load, not at run time."""
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    text = MINIMAL.replace(
        'prod: {token_url: "https://auth.example.com/oauth2/token"}',
        'prod: {token_url: "https://auth.example.com/oauth2/token", ca_file: ca.pem}',
    )
    (tmp_path / "broker.yaml").write_text(text)

    with pytest.raises(ConfigError, match="no usable PEM certificate") as caught:
        load(tmp_path / "broker.yaml", ENVIRON)
    assert caught.value.key_path == "environments.prod.ca_file"


def test_socket_directory_must_exist(tmp_path: Path) -> None:
    """A socket in a missing directory is a config error, not a start failure."""
    error = refused(
        with_section("listen", {"unix": str(tmp_path / "no" / "b.sock")}),
        "does not exist",
    )

    assert error.key_path == "listen.unix"


def test_relative_socket_path_starts_at_the_config_directory(tmp_path: Path) -> None:
    """``unix: b.sock`` lands next to the config file, whatever the cwd."""
    (tmp_path / "broker.yaml").write_text(MINIMAL + "listen: {unix: b.sock}\n")

    result = load(tmp_path / "broker.yaml", ENVIRON)

    assert result.config.listen.unix == str(tmp_path / "b.sock")


def test_an_unquoted_decimal_sink_mode_is_refused(tmp_path: Path) -> None:
    """``mode: 400`` would be read as decimal (0620); it must be quoted."""
    text = MINIMAL.replace(
        "    client_id: m2m-chat\n",
        f"    client_id: m2m-chat\n    sinks: [{{path: {tmp_path}/t, mode: 400}}]\n",
    )

    error = refused(text, "write it in quotes")

    assert error.key_path == "clients.chat.sinks[0].mode"
    quoted = config(text.replace("mode: 400", 'mode: "0400"'))
    assert quoted.clients["chat"].sinks[0].mode == 0o400


def test_an_issuer_identifier_has_no_query() -> None:
    """RFC 8414: an issuer with ?query is refused (it may carry a key)."""
    error = refused(
        with_section(
            "environments", {"prod": {"issuer": "https://a.example.com/?api_key=x"}}
        ),
        "no \\?query",
    )

    assert error.key_path == "environments.prod.issuer"
    assert "api_key" not in str(error)


def test_the_socket_group_is_resolved_by_name() -> None:
    """unix_group takes a group name (resolved now) or a number."""
    by_name = config(with_section("listen", {"unix_group": "root"}))
    by_number = config(with_section("listen", {"unix_group": 1}))

    assert by_name.listen.unix_group == 0
    assert by_number.listen.unix_group == 1
    error = refused(with_section("listen", {"unix_group": "no-such-group"}), "no group")
    assert error.key_path == "listen.unix_group"


def test_a_socket_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    """A world-writable directory without the sticky bit fails the config."""
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)

    error = refused(
        with_section("listen", {"unix": str(open_dir / "b.sock")}), "no sticky bit"
    )

    assert error.key_path == "listen.unix"


def test_a_shared_socket_directory_is_accepted_when_declared(tmp_path: Path) -> None:
    """unix_shared_dir: true accepts such a directory (a Kubernetes emptyDir)."""
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    listen = {"unix_shared_dir": True, "unix": str(open_dir / "b.sock")}

    assert config(with_section("listen", listen)).listen.unix_shared_dir is True


@pytest.mark.parametrize(
    ("guard", "key_path", "reason"),
    [
        ({"header": "Authorization"}, "listen.guard.header", "standard HTTP header"),
        ({"header": "host"}, "listen.guard.header", "standard HTTP header"),
        ({"header": "Token Broker"}, "listen.guard.header", "pattern"),
        ({"header": ""}, "listen.guard.header", "pattern"),
        ({"hosts": ["broker.local:8181"]}, "listen.guard.hosts", "no port"),
        ({"hosts": ["http://broker.local"]}, "listen.guard.hosts", "no port"),
        ({"http": "yes"}, "listen.guard.http", "true or false"),
        ({"cors": True}, "listen.guard.cors", "unknown key"),
    ],
)
def test_bad_guard_settings_are_refused(
    guard: dict[str, Any], key_path: str, reason: str
) -> None:
    """The guard's header must be a name of its own; hosts are bare names."""
    error = refused(with_section("listen", {"guard": guard}), reason)

    assert error.key_path == key_path


def test_guard_settings_are_read() -> None:
    """A renamed header, optional on TCP, required on the socket, extra hosts."""
    guard = {"header": "X-Local", "http": False, "unix": True, "hosts": ["B.Local"]}

    read = config(with_section("listen", {"guard": guard})).listen.guard

    assert (read.header, read.http, read.unix, read.hosts) == (
        "X-Local",
        False,
        True,
        ("b.local",),
    )


@pytest.mark.parametrize(
    ("limits", "key_path"),
    [
        ({"connections": 0}, "listen.limits.connections"),
        ({"header_bytes": 100}, "listen.limits.header_bytes"),
        ({"headers": 1000}, "listen.limits.headers"),
        ({"idle_timeout": "0s"}, "listen.limits.idle_timeout"),
        ({"rate": 0}, "listen.limits.rate"),
        ({"rate": True}, "listen.limits.rate"),
        ({"burst": 0}, "listen.limits.burst"),
    ],
)
def test_bad_limits_are_refused(limits: dict[str, Any], key_path: str) -> None:
    """Limits that would refuse everything (or nothing sensible) are errors."""
    error = refused(
        with_section("listen", {"limits": limits}), "must be|expected a number"
    )

    assert error.key_path == key_path


def test_the_rate_limit_can_be_turned_off() -> None:
    """rate: null serves callers at any rate."""
    listen = config(with_section("listen", {"limits": {"rate": None}})).listen

    assert listen.limits.rate is None
    assert listen.limits.connections == 1024


def test_quit_callers_and_audit_are_read() -> None:
    """quit_callers takes the callers shape; audit_interval is at least 1s."""
    data = with_section("listen", {"quit_callers": {"uids": ["root"]}})
    data["audit"] = True
    data["audit_interval"] = "5m"

    read = config(data)

    assert read.listen.quit_callers is not None
    assert read.listen.quit_callers.uids == (0,)
    assert (read.audit, read.audit_interval) == (True, 300.0)
    error = refused({**minimal(), "audit_interval": "500ms"}, "must be at least 1")
    assert error.key_path == "audit_interval"


def test_a_token_file_may_not_overwrite_a_file_the_broker_reads(
    tmp_path: Path,
) -> None:
    """A sink at the client's own secret file (or the config) is refused."""
    secret = tmp_path / "secret"
    secret.write_text("s3cr3t-value\n")
    for target in (secret, tmp_path / "broker.yaml"):
        text = MINIMAL.replace(
            "    client_id: m2m-chat\n",
            f"    client_id: m2m-chat\n    sinks: [{{path: {target}}}]\n",
        ).replace("{env: CHAT_SECRET}", "{file: secret}")
        (tmp_path / "broker.yaml").write_text(text)

        with pytest.raises(ConfigError, match="a file the broker reads") as caught:
            load(tmp_path / "broker.yaml", {**ENVIRON})
        assert caught.value.key_path == "clients.chat.sinks[0].path"


def test_durations_are_at_most_a_year() -> None:
    """An absurd duration is refused rather than overflowing a timer."""
    error = refused(with_section("refresh", {"timeout": 10**300}), "too large")

    assert error.key_path == "refresh.timeout"
    assert config(with_section("refresh", {"default_lifetime": "366d"}))
