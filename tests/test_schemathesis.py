"""schemathesis against a running broker: every answer fits /openapi.json.

The fuzzer runs as its own CLI process (the way CI users run it), while this
test's event loop keeps reading the broker's output. It fuzzes the TCP token
listener, with the guard header on every request, and the metrics listener.
The Unix socket is left out: its routes and handlers are the TCP ones minus
the guard, schemathesis's HTTP client has no Unix-socket transport, and a
``POST /v1/quit`` there would end the broker mid-run (over TCP it is a 403).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import aiohttp

from tests import process

SECRET = "fuzz-secret-Hq27"
# The secret configured for ``models``: the issuer refuses it, so ``models``
# answers 503 and /readyz 503, and the fuzzer meets the failure shapes too.
WRONG_SECRET = "wrong-secret-Vb50"
GUARD = {"Token-Broker": "1"}
# Small and fixed: the two runs together take a few seconds here.
MAX_EXAMPLES = "50"
SEED = "7"
RUN_TIMEOUT = 120.0
# The dev issuer's tokens are JWTs; any of their text in the broker's output
# is a leak.
_JWT = re.compile(r"eyJ[A-Za-z0-9_.-]*")
_PROXY_VARIABLES = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}
# 503 is part of the contract (no token yet, not ready), so it is not a
# server failure; status_code_conformance still refuses it wherever the
# document does not list it. Any other 5xx fails the run.
SCHEMATHESIS_TOML = """
[checks.not_a_server_error]
expected-statuses = ["1xx", "2xx", "3xx", "4xx", "503"]
"""


def write_config(workdir: Path, issuer_port: int) -> Path:
    """Two clients: ``chat`` gets tokens (two scopes, so subsets exist),
    ``models`` is refused by the issuer."""
    (workdir / "secret").write_text(SECRET + "\n")
    (workdir / "wrong").write_text(WRONG_SECRET + "\n")
    config = workdir / "broker.yaml"
    config.write_text(
        f"""
listen:
  http: 127.0.0.1:0
  unix: {workdir}/broker.sock
  metrics: 127.0.0.1:0
environments:
  dev: {{token_url: "http://127.0.0.1:{issuer_port}/oauth2/token"}}
clients:
  chat:
    environment: dev
    client_id: fuzz
    client_secret: {{file: secret}}
    scopes: [chat:invoke, chat:read]
  models:
    environment: dev
    client_id: fuzz
    client_secret: {{file: wrong}}
    scopes: [models:read]
    auth: client_secret_post
log: {{level: debug, format: json}}
dev_issuer:
  listen: 127.0.0.1:{issuer_port}
  token_lifetime: 10m
  clients:
    fuzz: {{secret: {SECRET}, scopes: [chat:invoke, chat:read, models:read]}}
"""
    )
    return config


async def fuzz(
    base: str, tag: str, workdir: Path, *headers: str
) -> tuple[int, str, dict[str, Any]]:
    """Run ``schemathesis run`` on ``base``'s operations tagged ``tag``.

    Returns the exit code, the console output with any token masked, and the
    JSON report.
    """
    report = workdir / f"report-{tag}.json"
    settings = workdir / "schemathesis.toml"
    settings.write_text(SCHEMATHESIS_TOML)
    options = [
        f"{base}/openapi.json",
        "--url",
        base,
        "--include-tag",
        tag,
        "--checks",
        "all",
        # A schema-valid min_ttl longer than this client's token lifetime is
        # a 400 by contract: the lifetime is the issuer's, not the schema's.
        "--exclude-checks",
        "positive_data_acceptance",
        "--max-examples",
        MAX_EXAMPLES,
        "--seed",
        SEED,
        "--workers",
        "1",
        "--request-timeout",
        "10",
        "--generation-database",
        "none",
        "--no-color",
        "--report",
        "json",
        "--report-json-path",
        str(report),
    ]
    for header in headers:
        options += ["--header", header]
    # The fuzzer talks to loopback only: no proxy may be asked to relay it.
    env = {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_VARIABLES}
    run = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(settings),
        "run",
        *options,
        cwd=workdir,
        env={**env, "NO_PROXY": "*"},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    process.STARTED.append(run)
    async with asyncio.timeout(RUN_TIMEOUT):
        out, _ = await run.communicate()
    assert run.returncode is not None

    text = _JWT.sub("[token]", out.decode(errors="replace"))
    return run.returncode, text, json.loads(report.read_text())


def _failures(output: str) -> str:
    """The part of schemathesis's console report that says what failed."""
    start = output.find("FAILURES")
    return output[start:] if start >= 0 else output[-4000:]


async def _served(metrics: str, session: aiohttp.ClientSession) -> str:
    async with session.get(f"{metrics}/metrics") as scrape:
        return await scrape.text()


async def test_schemathesis_finds_no_5xx_no_schema_break_no_leak(
    workdir: Path,
) -> None:
    """Fuzzing both HTTP listeners gives no 5xx and no answer outside the
    document; the broker survives and prints no secret and no token."""
    issuer_port = process.free_port()
    broker = await process.start(write_config(workdir, issuer_port))
    started = broker.started()
    tcp, metrics = f"http://{started['http']}", f"http://{started['metrics']}"
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{tcp}/v1/tokens/chat", headers=GUARD) as answer:
            assert answer.status == 200
            token = (await answer.json())["access_token"]

        token_run, metrics_run = await asyncio.gather(
            fuzz(tcp, "token", workdir, "Token-Broker: 1"),
            fuzz(metrics, "metrics", workdir),
        )
        scrape = await _served(metrics, session)

    for code, output, _ in (token_run, metrics_run):
        assert code == 0, _failures(output)
    assert token_run[2]["operations"] == {
        "total": 9,
        "selected": 8,
        "tested": 8,
        "errored": 0,
        "skipped": 0,
        "skip_reasons": [],
    }
    assert metrics_run[2]["operations"]["tested"] == 4
    assert broker.process.returncode is None
    # Beyond this test's own request: the fuzzer got tokens and 503s.
    for client, result, least in (("chat", "ok", 2), ("models", "unavailable", 1)):
        served = re.search(
            rf'token_broker_token_requests_total\{{caller="any",client="{client}",'
            rf'listener="tcp",result="{result}"\}} ([0-9.e+]+)',
            scrape,
        )
        assert served is not None
        assert float(served.group(1)) >= least

    assert await broker.stop() == 0
    printed = broker.output()
    for secret in (SECRET, WRONG_SECRET, token):
        assert secret not in printed
    assert _JWT.search(printed) is None
