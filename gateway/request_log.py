"""One structured log line per chat/completions request (logger `aibox.access`).

Fields: request id (the `x-request-id` the client sent, else the generated one), response id,
principal subject and tenant, model asked for and served, deployment, status, error code, token
counts and timings. Never the prompt, the output or the Authorization header. With
`server.log_format = "json"` every field is a JSON key; in text form they are `key=value` pairs.
"""

from __future__ import annotations

import logging
from typing import Any

from gateway.logs import JsonFormatter

log = logging.getLogger("aibox.access")

_FIELDS = (
    "request_id", "response_id", "endpoint", "subject", "tenant", "model", "model_served", "deployment",
    "stream", "status", "error_code", "finish_reason", "prompt_tokens", "completion_tokens",
    "queue_ms", "ttft_ms", "total_ms", "retries", "fallbacks",
)  # fmt: skip


def call_fields(call: Any) -> dict[str, Any]:
    """The loggable facts of one finished request."""
    p = call.principal
    return {
        "request_id": call.headers.get("x-request-id", call.request_id),
        "response_id": call.request_id,
        "endpoint": call.endpoint,
        "subject": p.subject,
        "tenant": p.tenant,
        "model": call.model_requested,
        "model_served": call.model_served,
        "deployment": call.deployment,
        "stream": call.stream,
        "status": call.status,
        "error_code": call.error_code,
        "finish_reason": call.finish_reason,
        "prompt_tokens": call.prompt_tokens,
        "completion_tokens": call.completion_tokens,
        "queue_ms": None if call.queue_ms is None else round(call.queue_ms, 2),
        "ttft_ms": None if call.ttft_ms is None else round(call.ttft_ms, 2),
        "total_ms": round(call.total_ms, 2),
        "retries": call.retries,
        "fallbacks": call.fallbacks,
    }


def log_call(call: Any) -> None:
    """Emit the access line (cheap no-op when INFO is disabled for `aibox.access`)."""
    if not log.isEnabledFor(logging.INFO):
        return
    fields = call_fields(call)
    if _json_output():  # the fields are JSON keys already; do not repeat them in "msg"
        msg, args = "request", ()
    else:
        msg, args = "request %s", (" ".join(f"{k}={fields[k]}" for k in _FIELDS if fields[k] is not None),)
    # makeRecord + handle rather than log.info: skips the caller lookup (a stack walk per request),
    # which a per-request line does not need.
    log.handle(log.makeRecord(log.name, logging.INFO, __file__, 0, msg, args, None, extra=fields))


def _json_output() -> bool:
    return any(isinstance(h.formatter, JsonFormatter) for h in logging.getLogger().handlers)
