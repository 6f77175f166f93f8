"""Per-client callers: uids and gids from peer credentials, and caller keys."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import structlog

from broker.callers import (
    Caller,
    CallerKey,
    Callers,
    Peer,
    match,
    matching_key,
    peer_of,
    read_keys,
)
from broker.config import Config
from broker.errors import ConfigError
from broker.loader import load_text
from broker.redact import redact

KEY_A = "a" * 16 + "-first-key"
KEY_B = "b" * 16 + "-second-key"


def key_file(directory: Path, name: str, *keys: str) -> Path:
    path = directory / name
    path.write_text("".join(f"{key}\n" for key in keys))
    return path


def callers(directory: Path, **fields: object) -> Callers:
    return Callers.model_validate(fields, context={"base_dir": str(directory)})


def unix(uid: int, gid: int, *groups: int, bearer: str | None = None) -> Caller:
    return Caller("unix", Peer(4242, uid, gid, frozenset(groups)), bearer)


def test_a_listed_uid_is_let_in_and_named(workdir: Path) -> None:
    """A socket caller whose uid is listed passes, labelled by that uid."""
    allowed = callers(workdir, uids=[1000, 1001])

    assert match(allowed, unix(1001, 50)) == "uid:1001"
    assert match(allowed, unix(1002, 50)) is None


def test_a_listed_group_matches_primary_or_supplementary(workdir: Path) -> None:
    """gids match the caller's primary group or any supplementary one."""
    allowed = callers(workdir, gids=[700])

    assert match(allowed, unix(1, 700)) == "gid:700"
    assert match(allowed, unix(1, 5, 9, 700)) == "gid:700"
    assert match(allowed, unix(1, 5, 9)) is None


def test_a_tcp_caller_has_no_uid_to_match(workdir: Path) -> None:
    """Over TCP there are no peer credentials: uids and gids never match."""
    allowed = callers(workdir, uids=[0], gids=[0])

    assert match(allowed, Caller("tcp", None, None)) is None


def test_caller_keys_match_by_file_and_are_named(workdir: Path) -> None:
    """A key from any of the client's files lets the caller in, named by file."""
    key_file(workdir, "billing", KEY_A)
    key_file(workdir, "reports.key", KEY_B)
    allowed = callers(
        workdir, keys=[{"file": "billing"}, {"name": "rep", "file": "reports.key"}]
    )

    assert match(allowed, Caller("tcp", None, KEY_A)) == "key:billing"
    assert match(allowed, Caller("tcp", None, KEY_B)) == "key:rep"
    assert match(allowed, Caller("tcp", None, KEY_A + "x")) is None
    assert match(allowed, Caller("tcp", None, "")) is None


def test_a_wrong_key_is_refused_even_for_an_allowed_uid(workdir: Path) -> None:
    """A caller that sends a key must send a right one: a typo never hides."""
    key_file(workdir, "k", KEY_A)
    allowed = callers(workdir, uids=[1000], keys=[{"file": "k"}])

    assert match(allowed, unix(1000, 1000)) == "uid:1000"
    assert match(allowed, unix(1000, 1000, bearer=KEY_B)) is None
    assert match(allowed, unix(1000, 1000, bearer=KEY_A)) == "key:k"


def test_every_line_of_a_key_file_is_a_key(workdir: Path) -> None:
    """Old and new key both work while a rotation is under way."""
    path = key_file(workdir, "k", KEY_A, KEY_B)
    keys = (CallerKey(file=str(path)),)

    assert matching_key(keys, KEY_A) == "k"
    assert matching_key(keys, KEY_B) == "k"


def test_a_rotated_key_file_is_read_again(workdir: Path) -> None:
    """A key replaced in its file works at once and the old one stops."""
    path = key_file(workdir, "k", KEY_A)
    keys = (CallerKey(file=str(path)),)
    assert matching_key(keys, KEY_A) == "k"

    replacement = key_file(workdir, "k.new", KEY_B)
    os.replace(replacement, path)

    assert matching_key(keys, KEY_B) == "k"
    assert matching_key(keys, KEY_A) is None


def test_a_vanished_key_file_lets_nobody_in_and_says_so(workdir: Path) -> None:
    """Fail closed: without its file a key is refused, with one warning."""
    path = key_file(workdir, "k", KEY_A)
    keys = (CallerKey(file=str(path)),)
    path.unlink()

    with structlog.testing.capture_logs() as logs:
        assert matching_key(keys, KEY_A) is None
        assert matching_key(keys, KEY_A) is None

    warnings = [e for e in logs if e["event"] == "callers.keys_unusable"]
    assert len(warnings) == 1
    assert KEY_A not in repr(logs)

    key_file(workdir, "k", KEY_A)
    assert matching_key(keys, KEY_A) == "k"


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("", "holds no key"),
        ("\n\n", "holds no key"),
        ("short-key\n", "16 or more"),
        ("has a space in it!\n", "no spaces"),
        ("tab\tinside-the-key-ok\n", "visible ASCII"),
        ("non-ascii-кириллица-key\n", "visible ASCII"),
    ],
)
def test_unusable_key_files_are_refused_without_quoting(
    workdir: Path, content: str, reason: str
) -> None:
    """A bad key file is a config error that never shows the key."""
    path = workdir / "k"
    path.write_text(content)

    with pytest.raises(ValueError, match=reason) as caught:
        read_keys(str(path))

    if content.strip():
        assert content.strip() not in str(caught.value)


