"""Read a config file: YAML without duplicate keys, ``${VAR}``, validation.

Every failure becomes one :class:`ConfigError` naming the file, the key path
and the reason, and nothing else escapes. The error chains no other exception,
and no message quotes the value at a secret key, since that value may be the
secret itself.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from broker.config import Config, HostPort
from broker.errors import ConfigError

KeyPath = list[str | int]

MAX_FILE_BYTES = 16 * 1024 * 1024
# Aliases let a few lines expand to billions of nodes; count them expanded.
MAX_NODES = 200_000
MAX_DEPTH = 64

_YAML = "tag:yaml.org,2002:"
_KIND_OF_TAG = {
    f"{_YAML}int": "a number",
    f"{_YAML}float": "a number",
    f"{_YAML}bool": "true or false",
    f"{_YAML}null": "null",
    f"{_YAML}timestamp": "a date",
    f"{_YAML}binary": "base64 data",
}
# YAML 1.1 reads 0660 as octal but 660 as decimal; a mode must be written so
# that the reader of the file and the broker agree on its value.
_OCTAL_KEYS = {("listen", "unix_mode")}


def _is_mode(path: KeyPath) -> bool:
    """``listen.unix_mode`` and every ``clients.*.sinks[*].mode``."""
    key = tuple(path)
    if key in _OCTAL_KEYS:
        return True
    return (
        len(key) == 5 and key[0] == "clients" and key[2] == "sinks" and key[4] == "mode"
    )


_OCTAL_INT = re.compile(r"0[0-7]+")
_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$\{")

_PLAIN_WORDS = {
    "string_type": "expected text (put numbers, dates and true/false in quotes)",
    "tuple_type": "expected a list, such as [a, b]",
    "list_type": "expected a list, such as [a, b]",
    "set_type": "expected a list, such as [a, b]",
    "dict_type": "expected a mapping of keys",
    "model_type": "expected a mapping of keys",
    "model_attributes_type": "expected a mapping of keys",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "int_type": "expected a whole number",
    "int_parsing": "expected a whole number",
    "int_from_float": "expected a whole number",
    "int_parsing_size": "the number is too large",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "finite_number": "expected a finite number",
    "missing": "required key is missing",
    "string_too_short": "must not be empty",
    "too_short": "needs at least one entry",
}
_BOUNDS = {
    "greater_than": ("gt", "must be more than"),
    "greater_than_equal": ("ge", "must be at least"),
    "less_than": ("lt", "must be less than"),
    "less_than_equal": ("le", "must be at most"),
}


@dataclass(frozen=True)
class Loaded:
    """A validated config and what deserves a warning at start.

    ``warnings`` holds ``(kind, client)`` pairs; the only kind is
    ``literal_secret``.
    """

    config: Config
    path: str
    warnings: tuple[tuple[str, str], ...] = field(default=())


def load(path: str | os.PathLike[str], environ: Mapping[str, str]) -> Loaded:
    """Load and validate ``path``, interpolating from ``environ``.

    Raises :class:`ConfigError` for any problem; nothing else escapes.
    """
    name = os.fspath(path)
    try:
        with open(name, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(name, [], f"cannot read the file: {exc.strerror}") from None

    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(name, [], f"the file is larger than {MAX_FILE_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(name, [], "the file is not UTF-8 text") from None

    return load_text(text, name, environ)


def load_text(text: str, name: str, environ: Mapping[str, str]) -> Loaded:
    """Validate config ``text`` that came from the file ``name``.

    Relative paths in it are resolved against the directory of ``name``.
    Raises :class:`ConfigError` for any problem; nothing else escapes.
    """
    data = parse_yaml(text, name)
    if data is None:
        raise ConfigError(name, [], "the file is empty")
    if not isinstance(data, dict):
        raise ConfigError(name, [], "the top level must be a mapping of keys")

    data = interpolate(data, name, environ, [])
    config = _validate(data, name, environ)
    _check_references(config, name)
    warnings = tuple(
        ("literal_secret", client)
        for client, spec in config.clients.items()
        if spec.client_secret is not None and spec.client_secret.kind == "literal"
    )

    return Loaded(config, name, warnings)


def _validate(data: dict[str, Any], name: str, environ: Mapping[str, str]) -> Config:
    context = {"environ": environ, "base_dir": str(Path(name).resolve().parent)}
    try:
        config = Config.model_validate(data, context=context)
    except ValidationError as exc:
        failure = _from_validation(exc, name, data)
    else:
        return config

    # Raised outside the handler, so the ValidationError (which holds the
    # input, secrets included) is not kept as the error's __context__.
    raise failure


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader whose node tree is checked before any object is built."""


