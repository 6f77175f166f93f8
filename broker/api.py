"""The token API, served on loopback TCP and on the Unix socket."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import structlog
from aiohttp import web

from broker import guard
from broker.clock import Clock
from broker.errors import TokenUnavailable
from broker.metrics import Metrics
from broker.refresh import Refresher
from broker.registry import Registry

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

log = structlog.get_logger("broker.api")

REGISTRY = web.AppKey("registry", Registry)
METRICS = web.AppKey("metrics", Metrics)
CLOCK = web.AppKey("clock", Clock)
LISTENER = web.AppKey("listener", str)

_TOKEN_PARAMS = frozenset({"format", "min_ttl"})


def error(
    status: int, code: str, message: str, client: str | None = None, **extra: Any
) -> web.Response:
    """A JSON error answer of the contract's shape."""
    body: dict[str, Any] = {"error": code, "message": message, "client": client}
    body.update(extra)
    return web.json_response(body, status=status)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer every failure as JSON; never a traceback, never a secret."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed"}.get(
            exc.status, "invalid_request"
        )
        answer = error(exc.status, code, exc.reason, request.match_info.get("client"))
        if "Allow" in exc.headers:
            answer.headers["Allow"] = exc.headers["Allow"]
        return answer
    except Exception:
        log.exception("api.crashed", path=request.path)
        return error(500, "internal_error", "the broker failed; see its log")


def guarded(listener: str) -> Callable[[web.Request, Handler], Awaitable[Any]]:
    """Middleware applying :mod:`broker.guard` on a TCP listener."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> Any:
        reason = guard.refusal(request.headers, request.raw_path)
        if reason is None:
            return await handler(request)

        log.warning("api.refused", listener=listener, reason=reason, path=request.path)
        return error(403, "forbidden", guard.REFUSALS[reason], reason=reason)

    return middleware


async def no_store(request: web.Request, response: web.StreamResponse) -> None:
    """Mark every answer uncacheable: tokens and states change by the second."""
    response.headers["Cache-Control"] = "no-store"


def create_app(
    registry: Registry, metrics: Metrics, clock: Clock, *, listener: str
) -> web.Application:
    """The token API app; ``listener`` is ``tcp`` (guarded) or ``unix``."""
    middlewares: list[Any] = [json_errors]
    if listener == "tcp":
        middlewares.append(guarded(listener))
    app = web.Application(middlewares=middlewares, client_max_size=4096)
    app[REGISTRY] = registry
    app[METRICS] = metrics
    app[CLOCK] = clock
    app[LISTENER] = listener
    app.on_response_prepare.append(no_store)

    app.router.add_get("/v1/tokens/{client}", token_json)
    app.router.add_get("/v1/tokens/{client}/header", token_header)
    app.router.add_get("/v1/clients", clients)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)

    return app


async def token_json(request: web.Request) -> web.Response:
    """``GET /v1/tokens/{client}``: JSON, or the bare token when asked."""
    outcome = await _take(request)
    if isinstance(outcome, web.Response):
        return outcome
    refresher, token = outcome

    if _wants_raw(request):
        return web.Response(text=token.value.reveal(), content_type="text/plain")

    now = request.app[CLOCK].now()
    return web.json_response(
        {
            "access_token": token.value.reveal(),
            "token_type": "Bearer",
            "expires_in": int(token.expires_at - now),
            "expires_at": token.expires_iso,
            "refresh_in": max(0, math.ceil(refresher.next_attempt - now)),
            "scope": token.scope,
        }
    )


async def token_header(request: web.Request) -> web.Response:
    """``GET /v1/tokens/{client}/header``: 204 with ``Authorization`` set."""
    outcome = await _take(request)
    if isinstance(outcome, web.Response):
        return outcome
    _, token = outcome

    return web.Response(status=204, headers={"Authorization": token.header})


async def _take(request: web.Request) -> tuple[Refresher, Any] | web.Response:
    """Resolve the client and its token, or the error answer to send."""
    name = request.match_info["client"]
    refresher = request.app[REGISTRY].get(name)
    if refresher is None:
        return error(404, "unknown_client", f"no client named {name!r}", name)

    problem = _check_query(request)
    if problem:
        return error(400, "invalid_request", problem, name)
    min_ttl = float(request.query.get("min_ttl", 0))
    held = refresher.token
    if held is not None and min_ttl > held.lifetime - held.margin:
        return error(
            400,
            "invalid_request",
            f"min_ttl={min_ttl:g} exceeds the lifetime of this client's tokens "
            f"({int(held.lifetime - held.margin)}s)",
            name,
        )

    metrics, listener = request.app[METRICS], request.app[LISTENER]
    try:
        token = await refresher.get(min_ttl)
    except TokenUnavailable as exc:
        metrics.served(name, listener, "unavailable")
        return _unavailable(exc)
    metrics.served(name, listener, "ok")

    return refresher, token


def _check_query(request: web.Request) -> str | None:
    query = request.query
    if "scope" in query:
        return "per-request scopes are not supported yet; configure a client"
    unknown = sorted(set(query) - _TOKEN_PARAMS)
    if unknown:
        return f"unknown query parameter {unknown[0]!r}"
    if query.get("format", "json") not in ("json", "raw"):
        return "format must be json or raw"
    if "min_ttl" in query:
        try:
            min_ttl = float(query["min_ttl"])
        except ValueError:
            return "min_ttl must be a number of seconds"
        if not 0 <= min_ttl < math.inf:
            return "min_ttl must be a number of seconds"
    return None


def _wants_raw(request: web.Request) -> bool:
    chosen = request.query.get("format")
    if chosen is not None:
        return chosen == "raw"
    accept = request.headers.get("Accept", "")
    return "text/plain" in accept and "application/json" not in accept


def _unavailable(exc: TokenUnavailable) -> web.Response:
    response = error(
        503, "token_unavailable", exc.message, exc.client, reason=exc.reason
    )
    response.headers["Retry-After"] = str(math.ceil(exc.retry_after))
    return response


async def clients(request: web.Request) -> web.Response:
    """``GET /v1/clients``: every client's state, never a token."""
    clock = request.app[CLOCK]
    now, wall = clock.now(), clock.wall()

    def at(moment: float | None) -> str | None:
        return None if moment is None else _iso(wall + (moment - now))

    answer = []
    for refresher in request.app[REGISTRY]:
        token = refresher.token
        failure = refresher.last_error
        answer.append(
            {
                "name": refresher.name,
                "environment": refresher.environment,
                "scopes": list(refresher.scopes),
                "state": refresher.state(),
                "expires_at": token.expires_iso if token else None,
                "refresh_at": at(refresher.next_attempt),
                "last_refresh": _iso(refresher.last_success_wall),
                "consecutive_failures": refresher.failures,
                "last_error": (
                    {"reason": failure.reason, "message": failure.message}
                    if failure
                    else None
                ),
            }
        )

    return web.json_response({"clients": answer})


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: every required client holds a servable token."""
    waiting = request.app[REGISTRY].waiting()
    if waiting:
        return web.json_response(
            {"status": "not_ready", "waiting_for": waiting}, status=503
        )
    return web.json_response({"status": "ready"})


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(int(timestamp), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
