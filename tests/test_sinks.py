"""Token files: content, atomic replacement, modes, owners, health, on_refresh."""

from __future__ import annotations

import asyncio
import json
import os
import random
import stat
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from broker import cli, sinkfile
from broker import sinks as sinks_module
from broker.config import Client, Config, Sink
from broker.loader import load_text
from broker.metrics import Metrics
from broker.secret import Secret
from broker.sinks import ClientSinks, SinkError, SinkWriter, check_sinks
from broker.token import Token
from tests import process

WALL = 1_800_000_000.0
JWT = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ0YiJ9.c2ln"


def make_token(value: str = JWT, lifetime: float = 600.0, wall: float = WALL) -> Token:
    return Token(
        value=Secret(value),
        lifetime=lifetime,
        obtained_at=100.0,
        obtained_wall=wall,
        scope="chat:invoke chat:read",
        margin=10.0,
        refresh_at=100.0 + lifetime * 0.8,
        expires_iso=f"expiry-{value[-6:]}",
    )


def load_config(workdir: Path, client_yaml: str, extra: str = "") -> Config:
    """A config with client ``chat`` (its keys in ``client_yaml``), in workdir."""
    text = f"""
listen: {{http: 127.0.0.1:0, unix: null, metrics: null}}
environments:
  dev: {{token_url: "http://127.0.0.1:9/oauth2/token"}}
clients:
  chat:
    environment: dev
    client_id: chat
    client_secret: {{env: CHAT_SECRET}}
{_indent(client_yaml, 4)}
{extra}
"""
    path = workdir / "broker.yaml"
    path.write_text(text)
    return load_text(text, str(path), {"CHAT_SECRET": "chat-secret-Qx7"}).config


def _indent(text: str, spaces: int) -> str:
    return "\n".join(" " * spaces + line for line in text.strip().splitlines())


def chat(workdir: Path, client_yaml: str) -> Client:
    return load_config(workdir, client_yaml).clients["chat"]


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


@pytest.fixture
def unwritable_dir(workdir: Path) -> Iterator[Path]:
    """A directory this process cannot create files in.

    root ignores permission bits, so as root it is /sys (sysfs refuses new
    files); otherwise a directory without write permission.
    """
    if os.geteuid() == 0:
        probe = Path("/sys/tb-probe")
        try:
            probe.touch()
        except OSError:
            yield Path("/sys")
            return
        probe.unlink()
        pytest.skip("/sys accepts new files here")
    locked = workdir / "locked"
    locked.mkdir(mode=0o500)
    yield locked
    locked.chmod(0o700)


# Content


def test_each_format_is_one_line() -> None:
    """raw, json, header and env each write one newline-terminated line."""
    token = make_token(lifetime=600.0)
    raw = sinkfile.render(Sink(path="/x"), token, WALL)
    header = sinkfile.render(Sink(path="/x", format="header"), token, WALL)
    env = sinkfile.render(
        Sink(path="/x", format="env", variable="CHAT_TOKEN"), token, WALL
    )
    as_json = sinkfile.render(Sink(path="/x", format="json"), token, WALL + 100)

    assert raw == f"{JWT}\n".encode()
    assert header == f"Authorization: Bearer {JWT}\n".encode()
    assert env == f"CHAT_TOKEN={JWT}\n".encode()
    assert as_json.endswith(b"}\n")
    assert as_json.count(b"\n") == 1
    assert json.loads(as_json) == {
        "access_token": JWT,
        "token_type": "Bearer",
        "expires_at": token.expires_iso,
        "expires_in": 500,
        "scope": "chat:invoke chat:read",
    }


def test_env_format_refuses_a_token_a_shell_would_expand() -> None:
    """A token with shell syntax in it is not written as NAME=value."""
    sink = Sink(path="/x", format="env")

    with pytest.raises(SinkError, match="would need quoted") as caught:
        sinkfile.render(sink, make_token("abc$(reboot)"), WALL)

    assert "reboot" not in str(caught.value)


# Atomic replacement and modes


