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
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.response import Stream

from backends.base import Backend, BackendError, BackendTimeout, Chunk, GenerationRequest, Usage
from gateway import convert, request_log
from gateway.errors import (
    APIError,
    Forbidden,
    InvalidRequest,
    PayloadTooLarge,
    ModelNotFound,
    QuotaExceeded,
    RateLimited,
    ServerError,
    Unauthorized,
    Unavailable,
    from_backend_error,
)
from gateway.schemas import encoder
from gateway.settings import Settings
from gateway.streaming import DONE, KEEPALIVE, ResponseShape, error_event
from policies import auth as auth_policy
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
    in_flight: int = 0


@dataclass
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

    def fail(self, err: APIError) -> None:
        self.status, self.error_type, self.error_code = err.status_code, err.error_type, err.code


@dataclass
class Opened:
    """The streams of one successful attempt (one per choice), with their first chunks."""

    attempt: routing.Attempt
    firsts: list[Chunk]
    iters: list[AsyncIterator[Chunk]]


# --------------------------------------------------------------------------- entry point
async def handle(services: Services, request: Request[Any, Any, Any], endpoint: str) -> Response[Any]:
    """Serve one chat/completions request; every outcome is recorded."""
    prefix = "chatcmpl-" if endpoint == "chat.completions" else "cmpl-"
    call = Call(request_id=prefix + uuid.uuid4().hex, endpoint=endpoint, ts=time.time(), t0=time.perf_counter())
    call.headers["x-request-id"] = _request_id_header(request) or call.request_id
    retry_hdr = request.headers.get("x-stainless-retry-count")
    call.client_retry_count = int(retry_hdr) if retry_hdr and retry_hdr.isdigit() else None
    services.in_flight += 1
    try:
        return await _handle(services, request, call)
    except APIError as err:
        call.fail(err)
        await _finish(services, call)
        return _error_response(err, call)
    except Exception:
        log.exception("request %s failed", call.request_id)
        err = ServerError("The server had an error while processing your request.")
        call.fail(err)
        await _finish(services, call)
        return _error_response(err, call)
    finally:
        services.in_flight -= 1


async def _handle(services: Services, request: Request[Any, Any, Any], call: Call) -> Response[Any]:
    settings = services.settings
    # HOOK(auth)
    if services.authenticator is not None:
        try:
            call.principal = services.authenticator.authenticate(request.headers.get("authorization"))
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
    if settings.audit.store_content:
        call.request_content = (await request.body()).decode("utf-8", "replace")  # cached by Litestar
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
    open_task = asyncio.ensure_future(_open_with_failover(services, call, attempts, subs, deadline))
    if call.stream:
        done, _ = await asyncio.wait({open_task}, timeout=settings.server.keepalive_s)
        if done:
            opened = open_task.result()  # raises APIError -> a real HTTP error status
            shape = shape_for(opened.attempt.model.name)
            gen = _stream(services, call, shape, subs, deadline, opened=opened)
        else:
            gen = _stream(services, call, None, subs, deadline, pending=open_task, shape_for=shape_for)
        call.headers["x-aibox-overhead-ms"] = f"{_overhead_ms(call):.3f}"
        return Stream(gen, media_type="text/event-stream", headers={**call.headers, "cache-control": "no-cache"})
    return await _respond_json(services, request, call, subs, deadline, open_task, shape_for)


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


