"""Who may take a client's token: peer credentials and caller keys.

A client with ``callers:`` serves only the callers it names: Unix users and
groups, proven by the kernel through the socket's peer credentials, and
holders of a caller key, sent as ``Authorization: Bearer <key>`` on either
listener. A client without ``callers:`` is open to every local caller that
passes the listener's guard.
"""

from __future__ import annotations

import grp
import hashlib
import hmac
import os
import pwd
import re
import socket
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import structlog
from pydantic import Field, ValidationInfo, field_validator, model_validator

from broker.fields import StrictModel, resolve_path
from broker.redact import remember_secret

log = structlog.get_logger("broker.callers")

# A key shorter than this can be guessed by a local process hammering the
# API; 16 characters of a random token are far beyond that.
MIN_KEY_LENGTH = 16
MAX_KEY_FILE_BYTES = 64 * 1024
# Visible ASCII: what a header carries unchanged, and the log chain masks.
_KEY = re.compile(rf"[\x21-\x7e]{{{MIN_KEY_LENGTH},}}")
# Linux: the peer's supplementary groups (SO_PEERGROUPS, since 4.13).
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_MAX_GROUPS = 256
_CRED = struct.Struct("3i")


class CallerKey(StrictModel):
    """A caller key file: each non-empty line is one valid key.

    Several lines let a rotation add the new key before the callers switch
    to it, then drop the old one.
    """

    name: str = Field("", pattern=r"^[A-Za-z0-9._-]{0,64}$")
    file: str

    @field_validator("file")
    @classmethod
    def _file(cls, value: str, info: ValidationInfo) -> str:
        path = resolve_path(value, info)
        read_keys(path)
        return path

    @model_validator(mode="after")
    def _default_name(self) -> CallerKey:
        if not self.name:
            stem = os.path.basename(self.file).partition(".")[0] or "key"
            object.__setattr__(self, "name", stem[:64])
        return self


class Callers(StrictModel):
    """The allow-list of one client (or of ``POST /v1/quit``)."""

    uids: tuple[int, ...] = ()
    gids: tuple[int, ...] = ()
    keys: tuple[CallerKey, ...] = ()

    @field_validator("uids", mode="before")
    @classmethod
    def _users(cls, value: object) -> object:
        return _ids(value, _uid)

    @field_validator("gids", mode="before")
    @classmethod
    def _groups(cls, value: object) -> object:
        return _ids(value, _gid)

    @model_validator(mode="after")
    def _names_someone(self) -> Callers:
        if not (self.uids or self.gids or self.keys):
            raise ValueError(
                "callers names nobody: give uids, gids or keys, or remove callers "
                "to leave the client open to every local caller"
            )
        names = [key.name for key in self.keys]
        if len(set(names)) != len(names):
            raise ValueError("two caller keys have the same name")
        return self

    def describe(self) -> str:
        """One line for check-config: who is allowed, never a key."""
        parts = [f"uid {uid}" for uid in self.uids]
        parts += [f"gid {gid}" for gid in self.gids]
        parts += [f"key {key.name} ({key.file})" for key in self.keys]
        return ", ".join(parts)


@dataclass(frozen=True)
class Peer:
    """What the kernel says about the process at the other end of a socket."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int] = frozenset()


@dataclass(frozen=True)
class Caller:
    """A request's caller: its peer credentials (Unix socket) and its key."""

    listener: str
    peer: Peer | None
    bearer: str | None = field(default=None, repr=False)

    def describe(self) -> str:
        """Who this is, for a refusal message: never the key."""
        if self.peer is None:
            return "a TCP caller"
        return f"uid {self.peer.uid} (gid {self.peer.gid})"


def peer_of(sock: socket.socket | None) -> Peer | None:
    """The peer credentials of a connected Unix socket, or ``None``.

    Read from the kernel (SO_PEERCRED): they are the connecting process's
    at ``connect`` time and cannot be forged by it.
    """
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size)
    except OSError:
        return None
    pid, uid, gid = _CRED.unpack(raw)

    return Peer(pid, uid, gid, _peer_groups(sock))


def _peer_groups(sock: socket.socket) -> frozenset[int]:
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 4 * _MAX_GROUPS)
    except OSError:
        return frozenset()
    count = len(raw) // 4
    return frozenset(struct.unpack(f"{count}I", raw[: count * 4]))