def test_file_has_its_mode_from_creation(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The temp file is created O_EXCL with the final mode and never wider,
    whatever the umask."""
    sink = Sink(path=str(workdir / "token"), mode=0o640)
    opened: list[tuple[int, int]] = []
    seen_modes: list[int] = []
    real_open, real_write = os.open, os.write

    def spy_open(path: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
        if str(path).startswith(str(workdir / ".token.")):
            opened.append((flags, mode))
        return real_open(path, flags, mode, **kw)

    def spy_write(fd: int, data: Any) -> int:
        seen_modes.append(stat.S_IMODE(os.fstat(fd).st_mode))
        return real_write(fd, data)

    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(os, "write", spy_write)
    old_umask = os.umask(0)
    try:
        sinkfile.write_sink(sink, b"first\n")
        os.umask(0o077)
        sinkfile.write_sink(sink, b"second\n")
    finally:
        os.umask(old_umask)

    assert len(opened) == 2
    for flags, mode in opened:
        assert flags & os.O_CREAT
        assert flags & os.O_EXCL
        assert flags & os.O_NOFOLLOW
        assert mode == 0o640
    assert seen_modes
    assert all(mode == 0o640 for mode in seen_modes)
    assert stat.S_IMODE(os.stat(sink.path).st_mode) == 0o640
    assert Path(sink.path).read_text() == "second\n"


def test_a_wider_existing_file_is_replaced_not_reused(workdir: Path) -> None:
    """A file left world-readable by something else is swapped for a new one."""
    path = workdir / "token"
    path.write_text("old\n")
    path.chmod(0o644)

    sinkfile.write_sink(Sink(path=str(path)), b"new\n")

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == "new\n"


def test_a_concurrent_reader_never_sees_a_partial_token(workdir: Path) -> None:
    """A reader polling the file during many writes of tokens of different
    lengths only ever reads one whole token."""
    sink = Sink(path=str(workdir / "token"))
    rng = random.Random(7)
    tokens = [f"t{i:03d}-" + "x" * rng.randint(1, 6000) for i in range(200)]
    written = {f"{token}\n" for token in tokens}
    sinkfile.write_sink(sink, f"{tokens[0]}\n".encode())
    done = threading.Event()
    seen: list[str] = []

    def read() -> None:
        for _ in range(200_000):
            if done.is_set():
                break
            with open(sink.path) as handle:
                seen.append(handle.read())

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for token in tokens[1:]:
            sinkfile.write_sink(sink, f"{token}\n".encode())
    finally:
        done.set()
        reader.join(timeout=30)

    assert not reader.is_alive()
    assert len(set(seen)) > 1, "the reader should overlap several writes"
    assert all(text in written for text in seen)
    assert os.listdir(workdir) == ["token"]


def test_a_symlink_at_the_path_is_refused(workdir: Path) -> None:
    """The writer does not replace a symbolic link; its target stays as it was."""
    target = workdir / "target"
    target.write_text("kept\n")
    (workdir / "token").symlink_to(target)
    sink = Sink(path=str(workdir / "token"))

    with pytest.raises(SinkError, match="is a symbolic link"):
        sinkfile.write_sink(sink, b"new\n")

    assert (workdir / "token").is_symlink()
    assert target.read_text() == "kept\n"


# Owners


@pytest.mark.skipif(os.geteuid() != 0, reason="changing owners needs root")
@pytest.mark.parametrize(
    ("owner", "uid", "gid"),
    [("root:root", 0, 0), ("nobody", 65534, 0), ("65534:65534", 65534, 65534)],
)
def test_owner_is_applied(workdir: Path, owner: str, uid: int, gid: int) -> None:
    """As root, the file gets the configured user and group."""
    sink = Sink(path=str(workdir / "token"), owner=owner)

    sinkfile.write_sink(sink, b"tok\n")

    info = os.stat(sink.path)
    assert (info.st_uid, info.st_gid) == (uid, gid)


def test_an_unknown_owner_fails_clearly(workdir: Path) -> None:
    """An owner name that does not exist is an error naming it; no file."""
    sink = Sink(path=str(workdir / "token"), owner="tb-no-such-user:root")

    with pytest.raises(SinkError, match="no user named 'tb-no-such-user'"):
        sinkfile.write_sink(sink, b"tok\n")

    assert os.listdir(workdir) == []


@pytest.mark.parametrize("owner", ["", ":", "user:"])
def test_owner_syntax_is_checked(owner: str) -> None:
    """An owner needs a user, a group or both."""
    with pytest.raises(SinkError, match="is not user, user:group or :group"):
        sinkfile.resolve_owner(owner)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may give files away")
def test_a_refused_owner_change_leaves_no_token(workdir: Path) -> None:
    """Without the right to chown, the write fails before any byte is written."""
    sink = Sink(path=str(workdir / "token"), owner="0:0")

    with pytest.raises(SinkError, match="cannot give the file to 0:0"):
        sinkfile.write_sink(sink, b"tok\n")

    assert os.listdir(workdir) == []


# Health and check-config


async def test_an_unwritable_directory_fails_the_client(
    workdir: Path, unwritable_dir: Path
) -> None:
    """failing() lists a required client whose file could not be written."""
    metrics = Metrics()
    writer = SinkWriter(metrics)
    spec = chat(workdir, f"sinks: [{{path: {unwritable_dir}/tb-token}}]")
    sinks = writer.hook("chat", spec)
    assert sinks is not None

    with capture_logs() as logs:
        await sinks(make_token())

    assert writer.failing() == ["chat"]
    assert "cannot create a file in" in writer.errors()["chat"]
    assert (
        sample(
            metrics, "token_broker_sink_writes_total", client="chat", result="failure"
        )
        == 1
    )
    failed = [e for e in logs if e["event"] == "sink.write_failed"]
    assert failed[0]["log_level"] == "warning"
    assert failed[0]["client"] == "chat"
    assert failed[0]["path"] == f"{unwritable_dir}/tb-token"
    assert JWT not in repr(logs)


def test_check_config_reports_an_unwritable_directory(
    workdir: Path,
    unwritable_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """check-config exits 2 and names the sink's key path and the reason."""
    load_config(workdir, f"sinks: [{{path: {unwritable_dir}/tb-token}}]")
    monkeypatch.setenv("CHAT_SECRET", "chat-secret-Qx7")

    code = cli.main(["check-config", "-c", str(workdir / "broker.yaml")])

    err = capsys.readouterr().err
    assert code == 2
    assert "clients.chat.sinks[0].path: cannot create a file in" in err


async def test_a_later_good_write_clears_the_failure(workdir: Path) -> None:
    """A client recovers once its files are written again; optional clients
    are reported but do not fail readiness."""
    writer = SinkWriter(Metrics())
    (workdir / "token").mkdir()
    spec = chat(workdir, "sinks: [{path: token}]")
    optional = chat(workdir, "required: false\nsinks: [{path: token}]")
    sinks = writer.hook("chat", spec)
    other = writer.hook("other", optional)
    assert sinks is not None
    assert other is not None

    await sinks(make_token())
    await other(make_token())
    assert writer.failing() == ["chat"]
    assert set(writer.errors()) == {"chat", "other"}
    assert "is a directory" in writer.errors()["chat"]

    (workdir / "token").rmdir()
    await sinks(make_token())

    assert writer.failing() == []
    assert (workdir / "token").read_text() == f"{JWT}\n"


async def test_a_failed_write_is_retried_without_waiting_for_a_new_token(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file that could not be written is tried again soon, with backoff,
    so readiness recovers without the next refresh."""
    monkeypatch.setattr(sinks_module, "SINK_RETRY_FIRST", 0.01)
    writer = SinkWriter(Metrics(), wall=lambda: WALL)
    (workdir / "token").mkdir()
    sinks = writer.hook("chat", chat(workdir, "sinks: [{path: token}]"))
    assert sinks is not None
    await sinks(make_token())
    assert writer.failing() == ["chat"]
    first = sinks.pending_retry
    assert first is not None

    await asyncio.wait_for(first, 5)
    assert writer.failing() == ["chat"]
    (workdir / "token").rmdir()
    second = sinks.pending_retry
    assert second is not None
    await asyncio.wait_for(second, 5)

    assert writer.failing() == []
    assert sinks.pending_retry is None
    assert (workdir / "token").read_text() == f"{JWT}\n"


def test_check_sinks_names_every_problem(workdir: Path) -> None:
    """Symlinks, directories, unknown owners and shared paths are reported."""
    (workdir / "link").symlink_to(workdir / "elsewhere")
    (workdir / "dir").mkdir()
    config = load_config(
        workdir,
        """
sinks:
  - {path: link}
  - {path: dir}
  - {path: ok, owner: "tb-no-such-user"}
  - {path: shared}
  - {path: shared, format: json}
""",
    )

    problems = check_sinks(config)

    assert problems == [
        f"clients.chat.sinks[0].path: {workdir}/link is a symbolic link; "
        "give the path it points to",
        f"clients.chat.sinks[1].path: {workdir}/dir is a directory",
        "clients.chat.sinks[2].owner: no user named 'tb-no-such-user' on this system",
        f"clients.chat.sinks[4].path: {workdir}/shared is also written by "
        "clients.chat.sinks[3]",
    ]
    assert sorted(os.listdir(workdir)) == ["broker.yaml", "dir", "link"]


def test_check_config_describes_files_and_command(
    workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """check-config lists each token file and the on_refresh command."""
    load_config(
        workdir,
        """
sinks:
  - {path: token}
  - {path: token.env, format: env, variable: CHAT, mode: "0640"}
on_refresh: [nginx, -s, reload]
""",
    )
    monkeypatch.setenv("CHAT_SECRET", "chat-secret-Qx7")

    code = cli.main(["check-config", "-c", str(workdir / "broker.yaml")])

    out = capsys.readouterr().out
    assert code == 0
    assert f"token file   {workdir}/token (raw, mode 0600)" in out
    assert f"{workdir}/token.env (env, variable CHAT, mode 0640)" in out
    assert "on_refresh   nginx -s reload" in out


# on_refresh

HOOK_SCRIPT = """\
import json, os, sys
stdin = sys.stdin.read()
with open(sys.argv[1], "w") as out:
    json.dump({"argv": sys.argv, "env": dict(os.environ), "stdin": stdin}, out)
print("hook output for the log")
sys.exit(int(sys.argv[2]))
"""


def hook_client(workdir: Path, *args: str) -> Client:
    script = workdir / "hook.py"
    script.write_text(HOOK_SCRIPT)
    argv = json.dumps([sys.executable, str(script), *args])
    return chat(
        workdir,
        "sinks: [{path: token}, {path: token.json, format: json}]\n"
        f"on_refresh: {argv}",
    )


async def test_on_refresh_gets_paths_not_the_token(workdir: Path) -> None:
    """The command runs after the files are written, with the client and the
    file paths in its environment, stdin closed, and no token or secret."""
    metrics = Metrics()
    environ = {"PATH": os.environ["PATH"], "CHAT_SECRET": "chat-secret-Qx7"}
    writer = SinkWriter(metrics, environ=environ)
    sinks = writer.hook("chat", hook_client(workdir, str(workdir / "seen.json"), "0"))
    assert sinks is not None
    token = make_token()

    with capture_logs() as logs:
        await sinks(token)
        await writer.idle()

    seen = json.loads((workdir / "seen.json").read_text())
    env = seen["env"]
    assert env["TOKEN_BROKER_CLIENT"] == "chat"
    assert env["TOKEN_BROKER_SINKS"] == f"{workdir}/token:{workdir}/token.json"
    assert env["TOKEN_BROKER_EXPIRES_AT"] == token.expires_iso
    assert env["PATH"] == os.environ["PATH"]
    assert "CHAT_SECRET" not in env
    assert seen["stdin"] == ""
    assert JWT not in json.dumps(seen)
    assert "chat-secret-Qx7" not in json.dumps(seen)
    finished = next(e for e in logs if e["event"] == "sink.hook_finished")
    assert finished["client"] == "chat"
    assert finished["exit_code"] == 0
    assert finished["duration"] >= 0
    assert (
        sample(
            metrics, "token_broker_on_refresh_total", client="chat", result="success"
        )
        == 1
    )
    assert sinks.hook_error is None


async def test_a_failing_command_is_logged_and_counted(workdir: Path) -> None:
    """A non-zero exit is logged with its code and output, and counted."""
    metrics = Metrics()
    writer = SinkWriter(metrics)
    sinks = writer.hook("chat", hook_client(workdir, str(workdir / "seen.json"), "3"))
    assert sinks is not None

    with capture_logs() as logs:
        await sinks(make_token())
        await writer.idle()

    failed = next(e for e in logs if e["event"] == "sink.hook_failed")
    assert failed["exit_code"] == 3
    assert failed["result"] == "failure"
    assert failed["output"] == "hook output for the log"
    assert (
        sample(
            metrics, "token_broker_on_refresh_total", client="chat", result="failure"
        )
        == 1
    )
    assert sinks.hook_error == "exited with status 3"


async def test_a_command_that_cannot_start_is_a_failure(workdir: Path) -> None:
    """A missing program is reported as a failed run, not a crash."""
    metrics = Metrics()
    writer = SinkWriter(metrics)
    sinks = writer.hook("chat", chat(workdir, f"on_refresh: [{workdir}/missing]"))
    assert sinks is not None

    await sinks(make_token())
    await writer.idle()

    assert (
        sinks.hook_error == f"cannot start {workdir}/missing: No such file or directory"
    )
    assert (
        sample(
            metrics, "token_broker_on_refresh_total", client="chat", result="failure"
        )
        == 1
    )


async def test_a_command_past_its_timeout_is_killed_with_its_children(
    workdir: Path,
) -> None:
    """At the timeout the whole process group is killed, and it counts."""
    metrics = Metrics()
    writer = SinkWriter(metrics, hook_timeout=1.0)
    # The config interpolates ${VAR}; $$ there stands for one $.
    script = f"echo $$$$ > {workdir}/pids; sleep 60 & echo $! >> {workdir}/pids; wait"
    spec = chat(workdir, f"on_refresh: [sh, -c, {json.dumps(script)}]")
    sinks = writer.hook("chat", spec)
    assert sinks is not None

    with capture_logs() as logs:
        await sinks(make_token())
        async with asyncio.timeout(10):
            await writer.idle()

    failed = next(e for e in logs if e["event"] == "sink.hook_failed")
    assert failed["result"] == "timeout"
    assert failed["exit_code"] is None
    assert (
        sample(
            metrics, "token_broker_on_refresh_total", client="chat", result="timeout"
        )
        == 1
    )
    pids = [int(line) for line in (workdir / "pids").read_text().split()]
    assert len(pids) == 2
    for pid in pids:
        assert not _running(pid)


def _running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie awaiting its reaper."""
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return status.rsplit(")", 1)[1].split()[0] != "Z"


GATED_SCRIPT = """\
import os, socket, sys
with socket.create_connection(("127.0.0.1", int(sys.argv[1]))) as conn:
    conn.sendall(os.environ["TOKEN_BROKER_EXPIRES_AT"].encode() + b"\\n")
    conn.recv(1)
"""


Run = tuple[str, asyncio.StreamReader, asyncio.StreamWriter]
Gate = tuple[int, "asyncio.Queue[Run]"]


@pytest.fixture
async def gate() -> AsyncIterator[Gate]:
    """A loopback server each gated run reports to; it holds the run until
    the test writes a byte back."""
    runs: asyncio.Queue[Run] = asyncio.Queue()

    async def arrived(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        line = await reader.readline()
        await runs.put((line.decode().strip(), reader, writer))

    server = await asyncio.start_server(arrived, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield port, runs
    server.close()
    await server.wait_closed()


async def release(writer: asyncio.StreamWriter) -> None:
    writer.write(b"g")
    await writer.drain()
    writer.close()
    await writer.wait_closed()


async def test_tokens_during_a_run_coalesce_into_one_more_run(
    workdir: Path,
    gate: Gate,
) -> None:
    """One run at a time per client; tokens arriving meanwhile cause one
    more run, with the newest token's files."""
    port, runs = gate
    (workdir / "gated.py").write_text(GATED_SCRIPT)
    argv = json.dumps([sys.executable, str(workdir / "gated.py"), str(port)])
    metrics = Metrics()
    writer = SinkWriter(metrics)
    sinks = writer.hook(
        "chat", chat(workdir, f"sinks: [{{path: token}}]\non_refresh: {argv}")
    )
    assert sinks is not None
    first, second, third = (make_token(f"{JWT}{n}") for n in "123")

    async with asyncio.timeout(20):
        await sinks(first)
        expiry, _, held = await runs.get()
        assert expiry == first.expires_iso
        await sinks(second)
        await sinks(third)
        assert (workdir / "token").read_text() == f"{third.value.reveal()}\n"
        await release(held)

        expiry, _, held = await runs.get()
        assert expiry == third.expires_iso
        await release(held)
        await writer.idle()

    assert runs.empty()
    assert (
        sample(
            metrics, "token_broker_on_refresh_total", client="chat", result="success"
        )
        == 2
    )


async def test_close_kills_a_running_command(
    workdir: Path,
    gate: Gate,
) -> None:
    """At shutdown a command still running is killed, not left behind."""
    port, runs = gate
    (workdir / "gated.py").write_text(GATED_SCRIPT)
    argv = json.dumps([sys.executable, str(workdir / "gated.py"), str(port)])
    writer = SinkWriter(Metrics())
    sinks = writer.hook("chat", chat(workdir, f"on_refresh: {argv}"))
    assert sinks is not None

    async with asyncio.timeout(20):
        await sinks(make_token())
        _, reader, held = await runs.get()
        await writer.close()
        await writer.idle()
        # The killed command's end of the connection closes with it.
        assert await reader.read() == b""

    held.close()
    await held.wait_closed()


async def test_no_command_when_a_file_failed(workdir: Path) -> None:
    """The command does not run after a failed write; the skip is counted."""
    metrics = Metrics()
    writer = SinkWriter(metrics)
    (workdir / "token").mkdir()
    sinks = writer.hook("chat", hook_client(workdir, str(workdir / "seen.json"), "0"))
    assert sinks is not None

    await sinks(make_token())
    await writer.idle()

    assert not (workdir / "seen.json").exists()
    assert (
        sample(
            metrics, "token_broker_on_refresh_total", client="chat", result="skipped"
        )
        == 1
    )


def test_a_client_without_files_or_command_gets_no_hook(workdir: Path) -> None:
    """Nothing is called per token for a client with neither."""
    metrics = Metrics()
    writer = SinkWriter(metrics)

    assert writer.hook("chat", chat(workdir, "scopes: [a]")) is None
    assert writer.client("chat") is None
    assert (
        sample(
            metrics, "token_broker_sink_writes_total", client="chat", result="success"
        )
        is None
    )


async def test_forget_drops_a_removed_client(workdir: Path) -> None:
    """A removed client leaves failing() and the metrics."""
    metrics = Metrics()
    writer = SinkWriter(metrics)
    (workdir / "token").mkdir()
    sinks = writer.hook("chat", chat(workdir, "sinks: [{path: token}]"))
    assert isinstance(sinks, ClientSinks)
    await sinks(make_token())
    assert writer.failing() == ["chat"]

    writer.forget("chat")

    assert writer.failing() == []
    assert (
        sample(
            metrics, "token_broker_sink_writes_total", client="chat", result="failure"
        )
        is None
    )


# The whole broker


def serve_config(workdir: Path, issuer_port: int) -> Path:
    config = workdir / "broker.yaml"
    config.write_text(
        f"""
listen: {{http: 127.0.0.1:0, unix: null, metrics: null}}
environments:
  dev: {{token_url: "http://127.0.0.1:{issuer_port}/oauth2/token"}}
clients:
  chat:
    environment: dev
    client_id: sinks
    client_secret: {{env: SINKS_SECRET}}
    scopes: [chat:invoke]
    sinks:
      - {{path: out/token}}
      - {{path: out/token.json, format: json, mode: "0640"}}
log: {{level: debug}}
dev_issuer:
  listen: 127.0.0.1:{issuer_port}
  token_lifetime: 2s
  clients:
    sinks: {{secret: sinks-secret-R2d, scopes: [chat:invoke]}}
"""
    )
    (workdir / "out").mkdir()
    return config


async def test_serve_writes_files_at_start_and_leaves_them_whole(
    workdir: Path,
) -> None:
    """A real broker writes its files with the first token and at every
    refresh; a reader never sees a partial one, and after SIGTERM they are
    whole and no temp file is left."""
    config = serve_config(workdir, process.free_port())
    raw, as_json = workdir / "out/token", workdir / "out/token.json"
    broker = await process.start(config, env={"SINKS_SECRET": "sinks-secret-R2d"})
    await broker.wait_for_event("sink.written")
    seen: set[str] = set()
    bad: list[str] = []
    three = threading.Event()
    done = threading.Event()

    def read() -> None:
        for _ in range(2_000_000):
            if done.is_set():
                break
            text = raw.read_text()
            if text.count(".") != 2 or not text.endswith("\n") or "\n" in text[:-1]:
                bad.append(text)
            seen.add(text)
            if len(seen) >= 3:
                three.set()

    reader = threading.Thread(target=read)
    reader.start()
    try:
        assert await asyncio.to_thread(three.wait, 20), "three refreshes expected"
        assert await broker.stop() == 0
    finally:
        done.set()
        reader.join(timeout=30)

    assert bad == []
    assert raw.read_text().count(".") == 2
    document = json.loads(as_json.read_text())
    assert document["token_type"] == "Bearer"
    assert f"{document['access_token']}\n" == raw.read_text()
    assert stat.S_IMODE(as_json.stat().st_mode) == 0o640
    assert stat.S_IMODE(raw.stat().st_mode) == 0o600
    assert sorted(os.listdir(workdir / "out")) == ["token", "token.json"]
    written = [e for e in broker.events if e.get("event") == "sink.written"]
    assert {e["path"] for e in written} == {str(raw), str(as_json)}
