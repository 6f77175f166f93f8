"""Callers in a running broker, asked by processes of different users.

The broker runs as root here; a child process drops to ``nobody`` before it
connects, so the kernel's peer credentials differ for real.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import aiohttp
import pytest

from tests import process
from tests.process import run_cli

NOBODY = 65534
SECRET = "callers-secret-Tm40"
KEY = "caller-key-for-reports-Vd83k"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="changing a child's uid needs root"
)

# Drops to nobody:nogroup, then sends each request on its own connection
# and prints the statuses as JSON.
CHILD = """
import json, os, socket, sys
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
statuses = []
for method, path in zip(sys.argv[2::2], sys.argv[3::2]):
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(sys.argv[1])
        sock.sendall(f"{method} {path} HTTP/1.1\\r\\nHost: b\\r\\n"
                     "Connection: close\\r\\n\\r\\n".encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    statuses.append(int(answer.split(b" ", 2)[1]))
print(json.dumps(statuses))
"""


def write_config(workdir: Path, issuer_port: int) -> Path:
    (workdir / "secret").write_text(SECRET + "\n")
    (workdir / "reports.key").write_text(KEY + "\n")
    # nobody must reach the socket: through the directory, and by group.
    workdir.chmod(0o711)
    client = (
        "environment: dev, client_id: live, client_secret: {file: secret}, scopes: [a]"
    )
    config = workdir / "broker.yaml"
    config.write_text(
        f"""
listen:
  http: 127.0.0.1:0
  unix: {workdir}/broker.sock
  unix_group: {NOBODY}
  metrics: 127.0.0.1:0
environments:
  dev: {{token_url: "http://127.0.0.1:{issuer_port}/oauth2/token"}}
clients:
  open: {{{client}}}
  root-only: {{{client}, callers: {{uids: [root]}}}}
  nobody-only: {{{client}, callers: {{uids: [nobody]}}}}
  group: {{{client}, callers: {{gids: [nogroup]}}}}
  reports: {{{client}, callers: {{keys: [{{file: reports.key}}]}}}}
dev_issuer:
  listen: 127.0.0.1:{issuer_port}
  clients:
    live: {{secret: {SECRET}, scopes: [a]}}
"""
    )
    return config


async def as_nobody(socket_path: str, *requests: tuple[str, str]) -> list[int]:
    """The statuses a process running as nobody gets for ``requests``."""
    argv = [item for request in requests for item in request]
    code, out, err = await run_command(sys.executable, "-c", CHILD, socket_path, *argv)
    assert code == 0, err
    statuses: list[int] = json.loads(out)
    return statuses


async def run_command(*argv: str) -> tuple[int, str, str]:
    child = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await child.communicate()
    assert child.returncode is not None
    return child.returncode, out.decode(), err.decode()


async def test_uids_and_gids_are_told_apart_by_the_kernel(workdir: Path) -> None:
    """root and nobody each get exactly the clients that name them; quit
    is refused to nobody and accepted from root."""
    broker = await process.start(write_config(workdir, process.free_port()))
    socket_path = str(workdir / "broker.sock")
    paths = ["open", "root-only", "nobody-only", "group", "reports"]
    unix = aiohttp.UnixConnector(path=socket_path)

    async with aiohttp.ClientSession(connector=unix) as session:
        as_root = []
        for name in paths:
            async with session.get(f"http://b/v1/tokens/{name}") as answer:
                as_root.append(answer.status)
        nobody = await as_nobody(
            socket_path,
            *(("GET", f"/v1/tokens/{name}") for name in paths),
            ("POST", "/v1/quit"),
        )
        async with session.post("http://b/v1/quit") as quit_answer:
            quit_status = quit_answer.status

    assert as_root == [200, 200, 403, 403, 403]
    assert nobody == [200, 403, 200, 200, 403, 403]
    assert quit_status == 202
    assert await broker.stop(signum=None) == 0
    refusals = [e for e in broker.events if e.get("event") == "api.refused"]
    assert {(e["client"], e["reason"]) for e in refusals} == {
        ("nobody-only", "caller_not_allowed"),
        ("group", "caller_not_allowed"),
        ("reports", "caller_not_allowed"),
        ("root-only", "caller_not_allowed"),
        (None, "caller_not_allowed"),
    }


async def test_the_cli_sends_a_caller_key_and_check_config_says_who(
    workdir: Path,
) -> None:
    """token --key-file opens a keyed client; check-config lists each
    client's callers and calls the others open."""
    config = write_config(workdir, process.free_port())
    code, described, _ = await run_cli("check-config", "-c", str(config))
    assert code == 0
    rows = [line.split(None, 1) for line in described.splitlines()]
    callers = [row[1] for row in rows if row and row[0] == "callers"]
    assert callers == [
        "open: any local caller that passes the guard",
        "uid 0",
        f"uid {NOBODY}",
        f"gid {NOBODY}",
        f"key reports ({workdir / 'reports.key'})",
    ]
    assert KEY not in described

    broker = await process.start(config)
    socket_path = str(workdir / "broker.sock")
    code, token, _ = await run_cli(
        "token",
        "reports",
        "--socket",
        socket_path,
        "--key-file",
        str(workdir / "reports.key"),
    )
    refused, _, why = await run_cli("token", "reports", "--socket", socket_path)

    assert code == 0
    assert token.startswith("ey")
    assert refused == 1
    assert "Authorization: Bearer" in why
    assert await broker.stop() == 0
    assert KEY not in broker.output()
