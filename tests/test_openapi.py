"""The OpenAPI document: valid 3.1, true to the routes, served everywhere."""

from __future__ import annotations

import json
import re
import tomllib
import typing
from collections.abc import AsyncIterator, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from openapi_spec_validator import OpenAPIV31SpecValidator, validate

from broker import api, config, grant, guard, metrics_app, refresh
from broker.loader import load_text
from broker.metrics import Metrics
from broker.registry import Registry
from tests import process
from tests.fakes import FakeClock, ScriptedFetch
from tests.test_e2e import write_config

ROOT = Path(__file__).resolve().parent.parent
GUARD = {"Token-Broker": "1"}
CONFIG = """
environments:
  prod: {token_url: "https://auth.example.com/token"}
clients:
  chat: {environment: prod, client_id: c, client_secret: s3cr3t-value, scopes: [a]}
"""
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
# Reasons a 503 can carry beyond a failed token request's own.
WAIT_REASONS = {"pending", "expired", "min_ttl", "stopping"}
# Failure reasons raised outside the grant module's set.
OTHER_FAILURES = {"discovery_failed"}

Operation = tuple[str, str]


def packaged() -> bytes:
    """The document as the installed package ships it."""
    return resources.files("broker").joinpath("openapi.json").read_bytes()


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(packaged())
    return loaded


@pytest.fixture
async def apps() -> AsyncIterator[dict[str, web.Application]]:
    """The three apps the broker serves, around a registry never started."""
    clock, metrics = FakeClock(), Metrics()
    fetch = ScriptedFetch()
    registry = Registry(
        load_text(CONFIG, "test.yaml", {}).config,
        lambda name: fetch,
        clock=clock,
        metrics=metrics,
    )
    yield {
        "tcp": api.create_app(registry, metrics, clock, listener="tcp"),
        "unix": api.create_app(registry, metrics, clock, listener="unix"),
        "metrics": metrics_app.create_app(registry, metrics),
    }
    await registry.stop()


def routes(app: web.Application) -> set[Operation]:
    """Every (path, method) an app routes; HEAD comes with GET in aiohttp."""
    found = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter")
        assert isinstance(path, str)
        found.add((path, route.method.lower()))
    return {(path, method) for path, method in found if method != "head"}


def operations(document: dict[str, Any]) -> Iterator[tuple[str, str, Any]]:
    """Every (path, method, operation) the document lists."""
    for path, item in document["paths"].items():
        for method in METHODS:
            if method in item:
                yield path, method, item[method]


def tagged(document: dict[str, Any], tag: str) -> set[Operation]:
    return {(p, m) for p, m, op in operations(document) if tag in op["tags"]}


def resolve(document: dict[str, Any], node: Any) -> Any:
    """Follow a local ``$ref`` to what it names."""
    while isinstance(node, dict) and "$ref" in node:
        target: Any = document
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def strings(node: Any) -> Iterator[str]:
    """Every string anywhere in a JSON value, keys included."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield key
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)


def test_document_is_valid_openapi_31(document: dict[str, Any]) -> None:
    """The packaged document validates as OpenAPI 3.1."""
    assert document["openapi"].startswith("3.1.")
    validate(document, cls=OpenAPIV31SpecValidator)


def test_version_is_the_package_version(document: dict[str, Any]) -> None:
    """info.version follows the version in pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert document["info"]["version"] == project["version"]


async def test_token_operations_are_the_token_routes(
    document: dict[str, Any], apps: dict[str, web.Application]
) -> None:
    """Operations tagged ``token`` are exactly the routes of both token
    listeners, methods included."""
    assert routes(apps["tcp"]) == routes(apps["unix"])
    assert tagged(document, "token") == routes(apps["tcp"])


async def test_metrics_operations_are_the_metrics_routes(
    document: dict[str, Any], apps: dict[str, web.Application]
) -> None:
    """Operations tagged ``metrics`` are exactly the metrics listener's
    routes, and every operation belongs to one listener or both."""
    assert tagged(document, "metrics") == routes(apps["metrics"])
    everything = {(path, method) for path, method, _ in operations(document)}
    assert everything == routes(apps["tcp"]) | routes(apps["metrics"])


