"""Prometheus metrics: one registry per app (no module globals), request series observed once per
call in `pipeline._finish`, live gauges read from backends, router and audit store at scrape time.

Engine series mirror vLLM's names with an `aibox:` prefix (`aibox:num_requests_running`,
`aibox:time_to_first_token_seconds`, ...) so dashboards built for vLLM work after a prefix swap.

Several worker processes (uvicorn --workers, gunicorn): set PROMETHEUS_MULTIPROC_DIR to an empty
directory before the workers start. Request counters and histograms then live in shared mmap files
and any worker's /metrics sums them; live gauges are copied into multiprocess gauges by each worker
every `refresh_s` (summed over live workers, or the max for ratios and lags).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from gateway.settings import Settings

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Buckets as vLLM uses them (seconds), so the same panels and alerts apply.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0)

# name -> (help, kind, how workers combine in multiprocess mode, labels)
_ENGINE = ("backend", "model_name")
_BACKEND = ("backend",)
LIVE_SERIES: dict[str, tuple[str, str, str, tuple[str, ...]]] = {
    "aibox:num_requests_running": ("Requests being decoded by the engine.", "gauge", "sum", _ENGINE),
    "aibox:num_requests_waiting": ("Requests queued in the engine.", "gauge", "sum", _ENGINE),
    "aibox:kv_cache_usage_perc": ("KV-cache usage, 0..1 (1 = full), as vLLM reports it.", "gauge", "max", _ENGINE),
    "aibox:num_preemptions": ("Sequences preempted by the engine.", "counter", "sum", _ENGINE),
    "aibox_backend_in_flight": ("Requests the backend is serving now.", "gauge", "sum", _BACKEND),
    "aibox_backend_ready": ("1 when the backend is loaded and serving.", "gauge", "min", _BACKEND),
    "aibox_deployment_in_flight": ("Attempts the router has in flight on this deployment.", "gauge", "sum", _BACKEND),
    "aibox_deployment_cooling": ("1 while the deployment is in cooldown after repeated failures.", "gauge", "max", _BACKEND),
    "aibox_deployment_ewma_ttft_seconds": ("Smoothed time to first token the router sees.", "gauge", "max", _BACKEND),
    "aibox_deployment_attempts": ("Attempts started on this deployment.", "counter", "sum", _BACKEND),
    "aibox_deployment_failures": ("Failed attempts that count toward cooldown.", "counter", "sum", _BACKEND),
    "aibox_requests_in_flight": ("Chat/completions requests inside the gateway now.", "gauge", "sum", ()),
    "aibox_audit_queue_depth": ("Audit rows waiting to be committed.", "gauge", "sum", ()),
    "aibox_audit_writer_lag_seconds": ("Age of the oldest uncommitted audit row.", "gauge", "max", ()),
    "aibox_audit_failing": ("1 while audit commits fail (rows are buffered).", "gauge", "max", ()),
    "aibox_audit_rows_written": ("Audit rows committed.", "counter", "sum", ()),
    "aibox_audit_spool_failures": ("Audit rows the spool could not take (disk full?); they waited for the database commit.", "counter", "sum", ()),
    "aibox_audit_rows_recovered": ("Audit rows replayed at start from the spool of a gateway that crashed.", "counter", "sum", ()),
    "aibox_audit_rows_dropped": ("Audit rows lost after the buffer filled.", "counter", "sum", ()),
    "aibox_audit_commit_failures": ("Audit commits that failed and were retried.", "counter", "sum", ()),
    "aibox_ratelimit_store_errors": ("Rate-limit store (Redis) calls that failed.", "counter", "sum", ()),
    "aibox_ratelimit_degraded_admissions": ("Requests admitted unchecked while the store was down (fail_open).", "counter", "sum", ()),
}
_ENGINE_STATS = {
    "num_requests_running": "aibox:num_requests_running",
    "num_requests_waiting": "aibox:num_requests_waiting",
    "kv_cache_usage_perc": "aibox:kv_cache_usage_perc",
    "num_preemptions_total": "aibox:num_preemptions",
}
_ROUTER_STATS = {
    "in_flight": "aibox_deployment_in_flight",
    "cooling": "aibox_deployment_cooling",
    "ewma_ttft_s": "aibox_deployment_ewma_ttft_seconds",
    "num_requests": "aibox_deployment_attempts",
    "num_failures": "aibox_deployment_failures",
}
_AUDIT_STATS = {
    "queue_depth": "aibox_audit_queue_depth",
    "writer_lag_s": "aibox_audit_writer_lag_seconds",
    "failing": "aibox_audit_failing",
    "rows_written": "aibox_audit_rows_written",
    "spool_failures": "aibox_audit_spool_failures",
    "rows_recovered": "aibox_audit_rows_recovered",
    "rows_dropped": "aibox_audit_rows_dropped",
    "commit_failures": "aibox_audit_commit_failures",
}

Sample = tuple[str, dict[str, str], float]


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def live_samples(services: Any) -> list[Sample]:
    """Read every live gauge from the running services (cheap: plain attribute reads)."""
    out: list[Sample] = [("aibox_requests_in_flight", {}, float(services.in_flight))]
    for name, backend in services.backends.items():
        info = backend.info()
        labels = {"backend": name, "model_name": info.model_id}
        out.append(("aibox_backend_ready", {"backend": name}, 1.0 if info.ready else 0.0))
        stats = backend.stats()
        out.append(("aibox_backend_in_flight", {"backend": name}, float(stats.get("in_flight", 0.0))))
        out.extend((series, labels, float(stats[key])) for key, series in _ENGINE_STATS.items() if key in stats)
    state = services.router.state() if hasattr(services.router, "state") else {}
    for name, st in state.items():
        for key, series in _ROUTER_STATS.items():
            value = st.get(key)
            if value is not None:
                out.append((series, {"backend": name}, float(value)))
    if services.audit is not None and hasattr(services.audit, "stats"):
        stats = services.audit.stats()
        out.extend((series, {}, float(stats[key])) for key, series in _AUDIT_STATS.items() if stats.get(key) is not None)
    limiter = services.limiter
    if limiter is not None:
        for attr, series in (("num_store_errors", "aibox_ratelimit_store_errors"), ("num_degraded_admissions", "aibox_ratelimit_degraded_admissions")):
            if isinstance(getattr(limiter, attr, None), int):
                out.append((series, {}, float(getattr(limiter, attr))))
    return out


class _LiveCollector:
    """Scrape-time collector for the single-process case."""

    def __init__(self, source: Callable[[], Any]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        services = self._source()
        if services is None:
            return
        families: dict[str, Any] = {}
        for name, labels, value in live_samples(services):
            fam = families.get(name)
            if fam is None:
                doc, kind, _, _ = LIVE_SERIES[name]
                cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                fam = families[name] = cls(name, doc, labels=LIVE_SERIES[name][3])
            fam.add_metric([labels[k] for k in LIVE_SERIES[name][3]], value)
        yield from families.values()


class Metrics:
    """Request-level series plus live gauges. `observe(call)` is on the hot path: label children
    are cached per label tuple."""

    def __init__(self, settings: Settings, *, multiproc_dir: str | None = None) -> None:
        self.multiproc_dir = multiproc_dir if multiproc_dir is not None else multiprocess_dir()
        self.registry = CollectorRegistry(auto_describe=True)
        self._source: Callable[[], Any] = lambda: None
        self._children: dict[tuple[Any, ...], Any] = {}
        self._live_gauges: dict[str, Gauge] = {}
        self._refresher: asyncio.Task[None] | None = None
        self.reconfigure(settings)
        r = self.registry
        self.requests = Counter("aibox_requests", "Chat/completions requests by outcome.", ["endpoint", "model", "status"], registry=r)
        self.rate_limited = Counter("aibox_rate_limited", "Requests refused by rate limits or quotas.", ["model", "reason"], registry=r)
        self.auth_failures = Counter("aibox_auth_failures", "Requests refused by authentication (401) or authorization (403).", ["status"], registry=r)
        self.fallbacks = Counter("aibox_fallbacks", "Requests served by a fallback model.", ["model"], registry=r)
        self.retries = Counter("aibox_retries", "Extra deployments tried before one answered.", ["model"], registry=r)
        self.duration = Histogram("aibox_request_duration_seconds", "Time from request arrival to the last byte, every outcome.", ["endpoint", "stream"], buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("aibox:e2e_request_latency_seconds", "End-to-end latency of served requests.", ["model_name", "backend"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("aibox:time_to_first_token_seconds", "Time to first token.", ["model_name", "backend"], buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("aibox:time_per_output_token_seconds", "Mean time per output token after the first.", ["model_name", "backend"], buckets=TPOT_BUCKETS, registry=r)
        self.queue = Histogram("aibox:request_queue_time_seconds", "Time a request waited in the backend's queue.", ["model_name", "backend"], buckets=TTFT_BUCKETS, registry=r)
        self.prompt_tokens = Counter("aibox:prompt_tokens", "Prompt tokens processed.", ["model_name", "backend"], registry=r)
        self.generation_tokens = Counter("aibox:generation_tokens", "Tokens generated.", ["model_name", "backend"], registry=r)
        self.success = Counter("aibox:request_success", "Requests that finished with a finish reason.", ["model_name", "finished_reason"], registry=r)
        if self.multiproc_dir is None:
            r.register(_LiveCollector(lambda: self._source()))  # type: ignore[arg-type]
        else:
            # Counters from live sources become gauges summed over live workers (same exposed name).
            for name, (doc, kind, agg, labels) in LIVE_SERIES.items():
                exposed = name + "_total" if kind == "counter" else name
                self._live_gauges[name] = Gauge(exposed, doc, labels, registry=r, multiprocess_mode=f"live{agg}")

    def reconfigure(self, settings: Settings) -> None:
        """Hot reload: model names bound the `model` label (unknown names are one bucket)."""
        self._known_models = frozenset(n for m in settings.models for n in (m.name, *m.aliases))

    def bind(self, source: Callable[[], Any]) -> None:
        """Where live gauges come from: a callable returning the current Services (or None)."""
        self._source = source

    # ------------------------------------------------------------------ per request
    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe(self, call: Any) -> None:
        """Record one finished request (any outcome). Never sees prompts or secrets."""
        model = call.model_served or (call.model_requested if call.model_requested in self._known_models else "unknown")
        status = call.status
        self._child(self.requests, call.endpoint, model, str(status)).inc()
        self._child(self.duration, call.endpoint, "true" if call.stream else "false").observe(call.total_ms / 1000)
        if status == 429:
            self._child(self.rate_limited, model, call.error_type or "rate_limit_exceeded").inc()
        elif status in (401, 403):
            self._child(self.auth_failures, str(status)).inc()
        if call.retries:
            self._child(self.retries, model).inc(call.retries)
        if call.fallbacks:
            self._child(self.fallbacks, model).inc(call.fallbacks)
        if call.deployment is None:
            return  # never reached a backend
        served = (call.model_served or model, call.deployment)
        if call.prompt_tokens:
            self._child(self.prompt_tokens, *served).inc(call.prompt_tokens)
        if call.completion_tokens:
            self._child(self.generation_tokens, *served).inc(call.completion_tokens)
        if call.ttft_ms is not None:
            self._child(self.ttft, *served).observe(call.ttft_ms / 1000)
        if call.queue_ms is not None:
            self._child(self.queue, *served).observe(call.queue_ms / 1000)
        if status == 200:
            self._child(self.e2e, *served).observe(call.total_ms / 1000)
            if call.completion_tokens > 1 and call.ttft_ms is not None:
                tpot = (call.total_ms - call.ttft_ms) / 1000 / (call.completion_tokens - 1)
                self._child(self.tpot, *served).observe(max(0.0, tpot))
            if call.finish_reason:
                self._child(self.success, served[0], call.finish_reason).inc()

    # ------------------------------------------------------------------ scraping
    def refresh(self) -> None:
        """Multiprocess mode: copy this worker's live gauges into the shared files."""
        services = self._source()
        if services is None or not self._live_gauges:
            return
        for name, labels, value in live_samples(services):
            gauge = self._live_gauges[name]
            names = LIVE_SERIES[name][3]
            (gauge.labels(*[labels[k] for k in names]) if names else gauge).set(value)

    def render(self) -> bytes:
        """The text exposition for GET /metrics."""
        if self.multiproc_dir is None:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        self.refresh()
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.multiproc_dir)
        return generate_latest(registry)

    async def start(self, refresh_s: float = 2.0) -> None:
        """Multiprocess mode: keep this worker's live gauges fresh between scrapes of other workers."""
        if self._live_gauges and self._refresher is None:
            self._refresher = asyncio.create_task(self._refresh_loop(refresh_s))

    async def _refresh_loop(self, refresh_s: float) -> None:
        while True:
            self.refresh()
            await asyncio.sleep(refresh_s)

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)
            self._refresher = None
        if self.multiproc_dir is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid(), self.multiproc_dir)