# --------------------------------------------------------------------------- failover
async def _open_with_failover(
    services: Services, call: Call, attempts: list[routing.Attempt], subs: list[GenerationRequest], deadline: float
) -> Opened:
    """Try deployments in order until one produces a first chunk for every choice."""
    last: BackendError | None = None
    for k, attempt in enumerate(attempts):
        backend = services.backends.get(attempt.backend)
        if backend is None:
            continue
        if k and asyncio.get_running_loop().time() >= deadline:
            break  # the request's deadline is spent; the deployments left are not at fault (no cooldown)
        if k:
            call.retries += 1
            call.fallbacks += attempt.is_fallback
        model_subs = subs if attempt.model.name == subs[0].model else [msgspec.structs.replace(s, model=attempt.model.name) for s in subs]
        services.router.begin(attempt.backend)
        t_start = time.perf_counter()
        try:
            async with asyncio.timeout_at(deadline):
                pairs = await _open_all(backend, model_subs)
        except (BackendError, TimeoutError) as exc:
            err = exc if isinstance(exc, BackendError) else BackendTimeout("The deployment did not answer before the request deadline.")
            services.router.end(attempt.backend, ok=False, retriable_failure=err.retriable)
            log.warning("deployment %s failed for %s: %s", attempt.backend, call.request_id, err.message)
            if not err.retriable:
                raise from_backend_error(err) from None
            last = err
            continue
        except asyncio.CancelledError:
            services.router.end(attempt.backend, ok=False)
            raise
        except Exception:
            services.router.end(attempt.backend, ok=False, retriable_failure=True)
            log.exception("deployment %s raised an unexpected error", attempt.backend)
            last = BackendError("internal error in backend")
            continue
        call.t_backend, call.t_first = t_start, time.perf_counter()
        call.ttft_ms = (call.t_first - call.t0) * 1000
        call.model_served, call.deployment = attempt.model.name, attempt.backend
        call.backend_type = backend.info().type
        call.queue_ms = pairs[0][0].queue_ms
        return Opened(attempt, [p[0] for p in pairs], [p[1] for p in pairs])
    if last is None:
        raise Unavailable("No deployment is available for this model.")
    raise from_backend_error(last)


async def _open_one(backend: Backend, sub: GenerationRequest) -> tuple[Chunk, AsyncIterator[Chunk]]:
    it = backend.generate(sub)
    try:
        first = await anext(it)
    except StopAsyncIteration:
        first = Chunk(finish_reason="stop", usage=Usage())
    except BaseException:
        await _aclose(it)
        raise
    return first, it


async def _open_all(backend: Backend, subs: list[GenerationRequest]) -> list[tuple[Chunk, AsyncIterator[Chunk]]]:
    if len(subs) == 1:
        return [await _open_one(backend, subs[0])]
    tasks = [asyncio.ensure_future(_open_one(backend, s)) for s in subs]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for r in results:
            if isinstance(r, tuple):
                await _aclose(r[1])
        raise