def test_token_query_parameters_are_those_the_api_takes(
    document: dict[str, Any],
) -> None:
    """Every token operation lists the query parameters the API accepts,
    and the client path parameter uses the config's name rule."""
    token_paths = [p for p in document["paths"] if p.startswith("/v1/tokens/")]
    assert len(token_paths) == 3
    for path in token_paths:
        item = document["paths"][path]
        (method,) = (m for m in METHODS if m in item)
        query = {
            parameter["name"]
            for parameter in map(
                lambda p: resolve(document, p), item[method]["parameters"]
            )
            if parameter["in"] == "query"
        }
        assert query == api._TOKEN_PARAMS
        (client,) = (resolve(document, p) for p in item["parameters"])
        assert client["in"] == "path"
        assert client["schema"]["pattern"] == f"^{config._NAME.pattern}$"


def test_reason_codes_match_the_code(document: dict[str, Any]) -> None:
    """Forbidden, unavailable and client-state enums list what the code
    can say, no more."""
    schemas = document["components"]["schemas"]
    forbidden = set(schemas["Forbidden"]["properties"]["reason"]["enum"])
    assert forbidden == set(guard.REFUSALS) | {
        "scope_not_allowed",
        "audience_not_allowed",
        "unix_only",
        "caller_not_allowed",
    }
    failures = set(schemas["FailureReason"]["enum"])
    assert failures == set(grant.REASONS) | OTHER_FAILURES
    waits = schemas["Unavailable"]["properties"]["reason"]["anyOf"][1]["enum"]
    assert set(waits) == WAIT_REASONS
    states = schemas["ClientState"]["properties"]["state"]["enum"]
    assert set(states) == set(typing.get_args(refresh.State))


def test_every_answer_is_no_store_and_503_says_when(document: dict[str, Any]) -> None:
    """Every documented response requires Cache-Control: no-store; every
    token 503 requires Retry-After; 403 is documented wherever the guard
    runs."""
    for path, method, operation in operations(document):
        for status, answer in operation["responses"].items():
            headers = resolve(document, answer)["headers"]
            cache = resolve(document, headers["Cache-Control"])
            assert cache["required"], (path, method, status)
            assert cache["schema"]["const"] == "no-store"
        if path.startswith("/v1/tokens/"):
            unavailable = resolve(document, operation["responses"]["503"])
            assert unavailable["headers"]["Retry-After"]["required"]
        if "token" in operation["tags"]:
            assert "403" in operation["responses"], (path, method)


def test_document_holds_nothing_secret_looking(document: dict[str, Any]) -> None:
    """No JWT, credential or long opaque string appears anywhere in it."""
    looks_secret = re.compile(
        r"eyJ|(?:Bearer|Basic)\s+[A-Za-z0-9._~+/=-]{16,}|[A-Za-z0-9+_=-]{32,}"
    )
    for text in strings(document):
        assert looks_secret.search(text) is None, text


async def fetch(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """GET ``url``: status, headers and body."""
    async with session.get(url, headers=headers) as answer:
        return answer.status, dict(answer.headers), await answer.read()


async def test_served_on_every_listener(workdir: Path) -> None:
    """/openapi.json is the packaged document on TCP (with the guard
    header), on the Unix socket and on the metrics listener."""
    config_file = write_config(workdir, process.free_port())
    broker = await process.start(config_file)
    started = broker.started()
    expected = json.loads(packaged())

    async with aiohttp.ClientSession() as session:
        answers = [
            await fetch(session, f"http://{started['http']}/openapi.json", GUARD),
            await fetch(session, f"http://{started['metrics']}/openapi.json"),
        ]
        refused = await fetch(session, f"http://{started['http']}/openapi.json")
    unix = aiohttp.UnixConnector(path=str(workdir / "broker.sock"))
    async with aiohttp.ClientSession(connector=unix) as session:
        answers.append(await fetch(session, "http://broker/openapi.json"))

    assert refused[0] == 403
    assert json.loads(refused[2])["reason"] == "missing_header"
    for status, headers, body in answers:
        assert status == 200
        assert headers["Content-Type"] == "application/json"
        assert headers["Cache-Control"] == "no-store"
        assert json.loads(body) == expected
    assert await broker.stop() == 0
