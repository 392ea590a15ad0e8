"""The engine loop: schedule -> runner -> postprocess, on its own thread.

Other threads talk to it only through `add_request` / `abort` (a locked inbox drained at the
start of each step) and through the per-request `on_output` callback, which the engine calls on
its own thread (the torch backend turns it into `loop.call_soon_threadsafe`). The step itself is
single-threaded, so the scheduler, cache manager and sequences need no locks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence as Seq
from dataclasses import dataclass
from typing import Protocol

from backends.base import FinishReason, SamplingParams
from backends.torch_engine.detokenizer import IncrementalDetokenizer
from backends.torch_engine.kv_cache import KVCacheManager
from backends.torch_engine.proposer import propose_ngram
from backends.torch_engine.scheduler import ScheduledSequence, Scheduler
from backends.torch_engine.sequence import Sequence

log = logging.getLogger(__name__)


ABORTED = "aborted"  # RequestOutput.error of a request stopped by abort() / shutdown()


class QueueFull(Exception):
    """The waiting queue is at its bound; the caller should come back later."""


@dataclass(slots=True)
class RequestOutput:
    """What one step produced for one request (called back on the engine thread)."""

    seq_id: int
    text: str  # new text, safe to show (stop strings held back)
    token_ids: list[int]  # tokens sampled this step
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    queue_s: float | None = None
    error: str | None = None


@dataclass(slots=True)
class RequestMetrics:
    """Latency facts of a finished request, for the metrics endpoint."""

    queue_s: float
    ttft_s: float | None
    tpot_s: float | None  # mean time per output token after the first
    e2e_s: float
    num_prompt_tokens: int
    num_output_tokens: int
    num_preemptions: int
    finish_reason: str  # stop / length / abort / error


class Runner(Protocol):
    def execute(self, scheduled: Seq[ScheduledSequence]) -> list[tuple[Sequence, list[int]]]: ...
    def release(self, seq_id: int) -> None: ...


@dataclass(slots=True)
class _Request:
    seq: Sequence
    detok: IncrementalDetokenizer
    on_output: Callable[[RequestOutput], None]


class Engine:
    """Continuous batching over a `Runner`; thread-safe `add_request` / `abort`."""

    def __init__(
        self,
        runner: Runner,
        decode: Callable[[list[int]], str],
        *,
        num_kv_blocks: int,
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        queue_size: int,
        num_speculative_tokens: int = 0,
        clock: Callable[[], float] = time.monotonic,
        on_request_finished: Callable[[RequestMetrics], None] | None = None,
    ) -> None:
        self.runner = runner
        self.kv_cache = KVCacheManager(num_kv_blocks, block_size)
        self.scheduler = Scheduler(
            self.kv_cache, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens
        )
        self.queue_size = queue_size
        self.num_speculative_tokens = num_speculative_tokens
        self._decode = decode
        self._clock = clock
        self.on_request_finished = on_request_finished
        self._requests: dict[int, _Request] = {}
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._inbox: list[_Request] = []
        self._aborts: list[int] = []
        self._next_id = 0
        self._num_waiting_seen = 0  # waiting count as of the last step, read by add_request
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ------------------------------------------------------------------ called from other threads
    def add_request(
        self,
        prompt_token_ids: list[int],
        *,
        max_tokens: int,
        sampling: SamplingParams,
        on_output: Callable[[RequestOutput], None],
        stop_token_ids: frozenset[int] = frozenset(),
    ) -> int:
        """Queue a request; raises QueueFull when `queue_size` requests already wait."""
        if len(prompt_token_ids) + max_tokens > self.kv_cache.num_token_slots:
            raise ValueError("prompt + max_tokens exceed the whole KV cache")
        with self._lock:
            if self._num_waiting_seen + len(self._inbox) >= self.queue_size:
                raise QueueFull(f"{self._num_waiting_seen + len(self._inbox)} requests already waiting")
            seq_id = self._next_id
            self._next_id += 1
            seq = Sequence(
                seq_id,
                list(prompt_token_ids),
                max_tokens,
                sampling,
                stop_token_ids=stop_token_ids,
                arrival_time=self._clock(),
            )
            detok = IncrementalDetokenizer(self._decode, prompt_token_ids, sampling.stop)
            self._inbox.append(_Request(seq, detok, on_output))
            self._wakeup.notify()
        return seq_id

    def abort(self, seq_id: int) -> None:
        """Stop a request; its cache is freed at the start of the next step."""
        with self._lock:
            self._aborts.append(seq_id)
            self._wakeup.notify()

    def start(self) -> None:
        """Run steps on a daemon thread until `shutdown()`."""
        self._thread = threading.Thread(target=self._loop, name="torch-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        with self._lock:
            self._stopping = True
            self._aborts.extend(self._requests)
            self._aborts.extend(r.seq.seq_id for r in self._inbox)
            self._wakeup.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def stats(self) -> dict[str, float]:
        """Engine gauges (racy reads of plain ints are fine for metrics)."""
        return {
            "num_requests_running": float(self.scheduler.num_running),
            "num_requests_waiting": float(self.scheduler.num_waiting + len(self._inbox)),
            "kv_cache_usage_perc": self.kv_cache.usage,  # fraction 0..1, as vLLM and llamacpp.py report it
            "num_preemptions_total": float(self.scheduler.num_preemptions_total),
        }

    # ------------------------------------------------------------------ engine thread
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._stopping or self._inbox or self._aborts or self.scheduler.has_work()):
                    self._wakeup.wait()
                if self._stopping and not self._requests and not self._inbox:
                    return
            try:
                self.step()
            except Exception as exc:  # a broken step must not hang every caller
                log.exception("torch engine step failed")
                self._fail_all(f"engine step failed: {type(exc).__name__}")

    def step(self) -> bool:
        """One scheduling + forward + postprocess round. Returns whether work was done."""
        self._drain_inbox()
        if self.num_speculative_tokens:
            self._propose_drafts()
        out = self.scheduler.schedule()
        self._num_waiting_seen = self.scheduler.num_waiting
        if not out.scheduled:
            return False
        now = self._clock()
        for item in out.scheduled:
            if item.seq.times.first_scheduled is None:
                item.seq.times.first_scheduled = now
        sampled = self.runner.execute(out.scheduled)
        for item in out.scheduled:
            item.seq.num_computed_tokens += item.num_new_tokens - item.num_draft_tokens
        now = self._clock()
        for seq, token_ids in sampled:
            seq.num_computed_tokens += len(token_ids) - 1  # accepted drafts: their k/v are valid
            seq.draft_token_ids = []
            self._postprocess(seq, token_ids, now)
        return True

    def _propose_drafts(self) -> None:
        """Prompt-lookup drafts for greedy decodes (penalties would make verification inexact)."""
        for seq in self.scheduler.running:
            p = seq.sampling
            if seq.num_uncomputed_tokens == 1 and p.temperature <= 0 and not (p.presence_penalty or p.frequency_penalty):
                room = seq.max_tokens - seq.num_output_tokens - 1  # the model's own token comes on top
                seq.draft_token_ids = propose_ngram(seq.token_ids, min(self.num_speculative_tokens, room))

    def _drain_inbox(self) -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, []
        for req in inbox:
            self._requests[req.seq.seq_id] = req
            self.scheduler.add(req.seq)
        for seq_id in aborts:
            req = self._requests.pop(seq_id, None)
            if req is not None:
                self._finish(req, "abort")
                # Wakes a caller still waiting (shutdown); a disconnected one never reads it.
                req.on_output(RequestOutput(seq_id, "", [], error=ABORTED))

    def _postprocess(self, seq: Sequence, token_ids: list[int], now: float) -> None:
        req = self._requests[seq.seq_id]
        if seq.times.first_token is None:
            seq.times.first_token = now
        text = ""
        emitted: list[int] = []
        for token_id in token_ids:  # several when speculative drafts were accepted
            seq.append_token(token_id)
            emitted.append(token_id)
            if token_id not in seq.stop_token_ids:
                text += req.detok.add_token(token_id)
            if req.detok.stopped:
                seq.finish_reason = "stop"
            if seq.finish_reason is not None:
                break
        if seq.finish_reason is not None and not req.detok.stopped:
            text += req.detok.flush()
        output = RequestOutput(
            seq.seq_id,
            text,
            emitted,
            finish_reason=seq.finish_reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
            queue_s=seq.times.queue_s,
        )
        if seq.finish_reason is not None:
            del self._requests[seq.seq_id]
            self._finish(req, seq.finish_reason)
        req.on_output(output)

    def _finish(self, req: _Request, reason: str) -> None:
        seq = req.seq
        self.scheduler.finish(seq)
        self.runner.release(seq.seq_id)
        seq.times.finished = self._clock()
        if self.on_request_finished is None:
            return
        t = seq.times
        tpot = None
        if t.first_token is not None and seq.num_output_tokens > 1:
            tpot = (t.finished - t.first_token) / (seq.num_output_tokens - 1)
        self.on_request_finished(
            RequestMetrics(
                queue_s=t.queue_s if t.queue_s is not None else t.finished - t.arrival,
                ttft_s=t.ttft_s,
                tpot_s=tpot,
                e2e_s=t.finished - t.arrival,
                num_prompt_tokens=seq.num_prompt_tokens,
                num_output_tokens=seq.num_output_tokens,
                num_preemptions=seq.num_preemptions,
                finish_reason=reason,
            )
        )

    def _fail_all(self, message: str) -> None:
        for req in list(self._requests.values()):
            self._finish(req, "error")
            req.on_output(RequestOutput(req.seq.seq_id, "", [], error=message))
        self._requests.clear()