def test_a_byte_order_mark_is_not_part_of_the_key(workdir: Path) -> None:
    """An editor's BOM before the first key is dropped; CRLF lines work."""
    path = workdir / "k"
    path.write_bytes(b"\xef\xbb\xbf" + KEY_A.encode() + b"\r\n" + KEY_B.encode())

    assert read_keys(str(path)) == (KEY_A, KEY_B)


def test_a_key_read_is_masked_in_any_log_line(workdir: Path) -> None:
    """Once read, a key is masked by value, whatever its characters: a log
    line quoting a raw request cannot show it."""
    odd = "Odd!Caller#Key%QQQQ=7777"
    read_keys(str(key_file(workdir, "k", odd)))

    cleaned = redact(None, "error", {"event": f"b'Authorization: Bearer {odd}\\r'"})

    assert odd not in str(cleaned)


def test_a_caller_never_shows_its_key() -> None:
    """repr of a Caller (in a traceback, say) leaves the key out."""
    assert KEY_A not in repr(Caller("tcp", None, KEY_A))


def test_a_key_file_made_unreadable_is_read_again(workdir: Path) -> None:
    """chmod changes only the file's ctime: that is enough to read it again
    (and, for a broker not running as root, to fail closed)."""
    path = key_file(workdir, "k", KEY_A)
    keys = (CallerKey(file=str(path)),)
    assert matching_key(keys, KEY_A) == "k"

    with structlog.testing.capture_logs() as logs:
        path.chmod(0o400)
        assert matching_key(keys, KEY_A) == "k"
        assert matching_key(keys, KEY_A) == "k"

    assert [e["event"] for e in logs] == ["callers.keys_reloaded"]


def test_callers_in_a_config_file(workdir: Path) -> None:
    """callers: resolves user and group names and key paths from the file."""
    key_file(workdir, "billing.key", KEY_A)
    text = _config(
        "callers: {uids: [root, 1000], gids: ['0'], keys: [{file: billing.key}]}"
    )

    spec = _load(workdir, text).clients["chat"].callers

    assert spec is not None
    assert spec.uids == (0, 1000)
    assert spec.gids == (0,)
    assert spec.keys[0].name == "billing"
    assert spec.keys[0].file == str(workdir / "billing.key")
    assert spec.describe() == (
        f"uid 0, uid 1000, gid 0, key billing ({workdir / 'billing.key'})"
    )


@pytest.mark.parametrize(
    ("callers_yaml", "path", "reason"),
    [
        ("{}", "clients.chat.callers", "names nobody"),
        ("{uids: [no-such-user-xyz]}", "clients.chat.callers.uids", "no user"),
        ("{gids: [no-such-group-xyz]}", "clients.chat.callers.gids", "no group"),
        ("{uids: 1000}", "clients.chat.callers.uids", "list"),
        ("{uids: [-1]}", "clients.chat.callers.uids", "name or number"),
        ("{keys: [{file: missing}]}", "clients.chat.callers.keys[0].file", "cannot"),
        ("{keys: [{file: k, name: 'a b'}]}", "clients.chat.callers.keys[0].name", ""),
        (
            "{keys: [{file: k}, {file: k}]}",
            "clients.chat.callers",
            "same name",
        ),
        (
            "{keys: [{file: k}]}\n  other:\n    environment: dev\n    client_id: o\n"
            "    client_secret: {env: NOPE}\n    callers: {keys: [{file: sub/k}]}",
            "clients.other.callers.keys[0].name",
            "a name of its own",
        ),
        ("{people: [1]}", "clients.chat.callers.people", ""),
    ],
)
def test_bad_callers_name_the_key_path(
    workdir: Path, callers_yaml: str, path: str, reason: str
) -> None:
    """Every mistake in callers is a ConfigError with its key path."""
    key_file(workdir, "k", KEY_A)
    (workdir / "sub").mkdir()
    key_file(workdir / "sub", "k", KEY_B)

    with pytest.raises(ConfigError) as caught:
        _load(workdir, _config(f"callers: {callers_yaml}"))

    assert caught.value.key_path == path
    assert reason in str(caught.value)


def test_peer_credentials_come_from_the_kernel() -> None:
    """SO_PEERCRED reports this very process on a socket pair."""
    left, right = socket.socketpair(socket.AF_UNIX)
    with left, right:
        peer = peer_of(left)

    assert peer is not None
    assert (peer.pid, peer.uid, peer.gid) == (os.getpid(), os.getuid(), os.getgid())
    assert peer.groups == frozenset(os.getgroups())


def test_a_tcp_socket_has_no_peer_credentials() -> None:
    """peer_of answers None for anything but a Unix socket."""
    with (
        socket.create_server(("127.0.0.1", 0)) as server,
        socket.create_connection(server.getsockname()) as client,
    ):
        assert peer_of(client) is None
    assert peer_of(None) is None


def _load(directory: Path, text: str) -> Config:
    return load_text(text, str(directory / "broker.yaml"), {"NOPE": "x"}).config


def _config(client_extra: str) -> str:
    return f"""
environments:
  dev: {{token_url: "http://127.0.0.1:1/token"}}
clients:
  chat:
    environment: dev
    client_id: c
    client_secret: {{env: NOPE}}
    {client_extra}
"""
