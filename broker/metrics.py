"""Prometheus metrics on an explicit registry (never the process default)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

from broker import __version__

HOOK_RESULTS = ("success", "failure", "timeout", "skipped")
RELOAD_RESULTS = ("applied", "unchanged", "refused", "failed")
# What each listener can refuse for; their series start at zero.
_REFUSALS_EVERYWHERE = ("too_many_connections", "bad_request")
_REFUSALS_API = (
    *_REFUSALS_EVERYWHERE,
    "missing_header",
    "caller_not_allowed",
    "rate_limited",
    "too_many_scope_sets",
    "too_large",
)
REFUSALS = {
    "tcp": (
        *_REFUSALS_API,
        "host",
        "forwarded",
        "browser",
        "cors_preflight",
        "unix_only",
    ),
    "unix": _REFUSALS_API,
    "metrics": _REFUSALS_EVERYWHERE,
}
_DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Every metric the broker exports; label values are bounded by config."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.refresh = Counter(
            "token_broker_refresh",
            "Token requests to issuers, by result and failure reason.",
            ["client", "environment", "result", "reason"],
            registry=self.registry,
        )
        self.refresh_duration = Histogram(
            "token_broker_refresh_duration_seconds",
            "Time one token request to the issuer took.",
            ["client"],
            buckets=_DURATION_BUCKETS,
            registry=self.registry,
        )
        self.expiry = Gauge(
            "token_broker_token_expiry_timestamp_seconds",
            "Unix time at which the held token expires.",
            ["client"],
            registry=self.registry,
        )
        self.failures = Gauge(
            "token_broker_consecutive_failures",
            "Failed token requests since the last success.",
            ["client"],
            registry=self.registry,
        )
        self.requests = Counter(
            "token_broker_token_requests",
            "Token requests served to local callers, by listener, result and "
            "the caller rule that let them in (any for a client without callers).",
            ["client", "listener", "result", "caller"],
            registry=self.registry,
        )
        self.refused = Counter(
            "token_broker_requests_refused",
            "Requests and connections refused by the caller guard, the clients' "
            "callers and the limits, by listener and reason.",
            ["listener", "reason"],
            registry=self.registry,
        )
        self.clock_skew = Gauge(
            "token_broker_issuer_clock_skew_seconds",
            "How far the issuer's clock is ahead of ours (negative: behind), "
            "beyond what the Date header's one-second resolution explains.",
            ["environment"],
            registry=self.registry,
        )
        self.upstream = Counter(
            "token_broker_upstream_responses",
            "HTTP answers from issuers to token requests, by status code.",
            ["client", "status"],
            registry=self.registry,
        )
        self.sink_writes = Counter(
            "token_broker_sink_writes",
            "Token files written, by result (success, failure).",
            ["client", "result"],
            registry=self.registry,
        )
        self.on_refresh = Counter(
            "token_broker_on_refresh",
            "Runs of a client's on_refresh command, by result "
            "(success, failure, timeout, skipped).",
            ["client", "result"],
            registry=self.registry,
        )
        self.config_reloads = Counter(
            "token_broker_config_reloads",
            "Config reloads (SIGHUP or a changed file), by result: applied, "
            "unchanged, refused (needs a restart), failed (invalid file).",
            ["result"],
            registry=self.registry,
        )
        for result in RELOAD_RESULTS:
            self.config_reloads.labels(result)
        self.build = Info(
            "token_broker_build", "Version of token-broker.", registry=self.registry
        )
        self.build.info({"version": __version__})

    def add_client(self, client: str) -> None:
        """Create a client's series at zero so dashboards see it from start."""
        self.failures.labels(client).set(0)
        self.refresh_duration.labels(client)

    def refreshed(
        self,
        client: str,
        environment: str,
        duration: float,
        expires_wall: float,
        *,
        gauges: bool = True,
    ) -> None:
        """Record a successful token request.

        ``gauges`` is false for tokens of a scope subset: they count as the
        client's requests, but the gauges describe its configured token.
        """
        self.refresh.labels(client, environment, "success", "none").inc()
        self.refresh_duration.labels(client).observe(duration)
        if gauges:
            self.expiry.labels(client).set(expires_wall)
            self.failures.labels(client).set(0)

    def refresh_failed(
        self,
        client: str,
        environment: str,
        reason: str,
        duration: float,
        failures: int,
        *,
        gauges: bool = True,
    ) -> None:
        """Record a failed token request and its classified reason."""
        self.refresh.labels(client, environment, "failure", reason).inc()
        self.refresh_duration.labels(client).observe(duration)
        if gauges:
            self.failures.labels(client).set(failures)

    def served(
        self, client: str, listener: str, result: str, caller: str = "any"
    ) -> None:
        """Count one token handed out (or not) to a local caller.

        ``caller`` is the rule of the client's ``callers`` that matched
        (``uid:1000``, ``key:billing``): bounded by the config.
        """
        self.requests.labels(client, listener, result, caller).inc()

    def add_listener(self, listener: str) -> None:
        """Create a listener's refusal series at zero (tcp, unix or metrics)."""
        for reason in REFUSALS[listener]:
            self.refused.labels(listener, reason)

    def refusal(self, listener: str, reason: str) -> None:
        """Count one request or connection refused on ``listener``."""
        self.refused.labels(listener, reason).inc()

    def upstream_response(self, client: str, status: int) -> None:
        """Count one HTTP answer an issuer gave to a token request."""
        self.upstream.labels(client, str(status)).inc()

    def add_sinks(self, client: str, hook: bool) -> None:
        """Create a client's token-file series (and hook series) at zero."""
        for result in ("success", "failure"):
            self.sink_writes.labels(client, result)
        if hook:
            for result in HOOK_RESULTS:
                self.on_refresh.labels(client, result)

    def sink_written(self, client: str, ok: bool) -> None:
        """Count one token file written (or not)."""
        self.sink_writes.labels(client, "success" if ok else "failure").inc()

    def hook_ran(self, client: str, result: str) -> None:
        """Count one on_refresh run; ``result`` is one of :data:`HOOK_RESULTS`."""
        self.on_refresh.labels(client, result).inc()

    def remove_sinks(self, client: str) -> None:
        """Drop a removed client's token-file and hook series."""
        for result in ("success", "failure"):
            with contextlib.suppress(KeyError):
                self.sink_writes.remove(client, result)
        for result in HOOK_RESULTS:
            with contextlib.suppress(KeyError):
                self.on_refresh.remove(client, result)

    def remove_client(self, client: str) -> None:
        """Drop every series labelled with ``client`` (a client reloaded away)."""
        for metric in vars(self).values():
            if isinstance(metric, MetricWrapperBase) and _has_series(metric, client):
                metric.remove_by_labels({"client": client})

    def config_reloaded(self, result: str) -> None:
        """Count one reload; ``result`` is one of :data:`RELOAD_RESULTS`."""
        self.config_reloads.labels(result).inc()

    def issuer_skew(self, environment: str, seconds: float) -> None:
        """Record the clock skew last measured against an environment's issuer."""
        self.clock_skew.labels(environment).set(seconds)

    def track(
        self,
        validity: Callable[[], Iterable[tuple[str, bool]]],
        scoped_tokens: Callable[[], int],
    ) -> None:
        """Export values read at scrape time, so they are never stale.

        ``validity`` lists each client with whether it holds a servable
        token; ``scoped_tokens`` counts the cached scope-subset tokens.
        """
        self.registry.register(_Live(validity, scoped_tokens))


def _has_series(metric: MetricWrapperBase, client: str) -> bool:
    """Whether ``metric`` holds a series labelled ``client=...`` (metrics
    without a client label have none, and cannot remove by it)."""
    return any(
        sample.labels.get("client") == client
        for family in metric.collect()
        for sample in family.samples
    )


class _Live(Collector):
    """Gauges computed when Prometheus scrapes."""

    def __init__(
        self,
        validity: Callable[[], Iterable[tuple[str, bool]]],
        scoped_tokens: Callable[[], int],
    ) -> None:
        self._validity = validity
        self._scoped_tokens = scoped_tokens

    def collect(self) -> Iterator[Metric]:
        valid = GaugeMetricFamily(
            "token_broker_token_valid",
            "1 while the client holds a token that may be served, else 0.",
            labels=["client"],
        )
        for client, ok in self._validity():
            valid.add_metric([client], 1.0 if ok else 0.0)
        yield valid
        yield GaugeMetricFamily(
            "token_broker_scoped_tokens",
            "Scope-subset tokens held in the on-demand cache.",
            value=float(self._scoped_tokens()),
        )
