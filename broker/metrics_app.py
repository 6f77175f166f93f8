"""The metrics listener: ``/metrics``, ``/healthz``, ``/readyz``, ``/openapi.json``.

It may listen beyond loopback (Prometheus scrapes a pod's IP), so it serves
nothing that reveals a token.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from broker import api
from broker.metrics import Metrics
from broker.registry import Registry


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[api.METRICS].registry)
    response = web.Response(body=body)
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


def create_app(registry: Registry, metrics: Metrics) -> web.Application:
    """Build the metrics app around the same registry the token API uses."""
    app = web.Application(middlewares=[api.json_errors], client_max_size=1024)
    app[api.REGISTRY] = registry
    app[api.METRICS] = metrics
    app.on_response_prepare.append(api.no_store)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", api.healthz)
    app.router.add_get("/readyz", api.readyz)
    app.router.add_get("/openapi.json", api.openapi)

    return app
