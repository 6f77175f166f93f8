"""Random and mutated config files: a loaded config or a ConfigError, never more.

Whatever text reaches :func:`broker.loader.load_text`, it ends in a
:class:`Loaded` or a :class:`ConfigError` naming the file and a key path;
and a secret written anywhere it belongs, or almost belongs, shows in no
error and in no ``repr`` of what was loaded.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import shutil
import tempfile
import traceback
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from broker.config import Config
from broker.errors import ConfigError
from broker.loader import MAX_DEPTH, MAX_NODES, Loaded, load, load_text
from tests.pki import make_pki

# Deterministic for CI: the same examples on every run, no example database.
FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

CHAT_SECRET = "chat-Secret-9fK2"
ENVIRON = {
    "CHAT_SECRET": CHAT_SECRET,
    "MODELS_SECRET": "models-Secret-4hQ7",
    "EMPTY": "",
    "PORT": "8181",
    "FLAG": "true",
    "WAIT": "5m",
    "URL": "https://auth.example.com/token",
}
SCHEMA_KEYS = sorted(
    {
        *Config.model_fields,
        "http", "unix", "unix_mode", "metrics", "drain_timeout", "at", "before",
        "jitter", "margin", "default_lifetime", "min_interval", "timeout",
        "backoff", "initial", "max", "permanent", "token_url", "issuer",
        "ca_file", "environment", "client_id", "client_secret", "scopes", "auth",
        "encoding", "audience", "resource", "params", "required", "private_key",
        "signing_alg", "key_id", "client_cert", "cert", "key", "sinks", "path",
        "format", "mode", "owner", "variable", "level", "secret", "public_key",
        "token_lifetime", "tls", "env", "file", "chat", "prod",
    }
)  # fmt: skip
MISSPELT_SECRET_KEYS = (
    "client_secert", "clientSecret", "client-secret", "secret", "password",
    "client_secret_", "Client_Secret", "value",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Files:
    """A short directory holding everything a config with file secrets names."""

    folder: Path
    name: str


@pytest.fixture(scope="module")
def files() -> Iterator[Files]:
    """A secret file, a CA, certificates and keys, and where the config lives."""
    folder = Path(tempfile.mkdtemp(prefix="tb-fz-", dir="/tmp"))
    make_pki(folder)  # ca.pem, client-*.pem, server-*.pem
    (folder / "secret.txt").write_text("file-Secret-2bN8\n")
    yield Files(folder, str(folder / "broker.yaml"))
    shutil.rmtree(folder, ignore_errors=True)


def env_config(folder: Path) -> dict[str, Any]:
    """A valid config using every section, secrets from the environment."""
    return {
        "listen": {
            "http": "127.0.0.1:0",
            "unix": f"{folder}/b.sock",
            "unix_mode": "0660",
            "metrics": "127.0.0.1:0",
            "drain_timeout": "5s",
        },
        "refresh": {
            "at": 0.8,
            "before": "5m",
            "jitter": 0.1,
            "margin": "10s",
            "default_lifetime": "10m",
            "min_interval": "5s",
            "timeout": "10s",
            "backoff": {"initial": "1s", "max": "2m", "permanent": "1h30m"},
        },
        "environments": {
            "prod": {"token_url": "https://auth.example.com/oauth2/token"},
            "local": {"issuer": "http://127.0.0.1:8180"},
        },
        "clients": {
            "chat": {
                "environment": "prod",
                "client_id": "m2m-chat",
                "client_secret": {"env": "CHAT_SECRET"},
                "scopes": ["chat:invoke", "chat:read"],
                "auth": "client_secret_basic",
                "encoding": "form",
                "audience": "https://api.example.com",
                "resource": ["https://api.example.com/v1"],
                "params": {"tenant": "t1"},
                "required": True,
                "refresh": {"at": 0.5, "backoff": {"initial": "2s"}},
                "sinks": [{"path": "chat.token", "format": "env", "mode": "0600"}],
                "on_refresh": ["/bin/true", "chat"],
            },
            "models": {
                "environment": "local",
                "client_id": "${MODELS_ID:-m2m-models}",
                "client_secret": "${MODELS_SECRET}",
                "auth": "client_secret_post",
                "encoding": "json",
                "required": "${REQUIRED:-false}",
            },
        },
        "log": {"level": "debug", "format": "json"},
        "watch_config": "250ms",
        "exit_when_file_exists": "stop-now",
    }


def file_config(folder: Path) -> dict[str, Any]:
    """A valid config whose secrets, keys and certificates are files."""
    return {
        "listen": {"http": "[::1]:0", "unix": None, "metrics": None},
        "environments": {
            "prod": {
                "token_url": "https://auth.example.com/oauth2/token",
                "ca_file": "ca.pem",
            },
        },
        "clients": {
            "chat": {
                "environment": "prod",
                "client_id": "m2m-chat",
                "client_secret": {"file": "secret.txt"},
            },
            "keys": {
                "environment": "prod",
                "client_id": "m2m-keys",
                "auth": "private_key_jwt",
                "private_key": {"file": "client-key.pem"},
                "signing_alg": "ES256",
                "key_id": "k1",
                "assertion_audience": "https://auth.example.com",
            },
            "mtls": {
                "environment": "prod",
                "client_id": "m2m-mtls",
                "auth": "tls_client_auth",
                "client_cert": {"cert": "client-cert.pem", "key": "client-key.pem"},
            },
        },
        "dev_issuer": {
            "listen": "localhost:0",
            "token_lifetime": "1h",
            "audience": "dev",
            "tls": {"cert": f"{folder}/server-cert.pem", "key": "server-key.pem"},
            "clients": {
                "m2m-chat": {"secret": "dev-Secret-6pW3", "scopes": ["a"]},
                "m2m-keys": {"public_key": "client-cert.pem"},
            },
        },
    }


def base(files: Files, which: str) -> dict[str, Any]:
    """One of the valid starting points, fresh for each mutation."""
    return env_config(files.folder) if which == "env" else file_config(files.folder)


# The two properties.


def outcome(
    text: str, name: str, environ: Mapping[str, str] = ENVIRON
) -> Loaded | ConfigError:
    """Load ``text``; return the result or the ConfigError, checked for form.

    Any other exception propagates and fails the test.
    """
    try:
        return load_text(text, name, environ)
    except ConfigError as caught:
        error = caught

    assert error.file == name
    assert all(isinstance(part, str | int) for part in error.path)
    assert isinstance(error.key_path, str)
    assert error.key_path
    assert isinstance(error.reason, str)
    assert error.reason.strip()
    assert str(error) == f"{name}: {error.key_path}: {error.reason}"
    assert error.__cause__ is None
    assert error.__context__ is None or error.__suppress_context__

    return error


def reference(text: str) -> Any:
    """What PyYAML alone reads from ``text``, or None when it cannot.

    PyYAML on its own fails in more ways than YAMLError on explicit tags
    (``!!bool null`` is a KeyError), which is why the loader checks first.
    """
    failures = (
        yaml.YAMLError,
        RecursionError,
        ArithmeticError,
        LookupError,
        ValueError,
        AttributeError,
    )
    try:
        return yaml.safe_load(text)
    except failures:
        return None


def check_path(error: ConfigError, document: Any) -> None:
    """In a document that is a mapping, an error names a key path into it.

    Every part but the last is in the document (the last may name a missing
    key or a default); only a nesting too deep to parse has no path.
    """
    if not isinstance(document, dict) or "levels deep" in error.reason:
        return
    assert error.path, f"no key path for {error}"

    node: Any = document
    for part in error.path[:-1]:
        if not _holds(node, part):
            pytest.fail(f"{error.key_path} leaves the document at {part!r}")
        node = node[part]


def _holds(node: Any, part: str | int) -> bool:
    if isinstance(node, list):
        return isinstance(part, int) and 0 <= part < len(node)
    return isinstance(node, dict) and part in node


def loaded_views(result: Loaded) -> Iterator[str]:
    """``str`` and ``repr`` of the result and of every object inside it."""
    yield str(result)
    yield repr(result)
    yield repr(result.warnings)
    for value in _objects(result.config):
        yield repr(value)
        yield str(value)


def _objects(value: object) -> Iterator[object]:
    """Every model, dataclass and container reachable from ``value``."""
    if isinstance(value, BaseModel):
        children = [getattr(value, key) for key in type(value).model_fields]
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        children = [getattr(value, item.name) for item in dataclasses.fields(value)]
    elif isinstance(value, dict):
        children = [*value.keys(), *value.values()]
    elif isinstance(value, list | tuple):
        children = list(value)
    else:
        # Plain text and numbers are the values themselves, not a view of them;
        # a Secret is checked through its own repr and str.
        if not isinstance(value, str | int | float | bool | type(None)):
            yield value
        return

    yield value
    for child in children:
        yield from _objects(child)


def error_views(error: ConfigError) -> Iterator[str]:
    """Everything an error shows: message, repr, reason, path, traceback."""
    yield str(error)
    yield repr(error)
    yield error.reason
    yield error.key_path
    yield "".join(traceback.format_exception(error))


# Strategies: values.

HOSTS = (
    "127.0.0.1", "127.1.2.3", "localhost", "LOCALHOST", "[::1]", "::1", "[::1",
    "0.0.0.0", "auth.example.com", "192.0.2.10", "[2001:db8::1]", "", " ", "ü.example",
)  # fmt: skip
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**63, max_value=10**400),
    st.floats(),
    st.text(max_size=20),
    st.sampled_from(["", "0", "0660", "0o660", "1e309", "-1", "true", "yes", "~"]),
)
keys = st.one_of(st.sampled_from(SCHEMA_KEYS), st.text(max_size=12))
trees = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(keys, children, max_size=5),
    ),
    max_leaves=25,
)
durations = st.one_of(
    st.lists(
        st.tuples(
            st.text("0123456789.-+e ", max_size=6),
            st.sampled_from(["", "ms", "s", "m", "h", "d", "w", "S", " "]),
        ),
        max_size=4,
    ).map(lambda parts: "".join(number + unit for number, unit in parts)),
    st.floats(),
    st.integers(),
)
urls = st.builds(
    "{}{}{}{}{}{}{}".format,
    st.sampled_from(["https://", "http://", "HTTPS://", "ftp://", "", "https:/"]),
    st.sampled_from(["", "user:pw@", "@"]),
    st.sampled_from(HOSTS) | st.text(max_size=10),
    st.sampled_from(["", ":443", ":0", ":65536", ":99999", ":-1", ":x", ":"]),
    st.sampled_from(["", "/", "/oauth2/token", "/a b"]) | st.text(max_size=8),
    st.sampled_from(["", "?a=b", "?"]),
    st.sampled_from(["", "#f", "#"]),
)
modes = st.one_of(
    st.integers(min_value=-10, max_value=5000),
    st.from_regex(r"(0o|0|0x)?[0-9]{0,5}", fullmatch=True),
    st.text(max_size=6),
)
scope_lists = st.one_of(
    st.lists(st.text(max_size=10) | st.sampled_from(["a", "a b", 'q"'])),
    st.text(max_size=20),
)
host_ports = st.builds(
    "{}{}{}".format,
    st.sampled_from(HOSTS) | st.text(max_size=8),
    st.sampled_from([":", "", "::", " : "]),
    st.sampled_from(["0", "8181", "65535", "65536", "00080", "-1", "٣", ""])
    | st.text("0123456789", max_size=7),
)
variable_names = st.sampled_from([*ENVIRON, "UNSET", "1BAD", "", "A-B"])
templates = st.builds(
    "{}{}{}".format,
    st.text(max_size=5),
    st.one_of(
        variable_names.map("${{{}}}".format),
        st.tuples(variable_names, st.text(max_size=8)).map(
            lambda pair: f"${{{pair[0]}:-{pair[1]}}}"
        ),
        st.sampled_from(["$$", "${", "$", "$${X}", "${X:-${Y}}", "${}", "${A:B}"]),
    ),
    st.text(max_size=5),
)
huge = st.one_of(
    st.integers(min_value=10**18, max_value=10**4000),
    st.integers(max_value=-(10**18)),
    st.sampled_from([float("inf"), float("-inf"), float("nan"), 1e308, 2**64]),
    st.integers(min_value=300, max_value=4400).map(lambda digits: "9" * digits),
)
field_values = st.one_of(durations, urls, modes, scope_lists, host_ports, templates)
YAML_TAGS = (
    "!!str", "!!int", "!!float", "!!bool", "!!null", "!!binary", "!!timestamp",
    "!!set", "!!omap", "!!pairs", "!!seq", "!!map", "!custom", "!<tag:x,2024:y>",
    "!!python/object/apply:os.system", "!!python/name:builtins.print",
)  # fmt: skip


# Strategies: documents.

Draw = Callable[[st.SearchStrategy[Any]], Any]
OPERATIONS = (
    "delete", "retype", "unknown", "swap", "share", "field", "template", "huge",
    "deep",
)  # fmt: skip


def _slots(document: Any) -> list[tuple[Any, Any]]:
    """Every ``(container, key)`` that holds a value, shared ones once each."""
    found: list[tuple[Any, Any]] = []
    seen: set[int] = set()
    pending = [document]
    while pending:
        node = pending.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            found.append((node, key))
            if isinstance(value, dict | list):
                pending.append(value)

    return found


def _contains(value: Any, target: Any) -> bool:
    """True when ``target`` is ``value`` or inside it (a share would loop)."""
    if value is target:
        return True
    children = value.values() if isinstance(value, dict) else value
    if isinstance(value, dict | list):
        return any(_contains(child, target) for child in children)
    return False


def _nest(value: Any, depth: int, as_list: bool) -> Any:
    for _ in range(depth):
        value = [value] if as_list else {"x": value}
    return value


def mutate(draw: Draw, document: dict[str, Any]) -> None:
    """Apply one random operation to a random place in ``document``."""
    slots = _slots(document)
    if not slots:
        document[draw(keys)] = draw(trees)
        return
    operation = draw(st.sampled_from(OPERATIONS))
    parent, key = draw(st.sampled_from(slots))

    if operation == "delete":
        del parent[key]
    elif operation == "unknown":
        target = parent if isinstance(parent, dict) else document
        target[draw(keys)] = draw(trees)
    elif operation in ("swap", "share"):
        other_parent, other_key = draw(st.sampled_from(slots))
        other = other_parent[other_key]
        if operation == "swap":
            mine = copy.deepcopy(parent[key])
            parent[key] = copy.deepcopy(other)
            other_parent[other_key] = mine
        elif not _contains(other, parent):
            parent[key] = other  # the same object twice: an anchor and an alias
    elif operation == "deep":
        depth = draw(st.integers(min_value=1, max_value=MAX_DEPTH + 8))
        parent[key] = _nest(parent[key], depth, draw(st.booleans()))
    else:
        strategy = {
            "retype": trees,
            "field": field_values,
            "template": templates,
            "huge": huge,
        }[operation]
        parent[key] = draw(strategy)


KEY_LINE = re.compile(r"^(\s*-?\s*)([^\s:#][^:#]*):(\s|$)")


def mutate_text(draw: Draw, text: str) -> str:
    """Edit YAML text: repeat a key, add a tag, an anchor or a merge, cut, insert."""
    lines = text.splitlines()
    keyed = [index for index, line in enumerate(lines) if KEY_LINE.match(line)]
    edit = draw(
        st.sampled_from(["duplicate", "tag", "anchor", "merge", "cut", "insert"])
    )

    if edit in ("duplicate", "tag", "anchor", "merge") and keyed:
        index = draw(st.sampled_from(keyed))
        line = lines[index]
        if edit == "duplicate":
            indent = _indent(line)
            copy_of = " " * len(indent) + line[len(indent) :]
            lines.insert(index + 1, copy_of)
        elif edit == "tag":
            tag = draw(st.sampled_from(YAML_TAGS))
            lines[index] = line.replace(":", f": {tag}", 1)
        elif edit == "anchor":
            other = draw(st.sampled_from(keyed))
            lines[index] = line.replace(":", ": &a", 1)
            head = lines[other].split(":", 1)[0]
            lines[other] = f"{head}: *a"
        else:
            indent = _indent(line)
            target = draw(st.sampled_from(["*a", "[*a]", "{}", "1", "[1]"]))
            lines.insert(index, " " * len(indent) + f"<<: {target}")
        return "\n".join(lines) + "\n"

    position = draw(st.integers(min_value=0, max_value=len(text)))
    if edit == "cut":
        return text[:position]
    filler: str = draw(
        st.text(max_size=4) | st.sampled_from(["\t", ": ", "- ", "{", "&"])
    )
    return text[:position] + filler + text[position:]


def _indent(line: str) -> str:
    """The part before a key: spaces, or spaces and a list dash."""
    match = KEY_LINE.match(line)
    return match.group(1) if match else ""


@st.composite
def mutated(draw: st.DrawFn, start: dict[str, Any]) -> tuple[str, Any]:
    """A valid config after random edits; returns the text and its data."""
    document = copy.deepcopy(start)
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        mutate(draw, document)
    text = yaml.safe_dump(
        document,
        sort_keys=False,
        allow_unicode=draw(st.booleans()),
        default_flow_style=draw(st.sampled_from([False, None, True])),
    )
    for _ in range(draw(st.integers(min_value=0, max_value=2))):
        text = mutate_text(draw, text)

    return text, document


# Property: every input ends in a Loaded or a ConfigError.


def test_the_valid_starting_points_load(files: Files) -> None:
    """Both configs the mutations start from load as they are."""
    kinds = {}
    for which in ("env", "file"):
        text = yaml.safe_dump(base(files, which), sort_keys=False)
        source = load_text(text, files.name, ENVIRON).config.clients["chat"]
        assert source.client_secret is not None
        kinds[which] = source.client_secret.kind

    assert kinds == {"env": "env", "file": "file"}


@FUZZ
@given(
    text=st.one_of(
        st.text(),
        st.text(st.sampled_from(":-[]{}&*!|>'\"%@`#,?<= \n\t$\\0aZ")),
        st.binary().map(lambda data: data.decode("utf-8", "replace")),
        st.binary().map(lambda data: data.decode("utf-8", "surrogateescape")),
        st.binary().map(lambda data: data.decode("latin-1")),
    )
)
def test_arbitrary_text_loads_or_names_the_problem(files: Files, text: str) -> None:
    """Any text at all gives a Loaded or a ConfigError with a key path."""
    result = outcome(text, files.name)

    if isinstance(result, ConfigError):
        check_path(result, reference(text))


@FUZZ
@given(data=st.binary(max_size=200))
def test_arbitrary_bytes_in_a_file_load_or_name_the_problem(
    files: Files, data: bytes
) -> None:
    """Reading any bytes from disk gives a Loaded or a ConfigError for the file."""
    path = files.folder / "fuzz.yaml"
    path.write_bytes(data)

    try:
        load(path, ENVIRON)
    except ConfigError as caught:
        assert caught.file == str(path)  # noqa: PT017 - only some bytes fail
        assert isinstance(caught.key_path, str)  # noqa: PT017


@FUZZ
@given(
    document=st.dictionaries(keys, trees, max_size=6),
    flow=st.sampled_from([False, None, True]),
)
def test_arbitrary_yaml_documents_load_or_name_the_key(
    files: Files, document: dict[str, Any], flow: bool | None
) -> None:
    """A random YAML mapping gives a Loaded or a ConfigError with a real path."""
    text = yaml.safe_dump(document, default_flow_style=flow, allow_unicode=True)

    result = outcome(text, files.name)

    # Checked against what PyYAML reads back: the dumper writes some characters
    # (such as U+0085) that a reader folds into a space.
    if isinstance(result, ConfigError):
        check_path(result, reference(text))


@FUZZ
@given(tree=trees)
def test_any_yaml_value_at_the_top_loads_or_names_the_problem(
    files: Files, tree: Any
) -> None:
    """A top level that is a list, a scalar or a map gives a ConfigError, not more."""
    result = outcome(yaml.safe_dump(tree), files.name)

    if not isinstance(tree, dict):
        assert isinstance(result, ConfigError)
        assert result.path == ()


@settings(FUZZ, max_examples=300)
@given(which=st.sampled_from(["env", "file"]), data=st.data())
def test_mutated_configs_load_or_name_the_key(
    files: Files, which: str, data: st.DataObject
) -> None:
    """A valid config after random edits still ends in Loaded or a ConfigError."""
    text, _ = data.draw(mutated(base(files, which)))

    result = outcome(text, files.name)

    if isinstance(result, ConfigError):
        check_path(result, reference(text))


TAGGED_VALUES = (
    "0.8", '""', "abc", "0b", "0x", "1:", "1:x", "-", "+", "_", ".", "~", "",
    "2001-13-45", "2001-01-01T25:00:00", "1e999", "09", "0o8", "[]", "{}", "[1]",
    "{a: 1}", "AAAA", "!!!", "ü", "1_000", "0660",
)  # fmt: skip


@FUZZ
@given(
    which=st.sampled_from(["env", "file"]),
    tag=st.sampled_from(YAML_TAGS),
    value=st.sampled_from(TAGGED_VALUES) | st.text(max_size=6),
    data=st.data(),
)
def test_explicit_tags_load_or_name_the_key(
    files: Files, which: str, tag: str, value: str, data: st.DataObject
) -> None:
    """A value given any tag, readable or not, ends in Loaded or a ConfigError."""
    lines = yaml.safe_dump(base(files, which), sort_keys=False).splitlines()
    keyed = [index for index, line in enumerate(lines) if KEY_LINE.match(line)]
    index = data.draw(st.sampled_from(keyed))
    head = lines[index].split(":", 1)[0]
    lines[index] = f"{head}: {tag} {value}"

    result = outcome("\n".join(lines) + "\n", files.name)

    if isinstance(result, ConfigError) and "cannot be read as" in result.reason:
        assert result.path[-1] == head.strip(" -")


@pytest.mark.parametrize("merged", ["1", "[1]", "[{a: 1}, x]", "null", "[[]]"])
def test_a_merge_of_anything_but_mappings_names_its_key(merged: str) -> None:
    """``<<`` on a scalar or a list of scalars is refused at the key holding it."""
    text = f"clients:\n  chat:\n    <<: {merged}\n"

    with pytest.raises(ConfigError, match="<< merges a mapping") as info:
        load_text(text, "broker.yaml", ENVIRON)

    assert info.value.key_path == "clients.chat"


def _mappings(node: Any, path: tuple[str | int, ...]) -> Iterator[tuple[Any, ...]]:
    """The path of every mapping in ``node``, with ``node``'s own first."""
    if isinstance(node, dict):
        yield path
        for key, value in node.items():
            yield from _mappings(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _mappings(value, (*path, index))


# Mappings whose keys are names the user picks, and the {env:}/{file:} forms.
NAMED = (("environments",), ("clients",), ("dev_issuer", "clients"))
SPECS = ("params", "client_secret", "private_key")


def test_an_unknown_key_lists_the_keys_allowed_in_every_section(files: Files) -> None:
    """In every section, a stray key is named and the allowed keys listed."""
    checked = 0
    for which in ("env", "file"):
        start = base(files, which)
        for path in _mappings(start, ()):
            if path in NAMED or (path and path[-1] in SPECS):
                continue
            document = copy.deepcopy(start)
            target: Any = document
            for part in path:
                target = target[part]
            target["zz_stray"] = 1

            with pytest.raises(
                ConfigError, match="unknown key; allowed here: "
            ) as info:
                load_text(yaml.safe_dump(document), files.name, ENVIRON)

            assert info.value.path == (*path, "zz_stray")
            checked += 1

    assert checked >= 20


@settings(FUZZ, max_examples=25)
@given(
    depth=st.integers(min_value=1, max_value=9),
    width=st.integers(min_value=1, max_value=9),
)
def test_alias_expansion_is_bounded(files: Files, depth: int, width: int) -> None:
    """Aliases that expand past the node limit are refused at their key."""
    lines = ["a0: &a0 [x]"]
    for level in range(1, depth + 1):
        refs = ", ".join([f"*a{level - 1}"] * width)
        lines.append(f"a{level}: &a{level} [{refs}]")
    text = "\n".join(lines) + "\n"

    result = outcome(text, files.name)

    assert isinstance(result, ConfigError)
    if width**depth > MAX_NODES:
        assert "expands past its size limit" in result.reason
    elif "expands past its size limit" not in result.reason:
        assert result.key_path == "a0"
        assert result.reason.startswith("unknown key")


# Property: a secret shows nowhere.

secrets = st.text(
    st.sampled_from("abcdefghijkLMNOPQRSTUVWXYZ0123456789._~+/=:%@!-"),
    min_size=12,
    max_size=40,
).map(lambda text: "Sx" + text)
# The secret is valid where these put it: if the config loads, chat holds it.
VALID = ("literal", "env", "interpolated", "default", "dev_issuer")
# These are always wrong, whatever else the document holds.
REFUSED = (
    "control", "env_control", "env_surrogate", "misspelt_key", "misplaced_key",
    "list", "extra_key", "nested",
)  # fmt: skip
WRONG_AUTH = ("wrong_auth",)


def _mapping_at(parent: dict[str, Any], key: str) -> dict[str, Any]:
    """``parent[key]``, made a mapping if a mutation left something else."""
    value = parent.get(key)
    if not isinstance(value, dict):
        value = parent[key] = {}
    return value


def place(
    draw: Draw, document: dict[str, Any], placement: str, secret: str
) -> dict[str, str]:
    """Write ``secret`` into ``document``; return the environment to load with."""
    environ = dict(ENVIRON)
    chat = _mapping_at(_mapping_at(document, "clients"), "chat")

    if placement == "literal":
        chat["client_secret"] = secret
    elif placement in ("env", "env_control", "env_surrogate"):
        # A variable read from a non-UTF-8 environment holds lone surrogates.
        suffix = {"env": "", "env_control": "\x1b[0m", "env_surrogate": "\udcff"}
        environ["FUZZ_SECRET"] = secret + suffix[placement]
        chat["client_secret"] = {"env": "FUZZ_SECRET"}
    elif placement == "interpolated":
        environ["FUZZ_SECRET"] = secret
        chat["client_secret"] = "${FUZZ_SECRET}"
    elif placement == "default":
        chat["client_secret"] = f"${{UNSET_SECRET:-{secret}}}"
    elif placement == "dev_issuer":
        document["dev_issuer"] = {"clients": {"m2m-chat": {"secret": secret}}}
    elif placement == "control":
        control = draw(st.sampled_from(["\x00", "\x07", "\t", "\r", "\n\n", "\x7f"]))
        chat["client_secret"] = secret + control
    elif placement == "misspelt_key":
        chat[draw(st.sampled_from(MISSPELT_SECRET_KEYS))] = secret
    elif placement == "misplaced_key":
        where = draw(st.sampled_from(["environments", "refresh", "listen", "log"]))
        _mapping_at(document, where)["client_secret"] = secret
    elif placement == "list":
        chat["client_secret"] = draw(
            st.sampled_from([[secret], [[secret]], [{"value": secret}]])
        )
    elif placement == "extra_key":
        extra = draw(st.sampled_from(["literal", "value", "file", "env2"]))
        chat["client_secret"] = {"env": "CHAT_SECRET", extra: secret}
    elif placement == "nested":
        chat["client_secret"] = {draw(st.sampled_from(["literal", "text"])): secret}
    else:
        chat["client_secret"] = secret
        chat["auth"] = draw(st.sampled_from(["private_key_jwt", "tls_client_auth"]))

    return environ


@settings(FUZZ, max_examples=300)
@given(
    which=st.sampled_from(["env", "file"]),
    placement=st.sampled_from([*VALID, *REFUSED, *WRONG_AUTH]),
    secret=secrets,
    edits=st.integers(min_value=0, max_value=3),
    data=st.data(),
)
def test_a_secret_shows_in_no_error_and_no_repr(
    files: Files,
    which: str,
    placement: str,
    secret: str,
    edits: int,
    data: st.DataObject,
) -> None:
    """Wherever the secret is written, no error and no repr of the config shows it."""
    document = base(files, which)
    for _ in range(edits):
        mutate(data.draw, document)
    environ = place(data.draw, document, placement, secret)
    text = yaml.safe_dump(document, sort_keys=False, allow_unicode=True)

    result = outcome(text, files.name, environ)

    if isinstance(result, ConfigError):
        views = list(error_views(result))
    else:
        assert placement in VALID, f"{placement} loaded"
        views = list(loaded_views(result))
        config = result.config
        if placement == "dev_issuer":
            assert config.dev_issuer is not None
            assert config.dev_issuer.clients["m2m-chat"].secret == secret
        else:
            source = config.clients["chat"].client_secret
            assert source is not None
            assert source.read().reveal() == secret
    assert views
    for view in views:
        assert secret not in view


def test_a_secret_from_a_non_utf8_environment_is_refused() -> None:
    """An env secret with undecodable bytes fails the load, not the first request."""
    text = yaml.safe_dump(
        {
            "environments": {"prod": {"token_url": "https://auth.example.com/t"}},
            "clients": {
                "chat": {
                    "environment": "prod",
                    "client_id": "m2m-chat",
                    "client_secret": {"env": "FUZZ_SECRET"},
                }
            },
        }
    )

    with pytest.raises(ConfigError, match="not valid UTF-8") as info:
        load_text(text, "broker.yaml", {"FUZZ_SECRET": "abc\udcffdef"})

    assert info.value.key_path == "clients.chat.client_secret"
    assert "abc" not in str(info.value)
