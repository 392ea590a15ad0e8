"""Per-request state (`Call`), the services a request uses (`Services`), and the end of
every request: settle the rate-limit reservation and write the audit row (`finish`, before the
response's last byte), then observe metrics and log (`report`, after it when the response
runs it: nothing the client waits for)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from backends.base import Backend
from gateway import request_log
from gateway.drain import aborted_error
from gateway.errors import APIError, ClientClosed
from gateway.settings import Settings
from policies import routing
from policies.auth import ANONYMOUS, Principal

log = logging.getLogger("aibox.pipeline")


@dataclass
class Services:
    """Everything a request needs, built by the app lifespan; replaced whole on hot reload so an
    in-flight request keeps the snapshot it started with."""

    settings: Settings
    backends: dict[str, Backend]
    router: routing.Router
    authenticator: Any | None = None  # policies.auth.Authenticator; None when auth is disabled
    limiter: Any | None = None  # policies.ratelimit.RateLimiter; None when rate limits are disabled
    audit: Any | None = None  # gateway.audit.AuditStore; None when audit is disabled
    metrics: Any | None = None  # gateway.metrics.Metrics
    background: set[asyncio.Task[Any]] = field(default_factory=set)  # cleanup of aborted requests
    in_flight: int = 0  # calls begun and not yet finished (streams count until their last byte)


@dataclass(slots=True)
class Call:
    """Bookkeeping of one request; becomes its audit row and metrics."""

    request_id: str
    endpoint: str
    ts: float
    t0: float
    principal: Principal = ANONYMOUS
    model_requested: str | None = None
    model_served: str | None = None
    deployment: str | None = None
    backend_type: str | None = None
    stream: bool = False
    status: int = 200
    error_type: str | None = None
    error_code: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_ms: float | None = None
    ttft_ms: float | None = None
    total_ms: float = 0.0
    retries: int = 0
    fallbacks: int = 0
    user: str | None = None
    client_retry_count: int | None = None
    request_content: str | None = None
    response_content: str | None = None
    t_backend: float | None = None  # when the successful attempt began
    t_first: float | None = None  # when its first chunk arrived
    t_last: float | None = None  # when its last chunk arrived (non-streaming)
    reservation: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    settled: bool = False
    counted: bool = False  # in services.in_flight; uncounted once, by finish() or the handler
    finished: bool = False  # finish() has run (or is running): limits settled, row recorded
    report_later: bool = False  # the response calls report() after its last byte; finish() does not
    reported: bool = False
    echo: list[str] | None = None  # completions `echo`: the prompt of each choice, prepended by us
    scope: dict[str, Any] | None = None  # the ASGI scope: tells a drain abort from a client leaving

    def abandoned(self) -> None:
        """The response was cut off: by a graceful-shutdown abort (503) or by the client (499)."""
        self.fail(aborted_error(self.scope) or ClientClosed("The client closed the connection."))

    def fail(self, err: APIError) -> None:
        self.status, self.error_type, self.error_code = err.status_code, err.error_type, err.code


async def finish(services: Services, call: Call) -> None:
    """Settle the rate-limit reservation and write the audit row; then report() (metrics, access
    line) unless the response does that after its last byte (`call.report_later`). Never raises.

    Once per call: a second call (a stream's disconnect cleanup racing its own finish) returns
    at once. A stream's client leaving does not cut it (SSEResponse's `hold`); only a cancel from
    elsewhere (uvicorn's forced shutdown after the drain timeout) could."""
    if call.finished:
        return
    call.finished = True
    try:
        await _finish(services, call)
    finally:
        uncount(services, call)


async def _finish(services: Services, call: Call) -> None:
    call.total_ms = (time.perf_counter() - call.t0) * 1000
    if call.reservation is not None and not call.settled and services.limiter is not None:
        call.settled = True
        try:
            await services.limiter.settle(call.reservation, call.prompt_tokens + call.completion_tokens)
        except Exception:
            log.exception("rate-limit settle failed for %s", call.request_id)
    # HOOK(audit)
    if services.audit is not None:
        try:
            await services.audit.record(_audit_record(call))
        except Exception:
            log.exception("audit record failed for %s", call.request_id)
    if not call.report_later:
        report(services, call)


def report(services: Services, call: Call) -> None:
    """Metrics and the access line, once per call, after finish()."""
    if call.reported:
        return
    call.reported = True
    # HOOK(metrics)
    if services.metrics is not None:
        try:
            services.metrics.observe(call)
        except Exception:
            log.exception("metrics failed for %s", call.request_id)
    request_log.log_call(call)


def report_after_response(services: Services, call: Call) -> Callable[[], None]:
    """For a response's `after`: report once it has sent its last byte, unless the call was cut
    off (then its background cleanup reports at the end of finish())."""

    def after() -> None:
        if call.report_later and call.finished:
            report(services, call)

    return after


def count(services: Services, call: Call) -> None:
    services.in_flight += 1
    call.counted = True


def uncount(services: Services, call: Call) -> None:
    if call.counted:
        call.counted = False
        services.in_flight -= 1


def _audit_record(call: Call) -> Any:
    from gateway.audit import AuditRecord

    p = call.principal
    return AuditRecord(
        request_id=call.request_id, ts=call.ts, subject=p.subject, tenant=p.tenant, tier=p.tier,
        endpoint=call.endpoint, model_requested=call.model_requested, model_served=call.model_served,
        deployment=call.deployment, backend_type=call.backend_type, stream=call.stream, status=call.status,
        error_type=call.error_type, error_code=call.error_code, finish_reason=call.finish_reason,
        prompt_tokens=call.prompt_tokens, completion_tokens=call.completion_tokens, queue_ms=call.queue_ms,
        ttft_ms=call.ttft_ms, total_ms=call.total_ms, retries=call.retries, fallbacks=call.fallbacks,
        user=call.user, client_retry_count=call.client_retry_count,
        request_content=call.request_content, response_content=call.response_content,
    )  # fmt: skip


def overhead_ms(call: Call) -> float:
    """Time spent in the gateway itself: elapsed minus time spent waiting on the backend."""
    now = time.perf_counter()
    end = call.t_last or call.t_first
    backend = (end - call.t_backend) if end and call.t_backend else 0.0
    return max(0.0, (now - call.t0 - backend) * 1000)
