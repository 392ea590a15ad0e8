"""Per-request token state for the torch engine (plain Python, no torch).

A `Sequence` is the unit the scheduler and the KV cache manager reason about. Its token list is
prompt + generated tokens; `num_computed_tokens` says how many of them already have keys/values in
the cache. Prefill, chunked prefill, decode and recompute after preemption are all the same thing
(as in vLLM's V1 engine): each step computes some of the uncomputed tokens, and when a step
reaches the end of the list a new token is sampled and appended.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from backends.base import FinishReason, SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True)
class RequestTimes:
    """Monotonic timestamps (seconds) behind the per-request latency metrics."""

    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None

    @property
    def queue_s(self) -> float | None:
        return None if self.first_scheduled is None else self.first_scheduled - self.arrival

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival


@dataclass(slots=True, eq=False)
class Sequence:
    """One request's tokens, cache blocks and progress."""

    seq_id: int
    prompt_token_ids: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_token_ids: frozenset[int] = frozenset()
    arrival_time: float = 0.0
    token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    # Speculative tokens to verify in the next step (after the uncomputed ones); never in token_ids.
    draft_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    times: RequestTimes = field(init=False)

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("a sequence needs at least one prompt token")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        self.token_ids = list(self.prompt_token_ids)
        self.times = RequestTimes(arrival=self.arrival_time)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        """Add a sampled token and decide whether it ends the sequence (EOS / max tokens)."""
        self.token_ids.append(token_id)
        if token_id in self.stop_token_ids:
            self.finish_reason = "stop"
        elif self.num_output_tokens >= self.max_tokens:
            self.finish_reason = "length"

    def reset_for_recompute(self) -> None:
        """Forget the cached keys/values (preemption): everything is recomputed on readmission."""
        self.num_computed_tokens = 0
        self.block_table = []
        self.draft_token_ids = []
        self.status = SequenceStatus.WAITING
        self.num_preemptions += 1
