"""Which sequences run in the next forward pass (plain Python, no torch).

Policy (vLLM V1 / nano-vllm style, one token budget per step):
1. Running sequences first, oldest first: each asks for all its uncomputed tokens (1 for a
   decode, the rest of its prompt for a chunked prefill), capped by what is left of
   `max_num_batched_tokens`. If the KV pool cannot hold them, the newest running sequence is
   preempted (blocks freed, recomputed later) until it fits or the sequence itself is the victim.
2. Then waiting sequences join in arrival order while there is budget, a free seat under
   `max_num_seqs` and KV blocks; a prompt longer than the remaining budget is prefilled in chunks
   over several steps (chunked prefill). No admission in a step that had to preempt: memory is
   tight and a newcomer would just be preempted again.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from backends.torch_engine.kv_cache import KVCacheManager
from backends.torch_engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int  # tokens computed this step from seq.num_computed_tokens, drafts included
    num_draft_tokens: int = 0  # the last ones of num_new_tokens are seq.draft_token_ids

    @property
    def samples(self) -> bool:
        """True when this step reaches the end of the sequence, so a token is sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens - self.num_draft_tokens == self.seq.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    """Waiting and running queues under a token budget, a seat limit and the KV pool."""

    def __init__(self, kv_cache: KVCacheManager, *, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")
        self.kv_cache = kv_cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions_total = 0

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def schedule(self) -> SchedulerOutput:
        """Pick this step's sequences and reserve their KV blocks."""
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        # Speculative drafts only use budget no running sequence needs for its real tokens.
        spare = budget - sum(s.num_uncomputed_tokens for s in self.running)
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_uncomputed_tokens, budget)
            if seq.draft_token_ids:
                fits = max(0, min(len(seq.draft_token_ids), spare, budget - num_new))
                del seq.draft_token_ids[fits:]
                spare -= fits
                num_new += fits
            while not self.kv_cache.can_allocate(seq, num_new):
                if seq.draft_token_ids:  # drop speculation before preempting anyone for it
                    num_new -= len(seq.draft_token_ids)
                    seq.draft_token_ids.clear()
                    continue
                victim = self.running.pop()  # newest first: it has the least work to redo
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                self.kv_cache.allocate(seq, num_new)
                out.scheduled.append(ScheduledSequence(seq, num_new, len(seq.draft_token_ids)))
                budget -= num_new
                i += 1
        while not out.preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            num_new = min(seq.num_uncomputed_tokens, budget)
            if not self.kv_cache.can_allocate(seq, num_new):
                break
            self.waiting.popleft()
            self.kv_cache.allocate(seq, num_new)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSequence(seq, num_new))
            budget -= num_new
        return out

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and free its blocks (idempotent)."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.kv_cache.free(seq)
        seq.status = SequenceStatus.FINISHED

    def _preempt(self, seq: Sequence) -> None:
        self.kv_cache.free(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        self.num_preemptions_total += 1