def parse_yaml(text: str, name: str) -> Any:
    """Parse one YAML document, refusing what a config file must not hold.

    Duplicate keys, keys that are not text, unknown tags, aliases that loop
    or expand past ``MAX_NODES`` and nesting past ``MAX_DEPTH`` raise
    :class:`ConfigError` with the key path and line.
    """
    loader: _StrictLoader | None = None
    try:
        loader = _StrictLoader(text)
        node = loader.get_single_node()
        if node is None:
            return None
        _NodeCheck(loader, name).visit(node, [], 0)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        failure = ConfigError(name, [], f"not valid YAML: {_yaml_problem(exc, text)}")
    except RecursionError:
        failure = ConfigError(name, [], f"nested more than {MAX_DEPTH} levels deep")
    finally:
        if loader is not None:
            loader.dispose()

    raise failure


def _yaml_problem(exc: yaml.YAMLError, text: str) -> str:
    if isinstance(exc, yaml.reader.ReaderError):
        line = text.count("\n", 0, exc.position) + 1
        return f"character #x{exc.character:04x} is not allowed (line {line})"
    if isinstance(exc, yaml.MarkedYAMLError):
        problem = exc.problem or exc.context or "unreadable"
        mark = exc.problem_mark or exc.context_mark
        if mark is not None:
            return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
        return problem

    return "the parser gave up"


class _NodeCheck:
    """Walk the composed node tree, with aliases expanded, before construction."""

    def __init__(self, loader: _StrictLoader, name: str) -> None:
        self.loader = loader
        self.name = name
        self.count = 0
        self.open: set[int] = set()

    def visit(self, node: yaml.Node, path: KeyPath, depth: int) -> None:
        """Check ``node`` at ``path`` and everything under it."""
        self.count += 1
        if self.count > MAX_NODES:
            raise self.error(path, node, "the file expands past its size limit")
        if depth > MAX_DEPTH:
            raise self.error(path, node, f"nested more than {MAX_DEPTH} levels")
        if node.tag not in self.loader.yaml_constructors:
            raise self.error(path, node, f"the tag {_kind(node.tag)} is not allowed")

        if isinstance(node, yaml.ScalarNode):
            self.scalar(node, path)
            return
        if id(node) in self.open:
            raise self.error(path, node, "an alias refers to what contains it")
        self.open.add(id(node))
        if isinstance(node, yaml.MappingNode):
            self.mapping(node, path, depth)
        else:
            for index, item in enumerate(node.value):
                self.visit(item, [*path, index], depth + 1)
        self.open.discard(id(node))

    def mapping(self, node: yaml.MappingNode, path: KeyPath, depth: int) -> None:
        """Refuse a key given twice; merged (``<<``) keys may be overridden."""
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == f"{_YAML}merge":
                self.merge(value_node, path)
                self.visit(value_node, path, depth + 1)
                continue

            key = self.key(key_node, path)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(
                    self.name,
                    [*path, key],
                    f"duplicate key (lines {seen[key]} and {line})",
                )
            seen[key] = line
            self.visit(value_node, [*path, key], depth + 1)

    def merge(self, node: yaml.Node, path: KeyPath) -> None:
        """``<<`` takes a mapping or a list of mappings, nothing else."""
        items = node.value if isinstance(node, yaml.SequenceNode) else [node]
        if not all(isinstance(item, yaml.MappingNode) for item in items):
            raise self.error(path, node, "<< merges a mapping or a list of mappings")

    def key(self, node: yaml.Node, path: KeyPath) -> str:
        """Return a mapping key, which must be plain text."""
        if not isinstance(node, yaml.ScalarNode):
            raise self.error(path, node, "a key must be text, not a list or mapping")
        if node.tag != f"{_YAML}str":
            raise self.error(
                [*path, node.value],
                node,
                f"this key reads as {_kind(node.tag)}; put it in quotes",
            )

        return str(node.value)

    def scalar(self, node: yaml.ScalarNode, path: KeyPath) -> None:
        """Build the value now, so a bad one is reported at its key."""
        octal = _is_mode(path) and node.tag == f"{_YAML}int"
        if octal and not _OCTAL_INT.fullmatch(node.value):
            raise self.error(
                path, node, 'a mode is octal; write it in quotes, such as "0660"'
            )

        try:
            self.loader.construct_object(node)
        # PyYAML's constructors assume the resolver chose the tag; on an explicit
        # one (!!bool 0.8, !!int "", !!timestamp x) they fail with whatever the
        # parsing code hits: KeyError, IndexError, AttributeError.
        except (
            ValueError,
            OverflowError,
            LookupError,
            AttributeError,
            yaml.YAMLError,
        ):
            raise self.error(
                path, node, f"cannot be read as {_kind(node.tag)}"
            ) from None

    def error(self, path: KeyPath, node: yaml.Node, reason: str) -> ConfigError:
        """Return an error at ``path`` that gives the node's line."""
        return ConfigError(
            self.name, path, f"{reason} (line {node.start_mark.line + 1})"
        )


