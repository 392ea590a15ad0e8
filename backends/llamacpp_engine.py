"""Continuous batching over one llama.cpp context: the scheduler thread of the llama.cpp backend.

Each step packs one decode token of every generating sequence plus prefill chunks of newly
admitted prompts (up to `n_batch` tokens in all) into a single `llama_decode`: one pass over
the weights serves every stream. (On a small model with a big vocabulary the per-token compute
still grows with the batch; docs/benchmarks.md has the measured ceiling.)

A finished or aborted request frees its slot at once. Its KV cells are dropped, or with
`prefix_cache` kept until the slot is reused, so that a later prompt starting the same way
(>= MIN_PREFIX_REUSE tokens) copies them with `llama_memory_seq_cp` instead of recomputing.

Threads: the event loop only calls `submit` / `cancel` / `stats` (cheap, under `_cond`); the
engine thread alone touches the model. Results go back through each job's `sink`, which the
backend binds to `loop.call_soon_threadsafe(queue.put_nowait, ...)`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from backends.base import (
    BackendError,
    BackendOverloaded,
    BackendUnavailable,
    Chunk,
    FinishReason,
    SamplingParams,
    Usage,
)
from backends.llamacpp_model import BatchEntry, LlamaModel
from backends.llamacpp_text import StopMatcher, Utf8Decoder

Sink = Callable[[Chunk | BaseException], None]

# Shorter shared starts are recomputed: the saving is small, and a prefill split differently
# rounds differently (llama.cpp is not batch-invariant), which would make short seeded
# requests depend on what happened to be cached.
MIN_PREFIX_REUSE = 32


@dataclass(eq=False, kw_only=True)
class Job:
    """One request as the engine sees it: tokens in, chunks out through `sink`."""

    prompt_tokens: list[int]
    max_tokens: int
    sampling: SamplingParams
    stops: tuple[str, ...]
    sink: Sink
    submitted_at: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    output_tokens: list[int] = field(default_factory=list)  # sampled ids, a final EOG included


class _Slot:
    """One llama.cpp sequence id and the request currently using it."""

    def __init__(self, seq_id: int) -> None:
        self.seq_id = seq_id
        self.job: Job | None = None
        # Tokens whose KV this sequence holds, position i = tokens[i]. Kept after the job ends
        # when prefix caching is on, so a later prompt with the same start can reuse them.
        self.tokens: list[int] = []
        self.last_used = 0.0

    @property
    def num_cached(self) -> int:
        return len(self.tokens)

    def assign(self, job: Job, sampler: int | None, now: float) -> None:
        self.job = job
        self.sampler = sampler
        self.last_used = now
        self.next_token: int | None = None  # sampled, to be fed at the next step
        self.num_generated = 0
        self.decoder = Utf8Decoder()
        self.stopper = StopMatcher(job.stops)
        self.started_at = now
        self.queue_ms = (now - job.submitted_at) * 1000.0


class LlamaEngine:
    """Slots + waiting queue + the step loop. Start with `start()`, end with `stop()`."""

    def __init__(self, model: LlamaModel, *, queue_size: int, prefix_cache: bool = False) -> None:
        self._model = model
        self._queue_size = queue_size
        self._prefix_cache = prefix_cache
        self.num_prefix_tokens_reused = 0  # prompt tokens taken from the cache instead of computed
        self._slots = [_Slot(i) for i in range(model.n_seq_max)]
        self._waiting: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._avg_request_s = 0.0  # EWMA of request durations, for Retry-After
        self._thread = threading.Thread(target=self._run, name="llamacpp-engine", daemon=True)

    # ------------------------------------------------------------------ called from the event loop
    def start(self) -> None:
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        """False once the engine thread has stopped (closed, or failed on a llama.cpp fault)."""
        return self._thread.is_alive() and not self._stopping

    def stop(self) -> None:
        """Fail everything in flight and join the thread (blocking: call it off the loop)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()

    def submit(self, job: Job) -> None:
        """Queue a job, or raise BackendOverloaded when slots and queue are all taken."""
        with self._cond:
            if self._stopping:
                raise BackendUnavailable("llama.cpp backend is shutting down")
            num_live = self._num_running() + self._num_waiting()
            if num_live >= len(self._slots) + self._queue_size:
                raise BackendOverloaded(
                    f"all {len(self._slots)} slots busy and {self._num_waiting()} requests queued",
                    retry_after_s=self._retry_after_s(),
                )
            self._waiting.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Abort a job (client gone); its slot and KV are freed before the next step."""
        with self._cond:
            if not job.cancelled:
                job.cancelled = True
                self._cond.notify()

    def stats(self) -> dict[str, float]:
        with self._cond:
            running = self._num_running()
            waiting = self._num_waiting()
            cached = sum(s.num_cached for s in self._slots if s.job is not None)
            reused = self.num_prefix_tokens_reused
        return {
            "in_flight": float(running + waiting),
            "num_requests_running": float(running),
            "num_requests_waiting": float(waiting),
            "kv_cache_usage_perc": cached / self._model.n_ctx_total,
            "slots": float(len(self._slots)),
            "prefix_cache_tokens_reused_total": float(reused),
        }

    def _num_running(self) -> int:
        return sum(1 for s in self._slots if s.job is not None and not s.job.cancelled)

    def _num_waiting(self) -> int:
        return sum(1 for j in self._waiting if not j.cancelled)

    def _retry_after_s(self) -> float:
        rounds = self._num_waiting() / len(self._slots) + 1.0
        return min(60.0, max(1.0, rounds * self._avg_request_s))

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        failure: BaseException = BackendUnavailable("llama.cpp backend is shutting down")
        try:
            while True:
                with self._cond:
                    self._reap_cancelled()
                    self._admit()
                    if self._stopping:
                        break
                    if all(s.job is None for s in self._slots):
                        self._cond.wait()
                        continue
                self._step()
        except Exception as exc:  # a bug or a llama.cpp fault: fail every request, loudly
            failure = BackendError(f"llama.cpp engine failed: {type(exc).__name__}")
            raise
        finally:
            with self._cond:
                self._stopping = True
                for slot in self._slots:
                    if slot.job is not None:
                        slot.job.sink(failure)
                        self._free(slot)
                while self._waiting:
                    self._waiting.popleft().sink(failure)

    def _reap_cancelled(self) -> None:
        for slot in self._slots:
            if slot.job is not None and slot.job.cancelled:
                self._free(slot)
        if any(j.cancelled for j in self._waiting):
            self._waiting = deque(j for j in self._waiting if not j.cancelled)

    def _admit(self) -> None:
        now = time.monotonic()
        while self._waiting and any(s.job is None for s in self._slots):
            job = self._waiting.popleft()
            slot = self._place(job.prompt_tokens)
            slot.assign(job, self._model.new_sampler(job.sampling), now)

    def _place(self, prompt: list[int]) -> _Slot:
        """Pick a free slot and seed its KV with the longest cached prefix of `prompt`."""
        free = [s for s in self._slots if s.job is None]
        source, num_shared = None, 0
        if self._prefix_cache:
            for slot in self._slots:  # running sequences and kept ones alike
                n = _common_prefix_len(slot.tokens, prompt)
                if n > num_shared:
                    source, num_shared = slot, n
            num_shared = min(num_shared, len(prompt) - 1)  # the last prompt token yields the logits
            if num_shared < MIN_PREFIX_REUSE:
                source, num_shared = None, 0
        others = [s for s in free if s is not source]
        if not others:  # the source is the only free slot: reuse it in place
            target = free[0]
            if num_shared <= 0 or not self._model.truncate_seq(target.seq_id, num_shared):
                num_shared = 0
        else:  # copy into an empty slot, else the least recently used one; the source stays
            target = min(others, key=lambda s: (len(s.tokens) > 0, s.last_used))
            self._model.free_seq(target.seq_id)
            if source is not None and num_shared > 0:
                self._model.copy_seq(source.seq_id, target.seq_id, num_shared)
        if num_shared <= 0:
            self._model.free_seq(target.seq_id)
            num_shared = 0
        target.tokens = prompt[:num_shared]
        self.num_prefix_tokens_reused += num_shared
        return target

    def _step(self) -> None:
        """One llama_decode: a decode token per generating slot, then prefill chunks."""
        entries: list[BatchEntry] = []
        advance: list[tuple[_Slot, list[int]]] = []  # tokens each slot's KV gains if decode succeeds
        rows: list[tuple[_Slot, int]] = []  # (slot, batch row whose logits it samples from)
        for slot in self._slots:
            if slot.job is not None and slot.next_token is not None:
                entries.append(BatchEntry(slot.next_token, slot.num_cached, slot.seq_id, True))
                advance.append((slot, [slot.next_token]))
                rows.append((slot, len(entries) - 1))
        budget = self._model.n_batch - len(entries)
        for slot in self._slots:  # admission order == slot order is good enough here
            if budget <= 0:
                break
            job = slot.job
            if job is None or slot.next_token is not None:
                continue
            prompt = job.prompt_tokens
            start = slot.num_cached
            take = min(budget, len(prompt) - start)
            if take <= 0:  # prefilled, but its first token was not sampled (cancelled): reaped next
                continue
            for pos in range(start, start + take):
                entries.append(BatchEntry(prompt[pos], pos, slot.seq_id, pos == len(prompt) - 1))
            advance.append((slot, prompt[start : start + take]))
            if start + take == len(prompt):
                rows.append((slot, len(entries) - 1))
            budget -= take
        if not entries:
            return
        status = self._model.decode(entries)
        if status == 1 and self._drop_kept_caches():  # no room in the KV cache: evict and retry
            status = self._model.decode(entries)
        if status != 0:
            error = BackendError(f"llama_decode failed with status {status}")
            for slot, _ in advance:
                if slot.job is not None:
                    slot.job.sink(error)
                    with self._cond:
                        self._free(slot, keep_kv=False)  # what the failed step left is unknown
            return
        for slot, fed in advance:
            slot.tokens.extend(fed)
        for slot, row in rows:
            if slot.job is not None and not slot.job.cancelled:
                self._on_token(slot, self._model.sample(slot.sampler, row))

    def _drop_kept_caches(self) -> bool:
        """Free the KV kept by idle slots for prefix reuse; True if there was any."""
        with self._cond:
            kept = [s for s in self._slots if s.job is None and s.tokens]
            for slot in kept:
                self._model.free_seq(slot.seq_id)
                slot.tokens = []
        return bool(kept)

    def _on_token(self, slot: _Slot, token: int) -> None:
        job = slot.job
        assert job is not None
        job.output_tokens.append(token)
        if self._model.is_eog(token):
            self._finish(slot, "stop", "")
            return
        slot.num_generated += 1
        text = slot.stopper.feed(slot.decoder.decode(self._model.piece(token)))
        if slot.stopper.stopped:
            self._finish(slot, "stop", text)
        elif slot.num_generated >= job.max_tokens:
            self._finish(slot, "length", text)
        else:
            slot.next_token = token
            if text:
                job.sink(Chunk(text=text, queue_ms=slot.queue_ms))

    def _finish(self, slot: _Slot, reason: FinishReason, text: str) -> None:
        job = slot.job
        assert job is not None
        if not slot.stopper.stopped:
            text += slot.stopper.feed(slot.decoder.flush())
            if slot.stopper.stopped:
                reason = "stop"
            else:
                text += slot.stopper.flush()
        usage = Usage(prompt_tokens=len(job.prompt_tokens), completion_tokens=slot.num_generated)
        final = Chunk(text=text, finish_reason=reason, usage=usage, queue_ms=slot.queue_ms)
        elapsed = time.monotonic() - slot.started_at
        self._avg_request_s = elapsed if self._avg_request_s == 0 else 0.8 * self._avg_request_s + 0.2 * elapsed
        with self._cond:  # free first: once the client has its last chunk, the slot is free
            self._free(slot)
        job.sink(final)

    def _free(self, slot: _Slot, *, keep_kv: bool = True) -> None:
        """Make a slot free at once (caller holds `_cond`). Its KV cells are dropped, or, with
        prefix caching, kept as a cache that the next job placed here overwrites."""
        if slot.job is None:
            return
        if not (keep_kv and self._prefix_cache):
            self._model.free_seq(slot.seq_id)
            slot.tokens = []
        self._model.free_sampler(slot.sampler)
        slot.job = None


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
