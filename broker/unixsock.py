"""The Unix socket listener: restrictive from birth, never stolen or leaked."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat

from broker.errors import BrokerError

BACKLOG = 512


class SocketError(BrokerError):
    """The socket path cannot be used; says why."""


Identity = tuple[int, int]


def bind(
    path: str, mode: int, group: int | None = None, shared_dir: bool = False
) -> tuple[socket.socket, Identity]:
    """Listen at ``path`` with ``mode``; return the socket and its identity.

    The umask is narrowed around ``bind`` so the socket never exists with a
    wider mode than owner-only, then widened to ``mode`` (group access at
    most) and given to ``group`` if set. A stale socket of a dead broker is
    replaced; a live one, or any other kind of file, is left alone and
    reported. The directory must not let other users swap the socket,
    unless ``shared_dir`` says its writers are trusted.
    """
    directory = os.path.dirname(os.path.abspath(path))
    check_directory(directory, shared_dir)
    _clear_stale(path)

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    previous = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise SocketError(f"cannot listen on {path}: {exc.strerror}") from None
    finally:
        os.umask(previous)

    try:
        if group is not None:
            os.chown(path, -1, group, follow_symlinks=False)
        os.chmod(path, mode)
    except OSError as exc:
        sock.close()
        os.unlink(path)
        raise SocketError(
            f"cannot set the owner or mode of {path}: {exc.strerror}"
        ) from None
    sock.listen(BACKLOG)
    sock.setblocking(False)

    return sock, _identity(path)


def check_directory(directory: str, shared: bool = False) -> None:
    """Refuse a directory where another user could replace the socket.

    In a world-writable directory without the sticky bit (``/tmp`` has it),
    anyone may delete our socket and put their own, or a symlink, in its
    place; callers would then hand their requests to an impostor. With
    ``shared`` that is accepted: a Kubernetes emptyDir is such a directory,
    but only the pod's own containers can write to it.
    """
    try:
        info = os.stat(directory)
    except FileNotFoundError:
        raise SocketError(
            f"the socket's directory {directory} does not exist"
        ) from None
    if not stat.S_ISDIR(info.st_mode):
        raise SocketError(f"{directory} is not a directory")
    if info.st_mode & stat.S_IWOTH and not info.st_mode & stat.S_ISVTX and not shared:
        raise SocketError(
            f"{directory} is writable by every user and has no sticky bit, so "
            "another user could replace the socket; use a private directory, or "
            "set listen.unix_shared_dir if only trusted processes can write to it"
        )


def remove(path: str, identity: Identity) -> None:
    """Remove ``path`` if it is still the socket we created.

    Called once our listener is closed. The inode number alone could have
    been reused at once by a newer broker's socket, so a socket someone
    still listens on is left alone.
    """
    with contextlib.suppress(FileNotFoundError, SocketError):
        if _identity(path) == identity and not _alive(path):
            os.unlink(path)


def _identity(path: str) -> Identity:
    info = os.lstat(path)
    return (info.st_dev, info.st_ino)


def _clear_stale(path: str) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return

    if stat.S_ISLNK(info.st_mode):
        raise SocketError(f"{path} is a symbolic link; refusing to use it")
    if not stat.S_ISSOCK(info.st_mode):
        raise SocketError(f"{path} exists and is not a socket; refusing to replace it")
    if _alive(path):
        raise SocketError(f"another process is listening on {path}")

    os.unlink(path)


def _alive(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return False
        raise SocketError(f"cannot check {path}: {exc.strerror}") from None
    finally:
        probe.close()

    return True