def _kind(tag: str) -> str:
    """Name a YAML tag the way a reader of the file knows it."""
    if tag in _KIND_OF_TAG:
        return _KIND_OF_TAG[tag]
    return "!!" + tag.removeprefix(_YAML) if tag.startswith(_YAML) else tag


def interpolate(
    value: Any, name: str, environ: Mapping[str, str], path: KeyPath
) -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in every string value.

    Interpolation runs after parsing, so a variable can never add YAML
    structure, and a substituted value is not scanned again. ``$$`` writes a
    literal ``$``; the default applies when the variable is unset or empty.
    Keys are never interpolated.
    """
    if isinstance(value, dict):
        return {
            key: interpolate(item, name, environ, [*path, key])
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [
            interpolate(item, name, environ, [*path, index])
            for index, item in enumerate(value)
        ]
    if not isinstance(value, str) or "$" not in value:
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        var, default = match.group(1), match.group(2)
        if var is None:
            raise ConfigError(
                name,
                path,
                "malformed ${...}: write ${NAME} or ${NAME:-default}, "
                "and $${ for a literal ${",
            )
        if environ.get(var):
            return environ[var]
        if default is not None:
            return default
        if var in environ:
            return ""
        raise ConfigError(
            name, path, f"environment variable {var} is not set and has no default"
        )

    return _VAR.sub(substitute, value)


def _from_validation(
    exc: ValidationError, name: str, data: dict[str, Any] | None
) -> ConfigError:
    errors = exc.errors(include_input=False, include_url=False)
    # An unknown key is often a misspelt one, which pydantic also reports as
    # missing; the unknown key (with its suggestion) is the better lead.
    unknown = [error for error in errors if error["type"] == "extra_forbidden"]
    error = (unknown or errors)[0]
    path = _key_path(error["loc"], data)
    if error["type"] == "extra_forbidden":
        return ConfigError(name, path, _unknown_key(path))

    return ConfigError(name, path, _reason(error))


def _key_path(loc: tuple[int | str, ...], data: Any) -> KeyPath:
    """Keep the parts of pydantic's ``loc`` that are keys of the file.

    The rest (union members, validator names) would only confuse a reader. A
    last part missing from the data is kept: it names a missing key.
    """
    path: KeyPath = []
    for index, part in enumerate(loc):
        last = index == len(loc) - 1
        if data is None or (isinstance(data, dict) and last):
            path.append(part)
        elif _has(data, part):
            path.append(part)
            data = data[part]

    return path


def _has(data: Any, part: int | str) -> bool:
    if isinstance(data, dict):
        return part in data
    return isinstance(data, list) and isinstance(part, int) and part < len(data)


def _reason(error: ErrorDetails) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    if kind == "literal_error":
        return f"expected {ctx['expected']}"
    if kind in _BOUNDS:
        bound, words = _BOUNDS[kind]
        return f"{words} {ctx[bound]}"

    return _PLAIN_WORDS.get(kind, str(error["msg"]))


def _unknown_key(path: KeyPath) -> str:
    allowed = _allowed_keys(Config, path[:-1])
    if not allowed:
        return "unknown key"
    close = difflib.get_close_matches(str(path[-1]), allowed, n=1)
    hint = f"did you mean {close[0]}? " if close else ""

    return f"unknown key; {hint}allowed here: {', '.join(allowed)}"


def _allowed_keys(model: type[BaseModel], path: KeyPath) -> list[str]:
    """Walk the schema along ``path`` and list the keys the mapping may have."""
    current: Any = model
    skip_key = False
    for part in path:
        if skip_key:
            skip_key = False
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        if str(part) not in current.model_fields:
            return []
        # Resolved here: a field naming a model defined later in its module
        # (Client.sinks) keeps a forward reference in model_fields.
        current, skip_key = _model_of(get_type_hints(current)[str(part)])

    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _model_of(annotation: Any) -> tuple[Any, bool]:
    """Find the model inside ``X | None``, ``dict[str, X]`` or ``tuple[X, ...]``.

    The flag says the next part of a key path (a name, an index) is skipped.
    """
    origin = getattr(annotation, "__origin__", None)
    args: tuple[Any, ...] = getattr(annotation, "__args__", ())
    if origin is dict and len(args) == 2:
        return args[1], True
    if origin in (tuple, list) and args:
        return args[0], True
    for arg in args:
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg, False

    return annotation, False


def _check_references(config: Config, name: str) -> None:
    """Check what spans keys: environment names, merged policies, addresses."""
    for client, spec in config.clients.items():
        if spec.environment not in config.environments:
            known = ", ".join(sorted(config.environments))
            raise ConfigError(
                name,
                ["clients", client, "environment"],
                f"environment {spec.environment!r} is not defined (defined: {known})",
            )
        try:
            config.policy(client)
        except ValidationError as exc:
            inner = _from_validation(exc, name, None)
        else:
            continue
        raise ConfigError(
            name, ["clients", client, "refresh", *inner.path], inner.reason
        )

    _check_addresses(config, name)
    _check_sink_targets(config, name)
    _check_key_names(config, name)


def _check_key_names(config: Config, name: str) -> None:
    """A caller key's name is its holder's identity in rate limits, the
    audit and the metrics: one name, one key file, across all clients."""
    holders: dict[str, tuple[str, str]] = {}
    for client, spec in config.clients.items():
        keys = spec.callers.keys if spec.callers else ()
        for index, key in enumerate(keys):
            first = holders.setdefault(key.name, (os.path.realpath(key.file), client))
            if first[0] != os.path.realpath(key.file):
                raise ConfigError(
                    name,
                    ["clients", client, "callers", "keys", index, "name"],
                    f"client {first[1]} has a caller key named {key.name!r} in "
                    "another file; give each key holder a name of its own",
                )


def _check_sink_targets(config: Config, name: str) -> None:
    """A token file must not overwrite a file the broker itself reads."""
    read = {os.path.realpath(name): "the config file"}
    for environment, env in config.environments.items():
        if env.ca_file:
            read[os.path.realpath(env.ca_file)] = f"environments.{environment}"
    for client, spec in config.clients.items():
        sources = [spec.private_key]
        if spec.client_cert is not None:
            sources += [spec.client_cert.cert, spec.client_cert.key]
        paths = [source.path for source in sources if source is not None]
        if spec.client_secret is not None and spec.client_secret.kind == "file":
            paths.append(spec.client_secret.name)
        for path in paths:
            read[os.path.realpath(path)] = f"clients.{client}"

    for client, spec in config.clients.items():
        for index, sink in enumerate(spec.sinks):
            owner = read.get(os.path.realpath(sink.path))
            if owner is not None:
                raise ConfigError(
                    name,
                    ["clients", client, "sinks", index, "path"],
                    f"{sink.path} is a file the broker reads ({owner}); a token "
                    "file there would overwrite it",
                )


def _check_addresses(config: Config, name: str) -> None:
    dev_listen = config.dev_issuer.listen if config.dev_issuer else None
    listeners: list[tuple[str, str, HostPort | None]] = [
        ("listen", "http", config.listen.http),
        ("listen", "metrics", config.listen.metrics),
        ("dev_issuer", "listen", dev_listen),
    ]
    taken: dict[tuple[str, int], str] = {}
    for section, key, address in listeners:
        # Port 0 asks the OS for a free port, so it never collides.
        if address is None or address.port == 0:
            continue
        where = (address.host, address.port)
        if where in taken:
            raise ConfigError(
                name, [section, key], f"{address} is already used by {taken[where]}"
            )
        taken[where] = f"{section}.{key}"
