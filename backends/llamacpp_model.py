"""Thin typed wrapper over llama-cpp-python's low-level (ctypes) bindings.

The only module of the llama.cpp backend that calls `llama_cpp.*` directly. One `LlamaModel`
owns the weights, one context (n_seq_max sequences over a unified KV cache) and one reusable
`llama_batch`. Everything here is blocking; callers run it off the event loop.
"""

from __future__ import annotations

import ctypes
import logging
import random
import threading
from dataclasses import dataclass

import llama_cpp as lc
import numpy as np

from backends.base import SamplingParams

_backend_init_lock = threading.Lock()
_backend_initialised = False


def _init_backend() -> None:
    global _backend_initialised
    with _backend_init_lock:
        if not _backend_initialised:
            # llama-cpp-python routes llama.cpp's log through this logger; keep only errors.
            logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
            lc.llama_backend_init()
            _backend_initialised = True


@dataclass(frozen=True, slots=True)
class BatchEntry:
    token: int
    pos: int
    seq_id: int
    wants_logits: bool


class LlamaModel:
    """Weights + one multi-sequence context + one batch buffer."""

    def __init__(
        self,
        path: str,
        *,
        n_ctx_per_seq: int,
        n_seq_max: int,
        n_batch: int,
        n_threads: int,
        n_threads_batch: int | None = None,
        n_gpu_layers: int = 0,
        kv_unified: bool = True,
        repack_weights: bool = True,
        flash_attn: int = -1,
    ) -> None:
        _init_backend()
        model_params = lc.llama_model_default_params()
        model_params.n_gpu_layers = n_gpu_layers
        model_params.use_extra_bufts = repack_weights
        self._model = lc.llama_model_load_from_file(path.encode(), model_params)
        if not self._model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self._vocab = lc.llama_model_get_vocab(self._model)
        self.n_vocab = lc.llama_vocab_n_tokens(self._vocab)
        self.n_ctx_train = lc.llama_model_n_ctx_train(self._model)
        # A request may use up to n_ctx_per_seq positions; every slot can do so at once.
        self.n_ctx_per_seq = min(n_ctx_per_seq, self.n_ctx_train)
        self.n_seq_max = n_seq_max
        self.n_batch = max(n_batch, n_seq_max)
        ctx_params = lc.llama_context_default_params()
        # Unified or split, the cache holds n_ctx_per_seq cells for each of the n_seq_max slots.
        ctx_params.n_ctx = self.n_ctx_per_seq * n_seq_max
        ctx_params.n_batch = self.n_batch
        ctx_params.n_ubatch = self.n_batch
        ctx_params.n_seq_max = n_seq_max
        ctx_params.n_threads = n_threads
        # llama.cpp uses n_threads for 1-token steps and n_threads_batch for larger ones.
        ctx_params.n_threads_batch = n_threads_batch or n_threads
        ctx_params.kv_unified = kv_unified
        ctx_params.no_perf = True
        ctx_params.flash_attn_type = flash_attn
        self._ctx = lc.llama_init_from_model(self._model, ctx_params)
        if not self._ctx:
            lc.llama_model_free(self._model)
            raise RuntimeError(f"llama.cpp could not create a context for {path}")
        self.n_ctx_total = lc.llama_n_ctx(self._ctx)
        self._memory = lc.llama_get_memory(self._ctx)
        self._batch = lc.llama_batch_init(self.n_batch, 0, 1)
        self._closed = False

    # ------------------------------------------------------------------ metadata
    def meta(self, key: str) -> str | None:
        """A GGUF metadata value as a string, or None when the key is absent."""
        size = 256
        while True:
            buf = ctypes.create_string_buffer(size)
            n = lc.llama_model_meta_val_str(self._model, key.encode(), buf, size)
            if n < 0:
                return None
            if n < size:
                return buf.value.decode("utf-8", errors="replace")
            size = n + 1

    def chat_template(self) -> str | None:
        raw = lc.llama_model_chat_template(self._model, None)
        return raw.decode("utf-8") if raw else None

    def token_text(self, token: int) -> str:
        return self.piece(token, special=True).decode("utf-8", errors="replace")

    @property
    def bos_token(self) -> int:
        return lc.llama_vocab_bos(self._vocab)

    @property
    def eos_token(self) -> int:
        return lc.llama_vocab_eos(self._vocab)

    @property
    def wants_bos(self) -> bool:
        return bool(lc.llama_vocab_get_add_bos(self._vocab))

    def is_eog(self, token: int) -> bool:
        return bool(lc.llama_vocab_is_eog(self._vocab, token))

    # ------------------------------------------------------------------ text <-> tokens
    def tokenize(self, text: str, *, add_special: bool, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buf = (lc.llama_token * capacity)()
        n = lc.llama_tokenize(self._vocab, data, len(data), buf, capacity, add_special, parse_special)
        if n < 0:  # buffer too small: -n is the size needed
            capacity = -n
            buf = (lc.llama_token * capacity)()
            n = lc.llama_tokenize(self._vocab, data, len(data), buf, capacity, add_special, parse_special)
        return list(buf[:n])

    def piece(self, token: int, *, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = lc.llama_token_to_piece(self._vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = lc.llama_token_to_piece(self._vocab, token, buf, -n, 0, special)
        return buf.raw[:n]

    # ------------------------------------------------------------------ sampling
    def new_sampler(self, params: SamplingParams) -> int | None:
        """A sampler chain for one sequence (free it with `free_sampler`); None for plain greedy,
        which `sample` does as an argmax over the logits: the same token (first maximum) without
        copying 262k candidates into llama.cpp's sampler array every step."""
        if params.temperature <= 0 and not (params.presence_penalty or params.frequency_penalty):
            return None
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        if params.presence_penalty or params.frequency_penalty:
            lc.llama_sampler_chain_add(
                chain,
                # OpenAI penalises every token generated so far: the window is the whole context.
                lc.llama_sampler_init_penalties(
                    self.n_vocab, self.n_ctx_per_seq, 1.0, params.frequency_penalty, params.presence_penalty
                ),
            )
        if params.temperature <= 0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
            return chain
        if params.top_k > 0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_k(params.top_k))
        if params.top_p < 1.0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_p(params.top_p, 1))
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_temp(params.temperature))
        seed = params.seed if params.seed is not None else random.getrandbits(32)
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return chain

    def sample(self, sampler: int | None, batch_index: int) -> int:
        """Sample from the logits of batch row `batch_index` (also records it for penalties)."""
        if sampler is None:
            return int(self.logits(batch_index).argmax())
        return lc.llama_sampler_sample(sampler, self._ctx, batch_index)

    def logits(self, batch_index: int) -> np.ndarray:
        """The logits of batch row `batch_index` of the last decode (a view, valid until the next)."""
        return np.ctypeslib.as_array(lc.llama_get_logits_ith(self._ctx, batch_index), shape=(self.n_vocab,))

    @staticmethod
    def free_sampler(sampler: int | None) -> None:
        if sampler is not None:
            lc.llama_sampler_free(sampler)

    # ------------------------------------------------------------------ decode and KV
    def decode(self, entries: list[BatchEntry]) -> int:
        """Run one llama_decode over `entries`; returns llama.cpp's status (0 = ok)."""
        batch = self._batch
        for i, e in enumerate(entries):
            batch.token[i] = e.token
            batch.pos[i] = e.pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = e.seq_id
            batch.logits[i] = e.wants_logits
        batch.n_tokens = len(entries)
        return lc.llama_decode(self._ctx, batch)

    def free_seq(self, seq_id: int) -> None:
        """Drop every KV cell of a sequence (never fails for a whole sequence)."""
        lc.llama_memory_seq_rm(self._memory, seq_id, -1, -1)

    def copy_seq(self, src: int, dst: int, num_tokens: int) -> None:
        """Share the first `num_tokens` positions of `src` with `dst` (no recompute)."""
        lc.llama_memory_seq_cp(self._memory, src, dst, 0, num_tokens)

    def truncate_seq(self, seq_id: int, num_tokens: int) -> bool:
        """Keep positions [0, num_tokens) of a sequence; False if llama.cpp cannot."""
        return bool(lc.llama_memory_seq_rm(self._memory, seq_id, num_tokens, -1))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        lc.llama_batch_free(self._batch)
        lc.llama_free(self._ctx)
        lc.llama_model_free(self._model)