def match(callers: Callers, caller: Caller) -> str | None:
    """The rule that lets ``caller`` in, as a bounded label, or ``None``.

    A presented key must be valid: a caller that sends a wrong key is
    refused even if its uid would pass, so a typo in a key never hides.
    """
    if caller.bearer is not None:
        name = matching_key(callers.keys, caller.bearer)
        return None if name is None else f"key:{name}"

    peer = caller.peer
    if peer is None:
        return None
    if peer.uid in callers.uids:
        return f"uid:{peer.uid}"
    for gid in callers.gids:
        if gid == peer.gid or gid in peer.groups:
            return f"gid:{gid}"

    return None


def matching_key(keys: Iterable[CallerKey], presented: str) -> str | None:
    """The name of the key file holding ``presented``, compared in constant time.

    Every key is compared, whatever matched earlier, so the time taken does
    not tell which key or how much of one was right.
    """
    digest = _digest(presented)
    found = None
    for key in keys:
        for known in _KEYS.digests(key.file):
            if hmac.compare_digest(digest, known) and found is None:
                found = key.name
    return found


def read_keys(path: str) -> tuple[str, ...]:
    """Read a key file; raise ``ValueError`` (never quoting a key) if unusable."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise ValueError(
            f"cannot read the caller key file {path}: {exc.strerror}"
        ) from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise ValueError(f"the caller key file {path} is too large")
    try:
        # utf-8-sig: an editor's byte-order mark is not part of the first key.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"the caller key file {path} is not UTF-8 text") from None

    keys = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not keys:
        raise ValueError(f"the caller key file {path} holds no key")
    for number, key in enumerate(keys, 1):
        if not _KEY.fullmatch(key):
            raise ValueError(
                f"key {number} in {path} is not a caller key: use {MIN_KEY_LENGTH} "
                "or more visible ASCII characters, no spaces"
            )
        # Any log line that quotes a request (a malformed one, say) shows
        # the key masked.
        remember_secret(key)
    return keys


def _digest(key: str) -> bytes:
    # Digests have one length whatever the key's, so comparing them leaks
    # nothing about the length of a key.
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


class _KeyCache:
    """Key digests per file, re-read when the file changes (rotation)."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[tuple[int, ...], tuple[bytes, ...]]] = {}
        self._failed: set[str] = set()

    def digests(self, path: str) -> tuple[bytes, ...]:
        try:
            info = os.stat(path)
        except OSError:
            return self._unusable(path, "the file cannot be read")
        # ctime too: a chmod or chown that makes the file unreadable
        # changes nothing else, and must not leave its keys working.
        signature = (
            info.st_dev,
            info.st_ino,
            info.st_mtime_ns,
            info.st_ctime_ns,
            info.st_size,
        )

        cached = self._entries.get(path)
        if cached is not None and cached[0] == signature:
            return cached[1]
        try:
            digests = tuple(_digest(key) for key in read_keys(path))
        except ValueError as exc:
            return self._unusable(path, str(exc))
        self._entries[path] = (signature, digests)
        if cached is not None or path in self._failed:
            log.info("callers.keys_reloaded", path=path, keys=len(digests))
        self._failed.discard(path)
        return digests

    def _unusable(self, path: str, why: str) -> tuple[bytes, ...]:
        # Fail closed: a key file that vanished or went bad lets nobody in.
        self._entries.pop(path, None)
        if path not in self._failed:
            log.warning("callers.keys_unusable", path=path, error=why)
            self._failed.add(path)
        return ()


_KEYS = _KeyCache()


def _ids(value: object, resolve: Callable[[object], int]) -> object:
    if not isinstance(value, list | tuple):
        raise ValueError("expected a list of names or numbers")
    return tuple(resolve(item) for item in value)


def _uid(value: object) -> int:
    return _resolve(value, lambda name: pwd.getpwnam(name).pw_uid, "user")


def _gid(value: object) -> int:
    return _resolve(value, lambda name: grp.getgrnam(name).gr_gid, "group")


def _resolve(value: object, lookup: Callable[[str], int], kind: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    if isinstance(value, str) and value:
        try:
            return lookup(value)
        except KeyError:
            raise ValueError(f"there is no {kind} named {value!r}") from None
    raise ValueError(f"expected a {kind} name or number")
