"""Turning opened backend streams into the client's response: one JSON body, or an SSE stream.
Cleanup (limits, audit) runs before the last byte is sent, or in the background when the
client has gone away."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from backends.base import BackendError, GenerationRequest
from gateway.asgi_request import APIRequest
from gateway.context import Call, Services, finish, overhead_ms
from gateway.errors import APIError, ServerError, from_backend_error
from gateway.generation import Opened, aclose, merge, new_choices, open_with_failover, totals
from gateway.schemas import encoder
from gateway.streaming import DONE, KEEPALIVE, ClientGone, JSONResponse, ResponseShape, error_event
from policies import routing

log = logging.getLogger("aibox.pipeline")


async def respond_json(
    services: Services,
    request: APIRequest,
    call: Call,
    subs: list[GenerationRequest],
    deadline: float,
    shape_for: Callable[[str], ResponseShape],
    attempts: list[routing.Attempt],
) -> JSONResponse:
    """Join every choice into one JSON body. Nothing reaches the client until the end, so a
    deployment failing mid-generation is retried on the next one (the request starts over)."""
    choices = new_choices(call, subs)
    opened: Opened | None = None

    async def collect() -> None:
        nonlocal opened, choices
        remaining = attempts
        while True:
            current = opened = await open_with_failover(services, call, remaining, subs, deadline)
            try:
                async for i, chunk in merge(current, deadline, services.settings.server.idle_timeout_s):
                    choices[i].take(chunk)
                return
            except BackendError as exc:
                end_attempt(services, call, current, ok=False, retriable=exc.retriable)
                opened = None  # this attempt is ended; nothing left to end on disconnect
                rest = remaining[remaining.index(current.attempt) + 1 :] if current.attempt in remaining else []
                if not exc.retriable or not rest or asyncio.get_running_loop().time() >= deadline:
                    raise
                log.warning("deployment %s failed mid-generation for %s; retrying on the next", current.attempt.backend, call.request_id)
                call.retries += 1
                remaining, choices = rest, new_choices(call, subs)
            except Exception:  # a bug in a backend: end the attempt (in-flight count) and fail with 500
                end_attempt(services, call, current, ok=False, retriable=True)
                opened = None
                raise
            finally:
                for it in current.iters:
                    await aclose(it)

    # collect() in its own task: its awaits resume a short chain of coroutines, where in this
    # task each resume would pass through every layer above (uvicorn, drain, pipeline). Run
    # inline it was 0.02 ms faster at c=1 but cost 467 -> 510 us of CPU per request at c=32
    # (bench.ab, 5 rounds; stop 11 saw the same).
    collector = asyncio.ensure_future(collect())
    gone = ClientGone(request.scope, request.receive, collector.cancel)  # the client leaving aborts the backend work
    try:
        await collector
    except BackendError as exc:
        raise from_backend_error(exc) from None
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if not gone.fired or (task is not None and task.cancelling()):
            raise  # we are cancelled ourselves (shutdown), and so was the collector; or someone else cancelled it
        call.abandoned()  # the client left: `gone` cancelled the collector
        end_attempt(services, call, opened, ok=False)  # neither success nor the deployment's fault
        totals(call, choices, subs)
        await finish(services, call)
        return JSONResponse(b"", 499)
    finally:
        gone.close()
    call.t_last = time.perf_counter()
    end_attempt(services, call, opened, ok=True)
    totals(call, choices, subs)
    assert opened is not None
    texts = [c.echo + "".join(c.text) for c in choices]
    body = shape_for(opened.attempt.model.name).full(
        texts, [c.finish or "stop" for c in choices], call.prompt_tokens, call.completion_tokens
    )
    if services.settings.audit.store_content:
        call.response_content = encoder.encode(texts).decode()
    await finish(services, call)  # the row is durable before the client sees the body
    call.headers["x-aibox-overhead-ms"] = f"{overhead_ms(call):.3f}"
    return JSONResponse(encoder.encode(body), 200, call.headers)


def end_attempt(services: Services, call: Call, opened: Opened | None, *, ok: bool, retriable: bool = False) -> None:
    if opened is not None:
        ttft = call.t_first - call.t_backend if call.t_first and call.t_backend else None
        services.router.end(opened.attempt.backend, ok=ok, ttft_s=ttft, retriable_failure=retriable)


async def stream(
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
    choices = new_choices(call, subs)
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
                await finish(services, call)  # not cut by a disconnect (SSEResponse's hold)
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
            async for i, chunk in merge(opened, deadline, services.settings.server.idle_timeout_s):
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
        except Exception:  # a bug in a backend: still a clean error event, [DONE] and a 500 row
            ok, retriable = False, True
            log.exception("stream %s failed mid-way with an unexpected error", call.request_id)
            err = ServerError("The server had an error while processing your request.")
            call.fail(err)
            yield error_event(err.body())
        totals(call, choices, subs)
        if ok and shape.include_usage:
            yield shape.usage_chunk(call.prompt_tokens, call.completion_tokens)
        if services.settings.audit.store_content:
            call.response_content = encoder.encode(["".join(c.text) for c in choices]).decode()
        await close_streams(opened)
        ended, opened = opened, None  # ended here: a disconnect from now on must not end it again
        end_attempt(services, call, ended, ok=ok, retriable=retriable)
        await finish(services, call)  # durable before [DONE]; a disconnect no longer cancels (SSEResponse's hold)
        finished_cleanly = True
        yield DONE
    finally:
        if not finished_cleanly:  # client disconnected (we are being cancelled) or a bug
            abandon(services, call, choices, subs, opened, pending)


def abandon(
    services: Services,
    call: Call,
    choices: list[Any] | None,
    subs: list[GenerationRequest],
    opened: Opened | None,
    pending: asyncio.Future[Opened] | None,
) -> None:
    """The client left before the stream ended. Cancel what is still opening, count what was
    generated, and close the backend streams, end the attempt and finish (row 499) in the
    background. Nothing to do once finish() has begun: it completes on its own (SSEResponse's
    hold)."""
    if call.finished:
        return
    call.report_later = False  # the background cleanup reports when its finish() is done
    if pending is not None:
        if not pending.done():
            pending.cancel()  # open_with_failover ends its attempt on cancel
        elif opened is None and not pending.cancelled() and pending.exception() is None:
            opened = pending.result()  # opened, but the stream never took it over: close it here
    call.abandoned()
    totals(call, choices if choices is not None else new_choices(call, subs), subs)
    spawn(services, _abort_cleanup(services, call, opened))


def spawn(services: Services, coro: Any) -> asyncio.Task[Any]:
    """Run cleanup in the background; a drain waits for it (services.background)."""
    task = asyncio.get_running_loop().create_task(coro)
    services.background.add(task)
    task.add_done_callback(services.background.discard)
    return task


async def close_streams(opened: Opened | None) -> None:
    if opened is not None:
        for it in opened.iters:
            await aclose(it)


async def _abort_cleanup(services: Services, call: Call, opened: Opened | None) -> None:
    await close_streams(opened)
    end_attempt(services, call, opened, ok=False)  # a disconnect is neither success nor the deployment's fault
    await finish(services, call)
