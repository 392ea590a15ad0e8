"""llama.cpp backend: GGUF models on CPU (or offloaded layers) with continuous batching.

`LlamaCppBackend` is the asyncio face: it renders and tokenizes prompts off the event loop,
checks the context window, and hands a `Job` to `LlamaEngine` (backends/llamacpp_engine.py),
whose thread decodes up to `parallel` sequences together. Chunks come back through an
`asyncio.Queue` per request; closing the generator (client gone) cancels the job, which frees
its slot and KV cells before the engine's next step.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

from backends.base import (
    BackendInfo,
    BackendRequestError,
    BackendUnavailable,
    Chunk,
    ContextLengthExceeded,
    GenerationRequest,
)
from backends.bundled import GEMMA_CHAT_TEMPLATE, GEMMA_TURN_STOPS, resolve_model_path
from backends.llamacpp_engine import Job, LlamaEngine
from backends.llamacpp_model import LlamaModel
from backends.llamacpp_text import render_chat
from gateway.settings import LlamaCppBackendConfig


class LlamaCppBackend:
    """A GGUF model served by llama.cpp through llama-cpp-python's low-level bindings."""

    def __init__(self, name: str, config: LlamaCppBackendConfig) -> None:
        self.name = name
        self._config = config
        self._model: LlamaModel | None = None
        self._engine: LlamaEngine | None = None
        self._model_id = config.model_id or _model_id_from_ref(config.model)
        self._chat_template = ""
        self._template_source = ""
        self._template_stops: tuple[str, ...] = ()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Load the weights and start the engine thread (all blocking work in a worker thread)."""
        if self._engine is not None:
            return
        config = self._config
        path = await asyncio.to_thread(resolve_model_path, config.model)
        model = await asyncio.to_thread(
            LlamaModel,
            str(path),
            n_ctx_per_seq=config.n_ctx,
            n_seq_max=config.parallel,
            n_batch=config.n_batch,
            # llama-cpp-python's defaults: half the logical CPUs for 1-token steps (memory-bound),
            # all of them for multi-token steps (batched decode, prefill: compute-bound). On a
            # machine shared with other busy processes set both lower: spinning threads on
            # oversubscribed cores slow every step down several times.
            n_threads=config.n_threads or max(1, (os.cpu_count() or 2) // 2),
            n_threads_batch=config.n_threads_batch or config.n_threads or os.cpu_count() or 1,
            n_gpu_layers=config.n_gpu_layers,
        )
        # Template precedence: the GGUF's own, then config, then Gemma's turn format.
        gguf_template = model.chat_template()
        if gguf_template:
            self._chat_template, self._template_source = gguf_template, "gguf"
        elif config.chat_template:
            self._chat_template, self._template_source = config.chat_template, "config"
        else:
            self._chat_template, self._template_source = GEMMA_CHAT_TEMPLATE, "builtin-gemma"
            self._template_stops = GEMMA_TURN_STOPS
        self._model = model
        engine = LlamaEngine(model, queue_size=config.queue_size, prefix_cache=config.prefix_cache)
        engine.start()
        self._engine = engine

    async def close(self) -> None:
        """Fail in-flight requests, stop the engine thread, free the model."""
        engine, model = self._engine, self._model
        self._engine = None
        if engine is not None:
            await asyncio.to_thread(engine.stop)
        if model is not None:
            self._model = None
            await asyncio.to_thread(model.close)

    def info(self) -> BackendInfo:
        model = self._model
        return BackendInfo(
            name=self.name,
            type="llamacpp",
            model_id=self._model_id,
            context_length=model.n_ctx_per_seq if model else self._config.n_ctx,
            ready=self._engine is not None and self._engine.is_alive,
            detail={
                "parallel": self._config.parallel,
                "n_batch": self._config.n_batch,
                "chat_template": self._template_source or None,
            },
        )

    def stats(self) -> dict[str, float]:
        if self._engine is None:
            return {"in_flight": 0.0, "num_requests_running": 0.0, "num_requests_waiting": 0.0,
                    "kv_cache_usage_perc": 0.0, "slots": float(self._config.parallel)}
        return self._engine.stats()

    # ------------------------------------------------------------------ generation
    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        """Stream chunks; errors (context, overload) are raised before the first chunk."""
        engine, model = self._engine, self._model
        if engine is None or model is None:
            raise BackendUnavailable(f"backend {self.name!r} is not started")
        prompt_tokens = await asyncio.to_thread(self._tokenize_prompt, model, request)
        n_ctx = model.n_ctx_per_seq
        if request.max_tokens is not None and request.max_tokens <= 0:
            raise BackendRequestError("max_tokens must be at least 1", param="max_tokens")
        # No max_tokens: up to the end of the context, which needs room for at least one token.
        max_tokens = request.max_tokens or max(1, n_ctx - len(prompt_tokens))
        if len(prompt_tokens) + max_tokens > n_ctx:
            raise ContextLengthExceeded.for_request(n_ctx, len(prompt_tokens), max_tokens)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Chunk | BaseException] = asyncio.Queue()

        def sink(item: Chunk | BaseException) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

        stops = tuple(request.sampling.stop) + (self._template_stops if request.messages is not None else ())
        job = Job(prompt_tokens=prompt_tokens, max_tokens=max_tokens, sampling=request.sampling,
                  stops=stops, sink=sink)
        engine.submit(job)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            engine.cancel(job)  # no-op once finished; otherwise frees the slot at the next step

    def _tokenize_prompt(self, model: LlamaModel, request: GenerationRequest) -> list[int]:
        """Prompt tokens (echo, when asked for, is the gateway's job).

        Special-token text (`<start_of_turn>`) is parsed, as llama.cpp does. BOS is prepended when
        the model wants one unless the text already starts with it (chat templates usually write
        it), so there is never a doubled BOS.
        """
        if request.messages is not None:
            if not request.messages:
                raise BackendRequestError("messages must not be empty", param="messages")
            text = render_chat(
                self._chat_template,
                request.messages,
                bos_token=model.token_text(model.bos_token),
                eos_token=model.token_text(model.eos_token),
            )
        elif request.prompt is not None:
            text = request.prompt
        else:
            raise BackendRequestError("either prompt or messages is required", param="prompt")
        tokens = model.tokenize(text, add_special=False, parse_special=True)
        if (model.wants_bos or not tokens) and tokens[:1] != [model.bos_token]:
            tokens.insert(0, model.bos_token)
        return tokens


def _model_id_from_ref(ref: str) -> str:
    if ref.startswith("bundled:"):
        return ref.removeprefix("bundled:")
    return Path(ref).stem
