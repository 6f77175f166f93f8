"""The Unix socket: restrictive from birth, stale ones replaced, live ones kept."""

from __future__ import annotations

import os
import socket
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker import unixsock


@pytest.fixture
def sockdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="tbs-", dir="/tmp"))
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


def test_socket_has_the_configured_mode(sockdir: Path) -> None:
    """The socket ends with ``unix_mode`` and accepts connections."""
    path = str(sockdir / "b.sock")

    sock, _ = unixsock.bind(path, 0o660)
    try:
        with socket.socket(socket.AF_UNIX) as caller:
            caller.connect(path)
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o660
    finally:
        sock.close()


def test_socket_is_never_wider_than_owner_only_while_binding(
    sockdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At bind time the umask already hides the socket from group and others."""
    path = str(sockdir / "b.sock")
    seen: list[int] = []
    real_bind = socket.socket.bind

    def spy(self: socket.socket, address: str) -> None:
        real_bind(self, address)
        seen.append(stat.S_IMODE(os.lstat(address).st_mode))

    monkeypatch.setattr(socket.socket, "bind", spy)
    sock, _ = unixsock.bind(path, 0o660)
    sock.close()

    assert seen == [0o600]


def test_stale_socket_is_replaced(sockdir: Path) -> None:
    """A socket file left by a dead broker is taken over."""
    path = str(sockdir / "b.sock")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(path)
    dead.close()

    sock, _ = unixsock.bind(path, 0o600)
    sock.close()

    assert stat.S_ISSOCK(os.lstat(path).st_mode)


def test_live_socket_is_not_stolen(sockdir: Path) -> None:
    """A socket someone listens on makes the bind fail with a clear reason."""
    path = str(sockdir / "b.sock")
    live = socket.socket(socket.AF_UNIX)
    live.bind(path)
    live.listen(1)
    accepter = threading.Thread(target=lambda: live.accept()[0].close())
    accepter.start()
    try:
        with pytest.raises(unixsock.SocketError, match="another process is listening"):
            unixsock.bind(path, 0o600)
    finally:
        accepter.join(timeout=5)
        live.close()


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_other_files_are_left_alone(sockdir: Path, kind: str) -> None:
    """A regular file or a symlink at the path is refused, not deleted."""
    path = sockdir / "b.sock"
    if kind == "file":
        path.write_text("precious")
        expected = "is not a socket"
    else:
        path.symlink_to(sockdir / "elsewhere")
        expected = "symbolic link"

    with pytest.raises(unixsock.SocketError, match=expected):
        unixsock.bind(str(path), 0o600)

    assert os.path.lexists(path)


def test_missing_directory_is_reported(sockdir: Path) -> None:
    """A socket in a directory that does not exist fails with its name."""
    with pytest.raises(unixsock.SocketError, match="does not exist"):
        unixsock.bind(str(sockdir / "no" / "b.sock"), 0o600)


def test_remove_only_removes_our_own_socket(sockdir: Path) -> None:
    """At shutdown the socket is removed, unless another broker replaced it."""
    path = str(sockdir / "b.sock")
    sock, identity = unixsock.bind(path, 0o600)
    sock.close()
    os.unlink(path)
    with socket.socket(socket.AF_UNIX) as newer:
        newer.bind(path)
        newer.listen(1)
        unixsock.remove(path, identity)
        assert os.path.exists(path)
    os.unlink(path)
    mine, identity = unixsock.bind(path, 0o600)
    mine.close()
    os.chmod(path, 0o640)  # metadata changes do not make it someone else's
    unixsock.remove(path, identity)

    assert not os.path.exists(path)


def test_a_world_writable_directory_without_sticky_bit_is_refused(
    sockdir: Path,
) -> None:
    """Anyone could replace the socket there: refused with the reason."""
    os.chmod(sockdir, 0o777)  # noqa: S103 - the case under test

    with pytest.raises(unixsock.SocketError, match="no sticky bit"):
        unixsock.bind(str(sockdir / "b.sock"), 0o600)

    os.chmod(sockdir, 0o1777)  # noqa: S103 - like /tmp
    sock, _ = unixsock.bind(str(sockdir / "b.sock"), 0o600)
    sock.close()


def test_the_socket_can_be_given_to_a_group(sockdir: Path) -> None:
    """unix_group hands the socket to a group, keeping the mode."""
    group = 1 if os.geteuid() == 0 else (os.getgroups() or [os.getgid()])[-1]

    sock, _ = unixsock.bind(str(sockdir / "b.sock"), 0o660, group)
    sock.close()

    info = os.lstat(sockdir / "b.sock")
    assert info.st_gid == group
    assert stat.S_IMODE(info.st_mode) == 0o660
