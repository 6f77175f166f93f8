"""The token API, served on loopback TCP and on the Unix socket."""

from __future__ import annotations

import asyncio
import functools
import math
import re
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

import structlog
from aiohttp import web

from broker import access, guard
from broker.audit import Audit
from broker.clock import Clock
from broker.config import Client
from broker.errors import TokenUnavailable
from broker.metrics import Metrics
from broker.ratelimit import RateLimiter, Throttle, retry_after
from broker.refresh import Refresher
from broker.registry import Registry
from broker.scoped import ScopedTokens, Variant, normalise
from broker.token import Token, rfc3339

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

log = structlog.get_logger("broker.api")

REGISTRY = web.AppKey("registry", Registry)
METRICS = web.AppKey("metrics", Metrics)
CLOCK = web.AppKey("clock", Clock)
LISTENER = web.AppKey("listener", str)
SCOPED = web.AppKey("scoped", ScopedTokens)
STOP = web.AppKey("stop", asyncio.Event)
AUDIT = web.AppKey("audit", Audit)
LIMITER = web.AppKey("limiter", RateLimiter)
THROTTLE = web.AppKey("throttle", Throttle)
# One api.refused line per reason and client in this time, at most.
REFUSAL_LOG_INTERVAL = 10.0

_TOKEN_PARAMS = frozenset({"format", "min_ttl", "scope", "audience"})
# Plain decimal seconds: float() alone would take "1_000", "inf" or Arabic-Indic digits.
_SECONDS = re.compile(r"[0-9]{1,9}(\.[0-9]{1,6})?", re.ASCII)
_REFUSAL_CODES = {403: "forbidden", 413: "invalid_request", 429: "rate_limited"}
# No route takes a body; a small one (a client's habitual "{}") is ignored.
MAX_BODY = 4096


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


