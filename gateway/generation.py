"""Generation with failover: open every choice's stream on the first deployment that answers,
then merge the streams chunk by chunk under the request's deadlines."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import msgspec

from backends.base import Backend, BackendError, BackendTimeout, Chunk, GenerationRequest, Usage
from gateway.context import Call, Services
from gateway.convert import estimate_prompt_tokens, prompt_key
from gateway.errors import Unavailable, from_backend_error
from policies import routing

log = logging.getLogger("aibox.pipeline")


@dataclass
class Opened:
    """The streams of one successful attempt (one per choice), with their first chunks."""

    attempt: routing.Attempt
    firsts: list[Chunk]
    iters: list[AsyncIterator[Chunk]]


async def open_with_failover(
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
        await aclose(it)
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
                await aclose(r[1])
        raise


async def aclose(it: AsyncIterator[Chunk]) -> None:
    aclose = getattr(it, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:  # a backend failing while being closed must not mask the real outcome
            log.debug("error while closing a backend stream", exc_info=True)


class Choice:
    __slots__ = ("index", "text", "finish", "usage", "num_tokens", "echo")

    def __init__(self, index: int, echo: str = "") -> None:
        self.index = index
        self.text: list[str] = []
        self.finish: str | None = None
        self.usage: Usage | None = None
        self.num_tokens = 0  # as the chunks say: what a choice cut off before its usage produced
        self.echo = echo

    def take(self, chunk: Chunk) -> None:
        if chunk.text:
            self.text.append(chunk.text)
            self.num_tokens += chunk.num_tokens
        if chunk.finish_reason is not None:
            self.finish = chunk.finish_reason
            self.usage = chunk.usage


class Watchdog:
    """The idle and total deadlines of one stream, with at most one timer per idle period rather
    than one per chunk (a per-chunk `asyncio.timeout` was ~12% of the gateway's CPU on short
    streams). The idle clock runs only while we wait on the backend, never while a slow client
    applies backpressure."""

    __slots__ = ("loop", "deadline", "idle_s", "last", "owner", "waiting", "fired", "handle")

    def __init__(self, deadline: float, idle_s: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.deadline, self.idle_s = deadline, idle_s
        self.last = self.loop.time()  # when the current wait began
        self.owner: asyncio.Task[object] | None = None  # the task iterating the stream (one per stream)
        self.waiting = False  # on the backend (the only time the deadlines apply)
        self.fired = False
        self.handle: asyncio.TimerHandle | None = None

    def _due(self) -> float:
        return min(self.deadline, self.last + self.idle_s)

    def _check(self) -> None:
        self.handle = None
        if not self.waiting or self.owner is None:
            return  # not waiting: the next wait re-arms
        due = self._due()
        if self.loop.time() >= due:
            self.fired = True
            self.owner.cancel()
        else:
            self.handle = self.loop.call_at(due, self._check)

    async def next(self, it: AsyncIterator[Chunk]) -> Chunk | None:
        """The next chunk, None at the end, or BackendTimeout when a deadline passes."""
        self.last = self.loop.time()
        if self.owner is None:
            self.owner = asyncio.current_task()
        self.waiting = True
        if self.handle is None:
            self.handle = self.loop.call_at(self._due(), self._check)
        try:
            return await anext(it)
        except StopAsyncIteration:
            return None
        except asyncio.CancelledError:
            if not self.fired or self.owner is None or self.owner.uncancel() > 0:
                raise  # a real cancellation (client gone, shutdown), also when it raced our timeout
            raise BackendTimeout("The backend stopped producing output (deadline exceeded).") from None
        finally:
            self.waiting = False

    def close(self) -> None:
        if self.handle is not None:
            self.handle.cancel()


async def merge(opened: Opened, deadline: float, idle_s: float) -> AsyncIterator[tuple[int, Chunk]]:
    """(choice index, chunk) from every choice's stream, first chunks first."""
    for i, first in enumerate(opened.firsts):
        yield i, first
    live = [i for i, f in enumerate(opened.firsts) if f.finish_reason is None]
    if len(opened.iters) == 1:
        if live:
            watchdog = Watchdog(deadline, idle_s)
            try:
                while (chunk := await watchdog.next(opened.iters[0])) is not None:
                    yield 0, chunk
                    if chunk.finish_reason is not None:
                        break
            finally:
                watchdog.close()
        return
    queue: asyncio.Queue[tuple[int, Chunk | BaseException | None]] = asyncio.Queue()

    async def pump(i: int) -> None:
        watchdog = Watchdog(deadline, idle_s)
        try:
            while (chunk := await watchdog.next(opened.iters[i])) is not None:
                await queue.put((i, chunk))
                if chunk.finish_reason is not None:
                    break
            await queue.put((i, None))
        except BaseException as exc:  # noqa: BLE001 - forwarded to the consumer
            await queue.put((i, exc))
        finally:
            watchdog.close()

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


def new_choices(call: Call, subs: list[GenerationRequest]) -> list[Choice]:
    """Fresh per-choice accumulators (echo prefixes included) for one attempt."""
    return [Choice(i, call.echo[i] if call.echo else "") for i in range(len(subs))]


def totals(call: Call, choices: list[Choice], subs: list[GenerationRequest]) -> None:
    """Usage of the whole request. The prompt is counted once per distinct prompt (n choices share
    it), as OpenAI does. A prompt none of whose choices finished (timeout, error, disconnect) was
    still processed: it is counted by estimate, so limits and quotas cannot be dodged by hanging up."""
    counted: set[int] = set()
    unfinished: dict[int, GenerationRequest] = {}
    prompt = completion = 0
    for c, sub in zip(choices, subs, strict=True):
        key = prompt_key(sub)
        if c.usage is not None:
            if key not in counted:
                prompt += c.usage.prompt_tokens
                counted.add(key)
            completion += c.usage.completion_tokens
        else:
            completion += c.num_tokens  # cut short: count what was produced
            unfinished.setdefault(key, sub)
    prompt += sum(estimate_prompt_tokens([sub]) for key, sub in unfinished.items() if key not in counted)
    call.prompt_tokens, call.completion_tokens = prompt, completion
    call.finish_reason = choices[0].finish if choices else None
