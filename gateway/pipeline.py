"""One request, start to finish: auth -> decode -> route -> quota/limits -> generate with
failover -> stream or join -> settle limits, audit, metrics.

Failover happens only before the first byte of output reaches the client. A streaming response
waits up to `server.keepalive_s` for the first token before committing its headers (so early
failures are real HTTP errors); after that it commits and sends SSE keep-alive comments, and
failover continues invisibly until the first data event.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

from litestar.exceptions.http_exceptions import RequestEntityTooLarge

from gateway import convert
from gateway.asgi_request import APIRequest, ASGIRequest
from gateway.context import Call, Services, count, finish, overhead_ms, report_after_response, uncount
from gateway.errors import (
    APIError,
    Forbidden,
    InvalidRequest,
    ModelNotFound,
    PayloadTooLarge,
    QuotaExceeded,
    RateLimited,
    ServerError,
    Unauthorized,
    Unavailable,
)
from gateway.generation import open_with_failover
from gateway.responders import respond_json, stream
from gateway.schemas import encoder
from gateway.streaming import JSONResponse, ResponseShape, SSEResponse
from policies import auth as auth_policy
from policies import routing

__all__ = ["Call", "Services", "handle"]

log = logging.getLogger("aibox.pipeline")


# --------------------------------------------------------------------------- entry point
async def handle(services: Services, request: APIRequest, endpoint: str) -> JSONResponse | SSEResponse:
    """Serve one chat/completions request; every outcome is recorded."""
    call = _new_call(request, endpoint)
    count(services, call)
    call.report_later = True  # metrics and the access line: after the response's last byte
    response: JSONResponse | SSEResponse | None = None
    try:
        response = await _handle(services, request, call)
    except APIError as err:
        call.fail(err)
        await finish(services, call)
        response = _error_response(err, call)
    except Exception:
        log.exception("request %s failed", call.request_id)
        err = ServerError("The server had an error while processing your request.")
        call.fail(err)
        await finish(services, call)
        response = _error_response(err, call)
    finally:
        if not isinstance(response, SSEResponse):  # a stream's generator calls finish() at its end
            uncount(services, call)
    response.after = report_after_response(services, call)
    return response


def _new_call(request: APIRequest, endpoint: str) -> Call:
    prefix = "chatcmpl-" if endpoint == "chat.completions" else "cmpl-"
    call = Call(request_id=prefix + uuid.uuid4().hex, endpoint=endpoint, ts=time.time(), t0=time.perf_counter())
    call.headers["x-request-id"] = _request_id_header(request) or call.request_id
    call.scope = request.scope  # type: ignore[assignment]
    retry_hdr = request.headers.get("x-stainless-retry-count")
    call.client_retry_count = int(retry_hdr) if retry_hdr and retry_hdr.isascii() and retry_hdr.isdigit() else None
    return call


async def _handle(services: Services, request: APIRequest, call: Call) -> JSONResponse | SSEResponse:
    settings = services.settings
    # HOOK(auth)
    if services.authenticator is not None:
        try:
            call.principal = await services.authenticator.authenticate_async(request.headers.get("authorization"))
        except auth_policy.AuthError as exc:
            raise Unauthorized(exc.message) from None
    body = convert.decode_body(await _read_body(request, settings.server.max_body_bytes), call.endpoint, settings.server)
    call.model_requested, call.stream, call.user = body.model, bool(body.stream), body.user
    if not body.model:
        raise InvalidRequest("You must provide a model parameter.", param="model")
    # HOOK(routing)
    try:
        attempts = services.router.plan(body.model, call.principal)
    except routing.ModelNotFoundError:
        raise ModelNotFound(body.model) from None
    except routing.ModelForbiddenError as exc:
        raise Forbidden(str(exc), param="model") from None
    model = attempts[0].model
    subs = (
        convert.chat_requests(body, call.request_id, model.name, settings.server)  # type: ignore[arg-type]
        if call.endpoint == "chat.completions"
        else convert.completion_requests(body, call.request_id, model.name, settings.server)  # type: ignore[arg-type]
    )
    if getattr(body, "echo", False):
        call.echo = [s.prompt or "" for s in subs]
    if settings.audit.store_content:
        call.request_content = (await request.body()).decode("utf-8", "replace")  # read once: the request caches it
    # HOOK(quota)
    if services.audit is not None:
        await _check_quota(services, call)
    # HOOK(ratelimit)
    if services.limiter is not None:
        estimate = convert.estimate_prompt_tokens(subs) + len(subs) * (
            subs[0].max_tokens or settings.ratelimit.max_tokens_estimate
        )
        await _acquire(services, call, model.name, estimate)
    deadline = asyncio.get_running_loop().time() + (model.timeout_s or settings.server.request_timeout_s)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    shape_for = lambda served: ResponseShape(call.endpoint, call.request_id, int(call.ts), served, include_usage)  # noqa: E731
    if call.stream:
        open_task = asyncio.ensure_future(open_with_failover(services, call, attempts, subs, deadline))
        done, _ = await asyncio.wait({open_task}, timeout=settings.server.keepalive_s)
        if done:
            opened = open_task.result()  # raises APIError -> a real HTTP error status
            gen = stream(services, call, shape_for(opened.attempt.model.name), subs, deadline, opened=opened)
        else:
            gen = stream(services, call, None, subs, deadline, pending=open_task, shape_for=shape_for)
        call.headers["x-aibox-overhead-ms"] = f"{overhead_ms(call):.3f}"
        return SSEResponse(
            gen,
            call.headers,
            hold=lambda: call.finished,  # once finish() began the stream completes on its own: [DONE] is next
        )
    return await respond_json(services, request, call, subs, deadline, shape_for, attempts)


# --------------------------------------------------------------------------- policies
async def _check_quota(services: Services, call: Call) -> None:
    from gateway.audit import QuotaExhausted

    try:
        await services.audit.check_quota(call.principal)
    except QuotaExhausted as exc:
        retry = max(1, int(exc.reset_at - time.time()))
        raise QuotaExceeded(str(exc), headers={"Retry-After": str(retry)}) from None


async def _acquire(services: Services, call: Call, model: str, tokens: int) -> None:
    from policies import ratelimit

    try:
        call.reservation = await services.limiter.acquire(call.principal, model, tokens)
    except ratelimit.LimitExceeded as exc:
        cls = QuotaExceeded if exc.quota else RateLimited
        raise cls(exc.message, headers=dict(exc.headers)) from None
    except ratelimit.LimiterUnavailable as exc:
        raise Unavailable(exc.message, headers={"Retry-After": "1"}) from None
    call.headers.update(call.reservation.headers)


async def _read_body(request: APIRequest, limit: int) -> bytes:
    try:
        return await request.body()
    except RequestEntityTooLarge:
        raise PayloadTooLarge(f"Request body is larger than the limit of {limit} bytes.") from None


async def record_refusal(services: Services, scope: Any, err: APIError) -> list[tuple[bytes, bytes]]:
    """Audit (and count, and log) an API request refused before it reached the pipeline, e.g.
    while draining; returns the x-request-id header for the refusal."""
    endpoint = "chat.completions" if scope["path"].endswith("/chat/completions") else "completions"
    request = ASGIRequest(scope, None, 0)  # headers only: the body is never read
    call = _new_call(request, endpoint)
    if services.authenticator is not None:
        try:  # attribute the row to the caller when the token is good; anonymous otherwise (no waiting)
            call.principal = services.authenticator.authenticate(request.headers.get("authorization"))
        except (auth_policy.AuthError, auth_policy.RefreshNeeded):
            pass
    count(services, call)
    call.fail(err)
    await finish(services, call)
    return [(b"x-request-id", call.headers["x-request-id"].encode())]


def _request_id_header(request: APIRequest) -> str | None:
    value = request.headers.get("x-request-id")
    if value and len(value) <= 128 and all(c.isalnum() or c in "-_.:" for c in value):
        return value
    return None


def _error_response(err: APIError, call: Call) -> JSONResponse:
    return JSONResponse(encoder.encode(err.body()), err.status_code, {**call.headers, **err.headers})
