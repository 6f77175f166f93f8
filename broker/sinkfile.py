"""One token file: its content, and replacing it atomically on disk.

A file is replaced by a temp file in the same directory, created with its
final mode, written, flushed to disk and renamed over the path. A reader
opens either the old file or the new one, each whole.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import re
import secrets
import stat

from broker.config import Config, Sink
from broker.errors import BrokerError
from broker.token import Token

# RFC 6750 b64token: safe unquoted in a shell, a systemd or a Docker env file.
_ENV_SAFE = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW


class SinkError(BrokerError):
    """A token file cannot be written; ``key`` is the sink key at fault."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(message)


def render(sink: Sink, token: Token, wall_now: float) -> bytes:
    """The file's content: one line in the sink's format, ending in a newline.

    Raises :class:`SinkError` when the token cannot be written in an env
    file without quoting.
    """
    value = token.value.reveal()
    if sink.format == "json":
        text = json.dumps(
            {
                "access_token": value,
                "token_type": "Bearer",
                "expires_at": token.expires_iso,
                "expires_in": max(0, int(token.expires_wall - wall_now)),
                "scope": token.scope,
            }
        )
    elif sink.format == "header":
        text = f"Authorization: {token.header}"
    elif sink.format == "env":
        if not _ENV_SAFE.fullmatch(value):
            raise SinkError(
                "format",
                "the token holds characters an env file would need quoted; "
                "use format raw or json",
            )
        text = f"{sink.variable}={value}"
    else:
        text = value

    return (text + "\n").encode()


def resolve_owner(owner: str) -> tuple[int, int]:
    """Read ``user``, ``user:group``, ``:group``, ``uid`` or ``uid:gid``.

    Returns ``(uid, gid)``, -1 for the one left unchanged. Raises
    :class:`SinkError` for an unknown name.
    """
    user, sep, group = owner.partition(":")
    if (not user and not group) or (sep and not group):
        raise SinkError("owner", f"{owner!r} is not user, user:group or :group")

    uid = _lookup(user, "user") if user else -1
    gid = _lookup(group, "group") if group else -1

    return uid, gid


def _lookup(name: str, kind: str) -> int:
    if name.isdigit():
        return int(name)
    try:
        if kind == "user":
            return pwd.getpwnam(name).pw_uid
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise SinkError("owner", f"no {kind} named {name!r} on this system") from None


def write_sink(sink: Sink, data: bytes) -> None:
    """Replace ``sink.path`` with ``data`` atomically (blocking).

    Raises :class:`SinkError`; the temp file is removed on any failure.
    """
    _check_target(sink.path)
    owner = resolve_owner(sink.owner) if sink.owner else None
    directory = os.path.dirname(sink.path)
    temp, fd = _create_temp(sink.path, sink.mode)

    try:
        try:
            # Before any byte: a file the owner change fails on holds no token.
            _chown(fd, owner, sink.owner)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp, sink.path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        if isinstance(exc, OSError):
            raise SinkError("path", f"cannot write {sink.path}: {why(exc)}") from None
        raise

    _fsync_directory(directory)


def probe_sink(sink: Sink) -> None:
    """Prove that ``sink`` can be written, without touching its path.

    Creates and removes a temp file beside it, owned as configured. Raises
    :class:`SinkError`.
    """
    _check_target(sink.path)
    owner = resolve_owner(sink.owner) if sink.owner else None
    temp, fd = _create_temp(sink.path, sink.mode)
    try:
        _chown(fd, owner, sink.owner)
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(temp)


def check_sinks(config: Config) -> list[str]:
    """Every reason a sink of ``config`` could not be written, by key path.

    Each entry reads ``clients.NAME.sinks[I].KEY: reason``.
    """
    problems: list[str] = []
    writers: dict[str, str] = {}
    for name, client in config.clients.items():
        for index, sink in enumerate(client.sinks):
            where = f"clients.{name}.sinks[{index}]"
            first = writers.setdefault(sink.path, where)
            if first != where:
                problems.append(f"{where}.path: {sink.path} is also written by {first}")
                continue
            try:
                probe_sink(sink)
            except SinkError as exc:
                problems.append(f"{where}.{exc.key}: {exc.message}")

    return problems


def _check_target(path: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise SinkError("path", f"cannot inspect {path}: {why(exc)}") from None

    if stat.S_ISLNK(mode):
        # rename() would replace the link itself, never write through it.
        raise SinkError(
            "path", f"{path} is a symbolic link; give the path it points to"
        )
    if stat.S_ISDIR(mode):
        raise SinkError("path", f"{path} is a directory")
    if not stat.S_ISREG(mode):
        raise SinkError("path", f"{path} is not a regular file")


def _create_temp(path: str, mode: int) -> tuple[str, int]:
    """Create an empty temp file beside ``path`` with exactly ``mode``.

    The mode is set at creation; the umask can only narrow it, and fchmod
    then restores the configured bits, so it is never wider than ``mode``.
    """
    directory, base = os.path.split(path)
    for _ in range(8):
        temp = os.path.join(directory, f".{base}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(temp, _TEMP_FLAGS, mode)
        except FileExistsError:
            continue
        except OSError as exc:
            raise SinkError(
                "path", f"cannot create a file in {directory}: {why(exc)}"
            ) from None
        try:
            os.fchmod(fd, mode)
        except OSError as exc:
            os.close(fd)
            os.unlink(temp)
            raise SinkError("mode", f"cannot set mode {mode:04o}: {why(exc)}") from None
        return temp, fd

    raise SinkError("path", f"cannot find a free temp name in {directory}")


def _chown(fd: int, owner: tuple[int, int] | None, spec: str | None) -> None:
    if owner is None:
        return
    try:
        os.fchown(fd, *owner)
    except OSError as exc:
        raise SinkError(
            "owner", f"cannot give the file to {spec}: {why(exc)}"
        ) from None


def _fsync_directory(directory: str) -> None:
    # The rename is durable only once the directory entry is on disk.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def why(exc: OSError) -> str:
    """The OS's words for ``exc`` (``Permission denied``)."""
    return exc.strerror or type(exc).__name__