async def _aclose(it: AsyncIterator[Chunk]) -> None:
    aclose = getattr(it, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:  # a backend failing while being closed must not mask the real outcome
            log.debug("error while closing a backend stream", exc_info=True)


# --------------------------------------------------------------------------- consuming
class _Choice:
    __slots__ = ("index", "text", "finish", "usage", "num_chunks", "echo")

    def __init__(self, index: int, sub: GenerationRequest) -> None:
        self.index = index
        self.text: list[str] = []
        self.finish: str | None = None
        self.usage: Usage | None = None
        self.num_chunks = 0
        self.echo = sub.prompt if sub.echo and sub.prompt else ""

    def take(self, chunk: Chunk) -> None:
        if chunk.text:
            self.text.append(chunk.text)
            self.num_chunks += 1
        if chunk.finish_reason is not None:
            self.finish = chunk.finish_reason
            self.usage = chunk.usage


async def _next(it: AsyncIterator[Chunk], deadline: float, idle_s: float) -> Chunk | None:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout_at(min(deadline, loop.time() + idle_s)):
            return await anext(it)
    except StopAsyncIteration:
        return None
    except TimeoutError:
        raise BackendTimeout("The backend stopped producing output (deadline exceeded).") from None


async def _merge(opened: Opened, deadline: float, idle_s: float) -> AsyncIterator[tuple[int, Chunk]]:
    """(choice index, chunk) from every choice's stream, first chunks first."""
    for i, first in enumerate(opened.firsts):
        yield i, first
    live = [i for i, f in enumerate(opened.firsts) if f.finish_reason is None]
    if len(opened.iters) == 1:
        if live:
            while (chunk := await _next(opened.iters[0], deadline, idle_s)) is not None:
                yield 0, chunk
                if chunk.finish_reason is not None:
                    break
        return
    queue: asyncio.Queue[tuple[int, Chunk | BaseException | None]] = asyncio.Queue()

    async def pump(i: int) -> None:
        try:
            while (chunk := await _next(opened.iters[i], deadline, idle_s)) is not None:
                await queue.put((i, chunk))
                if chunk.finish_reason is not None:
                    break
            await queue.put((i, None))
        except BaseException as exc:  # noqa: BLE001 - forwarded to the consumer
            await queue.put((i, exc))

    tasks = [asyncio.ensure_future(pump(i)) for i in live]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _totals(call: Call, choices: list[_Choice], subs: list[GenerationRequest]) -> None:
    # The prompt is counted once per distinct prompt (n choices share it), as OpenAI does.
    seen: set[int] = set()
    prompt = completion = 0
    for c, sub in zip(choices, subs, strict=True):
        key = id(sub.messages) if sub.messages is not None else id(sub.prompt)
        if c.usage is not None:
            if key not in seen:
                prompt += c.usage.prompt_tokens
                seen.add(key)
            completion += c.usage.completion_tokens
        else:
            completion += c.num_chunks  # cut short: count what was produced
    call.prompt_tokens, call.completion_tokens = prompt, completion
    call.finish_reason = choices[0].finish if choices else None


async def _respond_json(
    services: Services,
    request: Request[Any, Any, Any],
    call: Call,
    subs: list[GenerationRequest],
    deadline: float,
    open_task: asyncio.Future[Opened],
    shape_for: Callable[[str], ResponseShape],
) -> Response[Any]:
    choices = [_Choice(i, s) for i, s in enumerate(subs)]
    opened: Opened | None = None

    async def collect() -> None:
        nonlocal opened
        opened = await open_task
        try:
            async for i, chunk in _merge(opened, deadline, services.settings.server.idle_timeout_s):
                choices[i].take(chunk)
        finally:
            for it in opened.iters:
                await _aclose(it)

    collector = asyncio.ensure_future(collect())
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({collector, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not collector.done():  # the client went away: abort the backend work
        collector.cancel()
        await asyncio.gather(collector, return_exceptions=True)
        call.status, call.error_type, call.error_code = 499, "client_closed", "client_closed"
        _end_attempt(services, call, opened, ok=True)
        _totals(call, choices, subs)
        await _finish(services, call)
        return Response(content=b"", status_code=499)
    try:
        collector.result()
    except BackendError as exc:
        _end_attempt(services, call, opened, ok=False, retriable=exc.retriable)
        raise from_backend_error(exc) from None
    call.t_last = time.perf_counter()
    _end_attempt(services, call, opened, ok=True)
    _totals(call, choices, subs)
    assert opened is not None
    texts = [c.echo + "".join(c.text) for c in choices]
    body = shape_for(opened.attempt.model.name).full(
        texts, [c.finish or "stop" for c in choices], call.prompt_tokens, call.completion_tokens
    )
    if services.settings.audit.store_content:
        call.response_content = encoder.encode(texts).decode()
    await _finish(services, call)  # committed before the client sees the body
    call.headers["x-aibox-overhead-ms"] = f"{_overhead_ms(call):.3f}"
    return Response(content=encoder.encode(body), media_type="application/json", headers=call.headers)


async def _wait_disconnect(request: Request[Any, Any, Any]) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _end_attempt(services: Services, call: Call, opened: Opened | None, *, ok: bool, retriable: bool = False) -> None:
    if opened is not None:
        ttft = call.t_first - call.t_backend if call.t_first and call.t_backend else None
        services.router.end(opened.attempt.backend, ok=ok, ttft_s=ttft, retriable_failure=retriable)


async def _stream(
    services: Services,
    call: Call,
    shape: ResponseShape | None,
    subs: list[GenerationRequest],
    deadline: float,
    *,
    opened: Opened | None = None,
    pending: asyncio.Future[Opened] | None = None,
    shape_for: Callable[[str], ResponseShape] | None = None,
) -> AsyncIterator[bytes]:
    """The SSE body. Cleanup (limits, audit) runs before [DONE], or in the background if the
    client disconnected (the task is being cancelled then)."""
    choices = [_Choice(i, s) for i, s in enumerate(subs)]
    finished_cleanly = False
    ok = True
    retriable = False  # a mid-stream failure of the deployment (not failover-able) still counts toward cooldown
    try:
        if opened is None:
            assert pending is not None and shape_for is not None
            while not pending.done():  # a long prefill: keep the connection alive
                await asyncio.wait({pending}, timeout=services.settings.server.keepalive_s)
                if not pending.done():
                    yield KEEPALIVE
            try:
                opened = pending.result()
            except APIError as err:
                call.fail(err)
                ok = False
                yield error_event(err.body())
                await _finish(services, call)
                finished_cleanly = True
                yield DONE
                return
            shape = shape_for(opened.attempt.model.name)
        assert shape is not None
        if shape.chat:
            for i in range(len(subs)):
                yield shape.role_chunk(i)
        for c in choices:
            if c.echo:
                yield shape.text_chunk(c.index, c.echo)
        try:
            async for i, chunk in _merge(opened, deadline, services.settings.server.idle_timeout_s):
                choices[i].take(chunk)
                if chunk.text:
                    yield shape.text_chunk(i, chunk.text)
                if chunk.finish_reason is not None:
                    yield shape.finish_chunk(i, chunk.finish_reason)
        except BackendError as exc:
            ok, retriable = False, exc.retriable
            err = from_backend_error(exc)
            call.fail(err)
            log.warning("stream %s failed mid-way: %s", call.request_id, exc.message)
            yield error_event(err.body())
        _totals(call, choices, subs)
        if ok and shape.include_usage:
            yield shape.usage_chunk(call.prompt_tokens, call.completion_tokens)
        if services.settings.audit.store_content:
            call.response_content = encoder.encode(["".join(c.text) for c in choices]).decode()
        await _close_streams(opened)
        _end_attempt(services, call, opened, ok=ok, retriable=retriable)
        await _finish(services, call)  # committed before [DONE]
        finished_cleanly = True
        yield DONE
    finally:
        if not finished_cleanly:  # client disconnected (we are being cancelled) or a bug
            if pending is not None and not pending.done():
                pending.cancel()
            call.status, call.error_type, call.error_code = 499, "client_closed", "client_closed"
            _totals(call, choices, subs)
            task = asyncio.get_running_loop().create_task(_abort_cleanup(services, call, opened))
            services.background.add(task)
            task.add_done_callback(services.background.discard)


async def _close_streams(opened: Opened | None) -> None:
    if opened is not None:
        for it in opened.iters:
            await _aclose(it)


async def _abort_cleanup(services: Services, call: Call, opened: Opened | None) -> None:
    await _close_streams(opened)
    _end_attempt(services, call, opened, ok=True)
    await _finish(services, call)


# --------------------------------------------------------------------------- the end of every request
async def _finish(services: Services, call: Call) -> None:
    """Settle the rate-limit reservation, write the audit row, observe metrics. Never raises."""
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
    # HOOK(metrics)
    if services.metrics is not None:
        try:
            services.metrics.observe(call)
        except Exception:
            log.exception("metrics failed for %s", call.request_id)
    request_log.log_call(call)


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


def _overhead_ms(call: Call) -> float:
    """Time spent in the gateway itself: elapsed minus time spent waiting on the backend."""
    now = time.perf_counter()
    end = call.t_last or call.t_first
    backend = (end - call.t_backend) if end and call.t_backend else 0.0
    return max(0.0, (now - call.t0 - backend) * 1000)


async def _read_body(request: Request[Any, Any, Any], limit: int) -> bytes:
    try:
        return await request.body()
    except RequestEntityTooLarge:
        raise PayloadTooLarge(f"Request body is larger than the limit of {limit} bytes.") from None


def _request_id_header(request: Request[Any, Any, Any]) -> str | None:
    value = request.headers.get("x-request-id")
    if value and len(value) <= 128 and all(c.isalnum() or c in "-_.:" for c in value):
        return value
    return None


def _error_response(err: APIError, call: Call) -> Response[bytes]:
    headers = {**call.headers, **err.headers}
    return Response(content=encoder.encode(err.body()), status_code=err.status_code, media_type="application/json", headers=headers)
