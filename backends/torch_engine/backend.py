"""`type = "torch"`: the Backend protocol over our continuous-batching engine.

Requests are rendered and tokenized here, queued into the engine (which runs on its own thread)
and streamed back: the engine's per-request callback hands each `RequestOutput` to the event loop
with `loop.call_soon_threadsafe`. Closing the generator (client gone) aborts the sequence; the
engine frees its cache at the start of its next step.

Metrics: `stats()` has the engine gauges plus running sums/counts of queue time, TTFT and time
per output token; `add_request_listener(fn)` gets every finished request's `RequestMetrics` (on
the engine thread; keep it cheap and thread-safe, e.g. a prometheus `observe`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from backends.base import (
    BackendError,
    BackendInfo,
    BackendOverloaded,
    BackendRequestError,
    BackendUnavailable,
    Chunk,
    ContextLengthExceeded,
    GenerationRequest,
    Usage,
)
from backends.bundled import GEMMA_CHAT_TEMPLATE, GEMMA_TURN_STOPS
from backends.torch_engine.engine import ABORTED, Engine, QueueFull, RequestMetrics, RequestOutput
from backends.torch_engine.loader import LoadedEngine, build_engine
from gateway.settings import TorchBackendConfig

log = logging.getLogger(__name__)

class TorchBackend:
    """Serves one model with the torch engine."""

    def __init__(self, name: str, config: TorchBackendConfig) -> None:
        self.name = name
        self.config = config
        self.engine: Engine | None = None
        self.tokenizer: Any = None
        self.context_length = config.max_model_len or 0
        self._chat_template: str | None = None
        self._template_stops: tuple[str, ...] = ()
        self._stop_token_ids: frozenset[int] = frozenset()
        self._in_flight = 0
        self._listeners: list[Callable[[RequestMetrics], None]] = []
        self._sums_lock = threading.Lock()
        self._sums: dict[str, float] = dict.fromkeys(
            (
                "num_requests_finished_total",
                "prompt_tokens_total",
                "generation_tokens_total",
                "request_queue_seconds_sum",
                "time_to_first_token_seconds_sum",
                "time_to_first_token_seconds_count",
                "time_per_output_token_seconds_sum",
                "time_per_output_token_seconds_count",
            ),
            0.0,
        )
        self._e2e_ewma_s = 1.0

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self.attach(await asyncio.to_thread(build_engine, self.config))

    def attach(self, loaded: LoadedEngine) -> None:
        """Serve an engine that is built but not started (`start()` uses this; tests pass tiny ones)."""
        self.engine, self.tokenizer, self.context_length = loaded.engine, loaded.tokenizer, loaded.max_model_len
        self._model_id = self.config.model_id or loaded.model_id
        # The tokenizer's own template, else the configured one, else Gemma's turn format.
        self._chat_template = self.tokenizer.chat_template or self.config.chat_template
        if self._chat_template is None:
            self._chat_template = GEMMA_CHAT_TEMPLATE
            self._template_stops = GEMMA_TURN_STOPS
        self._stop_token_ids = loaded.stop_token_ids
        loaded.engine.on_request_finished = self._record
        loaded.engine.start()

    async def close(self) -> None:
        if self.engine is not None:
            await asyncio.to_thread(self.engine.shutdown)

    def info(self) -> BackendInfo:
        return BackendInfo(
            name=self.name,
            type="torch",
            model_id=getattr(self, "_model_id", None) or self.config.model_id or self.config.model,
            context_length=self.context_length,
            ready=self.engine is not None,
            detail={"device": self.config.device, "dtype": self.config.dtype, "max_num_seqs": self.config.max_num_seqs},
        )

    def stats(self) -> dict[str, float]:
        out = {"in_flight": float(self._in_flight)}
        if self.engine is not None:
            out.update(self.engine.stats())
        with self._sums_lock:
            out.update(self._sums)
        return out

    def add_request_listener(self, listener: Callable[[RequestMetrics], None]) -> None:
        """Call `listener(RequestMetrics)` for every finished request (on the engine thread)."""
        self._listeners.append(listener)

    def _record(self, m: RequestMetrics) -> None:
        with self._sums_lock:
            s = self._sums
            s["num_requests_finished_total"] += 1
            s["prompt_tokens_total"] += m.num_prompt_tokens
            s["generation_tokens_total"] += m.num_output_tokens
            s["request_queue_seconds_sum"] += m.queue_s
            if m.ttft_s is not None:
                s["time_to_first_token_seconds_sum"] += m.ttft_s
                s["time_to_first_token_seconds_count"] += 1
            if m.tpot_s is not None:
                s["time_per_output_token_seconds_sum"] += m.tpot_s
                s["time_per_output_token_seconds_count"] += 1
            self._e2e_ewma_s = 0.8 * self._e2e_ewma_s + 0.2 * m.e2e_s
        for listener in self._listeners:
            try:
                listener(m)
            except Exception:
                log.exception("request metrics listener failed")

    # ------------------------------------------------------------------ generation
    def _prompt_tokens(self, request: GenerationRequest) -> list[int]:
        if request.messages is not None:
            if not request.messages:
                raise BackendRequestError("messages must not be empty", param="messages")
            text = self.tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in request.messages],
                chat_template=self._chat_template,
                tokenize=False,
                add_generation_prompt=True,
            )
            ids = self.tokenizer(text, add_special_tokens=False).input_ids  # the template wrote BOS
        elif request.prompt is not None:
            ids = self.tokenizer(request.prompt).input_ids
        else:
            raise BackendRequestError("either prompt or messages is required", param="prompt")
        return ids or [self.tokenizer.bos_token_id]

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        engine = self.engine
        if engine is None:
            raise BackendUnavailable(f"backend {self.name!r} is still loading")
        prompt_ids = await asyncio.to_thread(self._prompt_tokens, request)
        num_prompt = len(prompt_ids)
        budget = self.context_length - num_prompt
        if budget <= 0 or (request.max_tokens is not None and request.max_tokens > budget):
            raise ContextLengthExceeded.for_request(self.context_length, num_prompt, request.max_tokens or 0)
        max_tokens = request.max_tokens if request.max_tokens is not None else budget
        if max_tokens < 1:
            raise BackendRequestError("max_tokens must be at least 1", param="max_tokens")
        sampling = request.sampling
        if self._template_stops and request.messages is not None:
            sampling = _with_stops(sampling, self._template_stops)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()

        def on_output(out: RequestOutput) -> None:  # engine thread
            try:
                loop.call_soon_threadsafe(queue.put_nowait, out)
            except RuntimeError:  # loop closed: nobody is listening any more
                pass

        try:
            seq_id = engine.add_request(
                prompt_ids, max_tokens=max_tokens, sampling=sampling, on_output=on_output, stop_token_ids=self._stop_token_ids
            )
        except QueueFull:
            waiting = engine.stats()["num_requests_waiting"]
            retry = min(60.0, max(1.0, self._e2e_ewma_s * waiting / max(1, self.config.max_num_seqs)))
            raise BackendOverloaded(f"backend {self.name!r} queue is full", retry_after_s=round(retry, 1)) from None
        except ValueError as exc:
            raise ContextLengthExceeded(str(exc)) from None
        self._in_flight += 1
        finished = False
        try:
            while True:
                out = await queue.get()
                if out.error is not None:
                    finished = True
                    if out.error == ABORTED:
                        raise BackendUnavailable(f"backend {self.name!r} is shutting down")
                    raise BackendError(f"backend {self.name!r} failed: {out.error}")
                queue_ms = None if out.queue_s is None else out.queue_s * 1000.0
                if out.finish_reason is not None:
                    finished = True
                    usage = Usage(prompt_tokens=out.num_prompt_tokens, completion_tokens=out.num_output_tokens)
                    yield Chunk(text=out.text, finish_reason=out.finish_reason, usage=usage, queue_ms=queue_ms)
                    return
                if out.text:
                    yield Chunk(text=out.text, queue_ms=queue_ms)
        finally:
            self._in_flight -= 1
            if not finished:
                engine.abort(seq_id)


def _with_stops(sampling: Any, extra: tuple[str, ...]) -> Any:
    import msgspec

    return msgspec.structs.replace(sampling, stop=tuple(dict.fromkeys((*sampling.stop, *extra))))