@web.middleware
async def guarded(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Apply :mod:`broker.guard`, as the live config has it, and the body limit.

    Read per request, so a reload changes the guard without a restart.
    """
    listener = request.app[LISTENER]
    policy = request.app[REGISTRY].config.listen.guard
    reason = guard.refusal(
        request.headers,
        request.raw_path,
        method=request.method,
        policy=policy,
        tcp=listener == "tcp",
    )
    if reason is not None:
        return refuse(request, 403, guard.message(reason, policy), reason)
    if (
        request.content_length or 0
    ) > MAX_BODY or "Transfer-Encoding" in request.headers:
        answer = refuse(
            request, 413, "the token API takes no request body", "too_large"
        )
        answer.force_close()
        return answer

    return await handler(request)


def refuse(
    request: web.Request,
    status: int,
    message: str,
    reason: str,
    client: str | None = None,
) -> web.Response:
    """A refusal: counted, answered as JSON, and logged as ``api.refused``
    (at most once per reason and client every few seconds: a caller in a
    loop must not flood the log; ``suppressed`` says how many were not)."""
    listener = request.app[LISTENER]
    request.app[METRICS].refusal(listener, reason)
    suppressed = request.app[THROTTLE].admit((reason, client))
    if suppressed is not None:
        log.warning(
            "api.refused",
            listener=listener,
            reason=reason,
            method=request.method,
            path=request.path[:200],
            client=client,
            suppressed=suppressed,
        )
    return error(status, _REFUSAL_CODES[status], message, client, reason=reason)


def _too_many(
    request: web.Request, message: str, reason: str, wait: float, client: str
) -> web.Response:
    """A 429 refusal that says when to ask again."""
    answer = refuse(request, 429, message, reason, client)
    answer.headers["Retry-After"] = retry_after(wait)
    return answer


async def no_store(request: web.Request, response: web.StreamResponse) -> None:
    """Mark every answer uncacheable: tokens and states change by the second."""
    response.headers["Cache-Control"] = "no-store"


def create_app(
    registry: Registry,
    metrics: Metrics,
    clock: Clock,
    *,
    listener: str,
    scoped: ScopedTokens | None = None,
    stop: asyncio.Event | None = None,
    audit: Audit | None = None,
    limiter: RateLimiter | None = None,
) -> web.Application:
    """The token API app; ``listener`` is ``tcp`` or ``unix``.

    ``scoped`` serves ``?scope=`` subsets (refused without it); ``stop`` is
    set by ``POST /v1/quit``; ``audit`` tallies hand-outs; ``limiter``
    bounds each caller's request rate.
    """
    app = web.Application(middlewares=[json_errors, guarded], client_max_size=MAX_BODY)
    app[REGISTRY] = registry
    app[METRICS] = metrics
    app[CLOCK] = clock
    app[LISTENER] = listener
    app[THROTTLE] = Throttle(REFUSAL_LOG_INTERVAL, clock.now)
    if scoped is not None:
        app[SCOPED] = scoped
    if stop is not None:
        app[STOP] = stop
    if audit is not None:
        app[AUDIT] = audit
    if limiter is not None:
        app[LIMITER] = limiter
    app.on_response_prepare.append(no_store)

    app.router.add_get("/v1/tokens/{client}", token_json)
    app.router.add_get("/v1/tokens/{client}/header", token_header)
    app.router.add_post("/v1/tokens/{client}/refresh", token_refresh)
    app.router.add_post("/v1/quit", quit_broker)
    app.router.add_get("/v1/clients", clients)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/openapi.json", openapi)

    return app


async def token_json(request: web.Request) -> web.Response:
    """``GET /v1/tokens/{client}``: JSON, or the bare token when asked."""
    return _token_answer(request, await _take(request))


async def token_refresh(request: web.Request) -> web.Response:
    """``POST /v1/tokens/{client}/refresh``: a new token now, same answer.

    For a caller whose API refused the token it had. Joins a request in
    flight; within ``min_interval`` of the last one it answers with the
    newest token instead of asking the issuer again.
    """
    return _token_answer(request, await _take(request, force=True))


def _token_answer(
    request: web.Request, outcome: tuple[Refresher, Token] | web.Response
) -> web.Response:
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


async def _take(
    request: web.Request, *, force: bool = False
) -> tuple[Refresher, Token] | web.Response:
    """Resolve the client, its scope set and its token, or the error answer."""
    name = request.match_info["client"]
    registry = request.app[REGISTRY]
    refresher = registry.get(name)
    if refresher is None:
        return error(404, "unknown_client", f"no client named {name!r}", name)
    spec = registry.config.clients[name]

    listener = request.app[LISTENER]
    caller = access.caller_of(request, listener)
    verdict = access.decide(spec.callers, caller)
    pid = None if caller.peer is None else caller.peer.pid
    if not verdict.allowed:
        _audit(request, verdict, name, "refused", pid)
        return refuse(request, 403, verdict.message, "caller_not_allowed", name)
    limited = _rate_limited(request, verdict.who.caller, name)
    if limited is not None:
        _audit(request, verdict, name, "rate_limited", pid)
        return limited

    problem = _check_query(request)
    if problem:
        return error(400, "invalid_request", problem, name)
    variant = _requested_variant(request, spec)
    if isinstance(variant, web.Response):
        return variant
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

    if variant is not None:
        if SCOPED not in request.app:
            return error(400, "invalid_request", "not served here", name)
        wait = request.app[SCOPED].admit(name, variant)
        if wait:
            message = "too many new scope sets for this client; ask again later"
            return _too_many(request, message, "too_many_scope_sets", wait, name)
        refresher = request.app[SCOPED].refresher(name, variant)
    metrics = request.app[METRICS]
    try:
        token = await (refresher.force() if force else refresher.get(min_ttl))
    except TokenUnavailable as exc:
        metrics.served(name, listener, "unavailable", verdict.rule)
        _audit(request, verdict, name, "unavailable", pid)
        return _unavailable(exc)
    if variant is not None:
        request.app[SCOPED].settle(name, variant)
    metrics.served(name, listener, "ok", verdict.rule)
    _audit(request, verdict, name, "ok", pid)

    return refresher, token


def _rate_limited(
    request: web.Request, caller: str, client: str
) -> web.Response | None:
    limiter = request.app.get(LIMITER)
    if limiter is None:
        return None
    wait = limiter.wait(caller)
    if not wait:
        return None

    message = f"more than {limiter.rate:g} requests per second from this caller"
    return _too_many(request, message, "rate_limited", wait, client)


def _audit(
    request: web.Request,
    verdict: access.Verdict,
    client: str,
    result: str,
    pid: int | None,
) -> None:
    audit = request.app.get(AUDIT)
    if audit is not None:
        audit.record(verdict.who, client, request.app[LISTENER], result, pid)


def _requested_variant(
    request: web.Request, spec: Client
) -> Variant | web.Response | None:
    """What the caller asked for beyond the client's own token, if anything.

    ``scope`` must be a subset of the client's scopes and ``audience`` one
    the config allows: a caller can narrow the client's rights, never widen
    them.
    """
    name = request.match_info["client"]
    query = request.query
    if any(len(query.getall(key, [])) > 1 for key in ("scope", "audience")):
        return error(400, "invalid_request", "give scope and audience once", name)

    scopes = spec.scopes
    if "scope" in query:
        scopes = normalise(query["scope"])
        if not scopes:
            return error(400, "invalid_request", "scope is empty", name)
        extra = sorted(set(scopes) - set(spec.scopes))
        if extra:
            return error(
                403,
                "forbidden",
                f"scope {extra[0]!r} is not among this client's scopes",
                name,
                reason="scope_not_allowed",
            )

    audience = query.get("audience")
    if audience is not None and audience != spec.audience:
        if audience not in spec.audiences:
            return error(
                403,
                "forbidden",
                f"audience {audience[:200]!r} is not among this client's audiences",
                name,
                reason="audience_not_allowed",
            )
    else:
        audience = None

    if set(scopes) == set(spec.scopes) and audience is None:
        return None

    return Variant(tuple(sorted(scopes)), audience)


def _check_query(request: web.Request) -> str | None:
    query = request.query
    unknown = sorted(set(query) - _TOKEN_PARAMS)
    if unknown:
        return f"unknown query parameter {unknown[0]!r}"
    if query.get("format", "json") not in ("json", "raw"):
        return "format must be json or raw"
    if "min_ttl" in query and not _SECONDS.fullmatch(query["min_ttl"]):
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


async def quit_broker(request: web.Request) -> web.Response:
    """``POST /v1/quit``: stop the broker gracefully (Unix socket only).

    For classic sidecars in Jobs: the main container says it is done. Over
    TCP it is refused, so no web page or SSRF can end the broker.
    """
    if request.app[LISTENER] != "unix" or STOP not in request.app:
        return refuse(
            request, 403, "quit is accepted only on the Unix socket", "unix_only"
        )
    caller = access.caller_of(request, "unix")
    if not access.may_quit(request.app[REGISTRY].config.listen.quit_callers, caller):
        return refuse(
            request,
            403,
            f"{caller.describe()} may not stop the broker (see listen.quit_callers)",
            "caller_not_allowed",
        )

    log.info("broker.quit_requested", listener=request.app[LISTENER])
    request.app[STOP].set()
    return web.json_response({"status": "stopping"}, status=202)


async def clients(request: web.Request) -> web.Response:
    """``GET /v1/clients``: every client's state, never a token.

    Each client lists the scope subsets callers asked for under ``scoped``.
    """
    clock = request.app[CLOCK]
    now, wall = clock.now(), clock.wall()
    scoped = request.app.get(SCOPED)

    def at(moment: float | None) -> str | None:
        return None if moment is None else _iso(wall + (moment - now))

    def state(refresher: Refresher) -> dict[str, Any]:
        token = refresher.token
        failure = refresher.last_error
        return {
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

    answer = []
    for refresher in request.app[REGISTRY]:
        entry = {
            "name": refresher.name,
            "environment": refresher.environment,
            **state(refresher),
            "scoped": [
                {**state(subset), "audience": variant.audience}
                for variant, subset in (
                    scoped.entries(refresher.name) if scoped else []
                )
            ],
        }
        answer.append(entry)

    return web.json_response({"clients": answer})


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: every required client holds a servable token, and its
    token files are written."""
    registry = request.app[REGISTRY]
    waiting = registry.waiting()
    unwritten = registry.sinks.failing()
    if waiting or unwritten:
        return web.json_response(
            {
                "status": "not_ready",
                "waiting_for": waiting,
                "sinks_failing": unwritten,
            },
            status=503,
        )
    return web.json_response({"status": "ready"})


@functools.cache
def _openapi_document() -> bytes:
    return resources.files("broker").joinpath("openapi.json").read_bytes()


async def openapi(request: web.Request) -> web.Response:
    """``GET /openapi.json``: the OpenAPI 3.1 document of every listener."""
    return web.Response(body=_openapi_document(), content_type="application/json")


def _iso(timestamp: float | None) -> str | None:
    return None if timestamp is None else rfc3339(timestamp)
