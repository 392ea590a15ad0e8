"""Scheduler and KV cache manager, without a model (plain Python, no torch)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from backends.torch_engine.kv_cache import KVCacheManager
from backends.torch_engine.proposer import propose_ngram
from backends.torch_engine.scheduler import Scheduler
from backends.torch_engine.sequence import Sequence, SequenceStatus

ROOT = Path(__file__).resolve().parents[3]


def make_seq(seq_id: int, num_prompt: int, max_tokens: int = 8) -> Sequence:
    return Sequence(seq_id, list(range(1, num_prompt + 1)), max_tokens)


def make_scheduler(num_blocks: int = 64, block_size: int = 4, max_num_seqs: int = 4, budget: int = 32) -> Scheduler:
    return Scheduler(KVCacheManager(num_blocks, block_size), max_num_seqs=max_num_seqs, max_num_batched_tokens=budget)


def run_step(sched: Scheduler, token: int = 7) -> list[tuple[int, int]]:
    """What the engine does after a forward: advance computed counts, append sampled tokens."""
    out = sched.schedule()
    result = [(s.seq.seq_id, s.num_new_tokens) for s in out.scheduled]
    for s in out.scheduled:
        samples = s.samples
        s.seq.num_computed_tokens += s.num_new_tokens
        if samples:
            s.seq.append_token(token)
            if s.seq.finish_reason is not None:
                sched.finish(s.seq)
    return result


def test_modules_import_no_torch() -> None:
    code = (
        "import sys; import backends.torch_engine.scheduler, backends.torch_engine.kv_cache, "
        "backends.torch_engine.sequence, backends.torch_engine.detokenizer, backends.torch_engine.proposer; "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=False).returncode == 0


def test_kv_cache_allocates_on_demand_and_frees() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=4)
    seq = make_seq(0, 5)
    assert kv.num_blocks_needed(seq, 5) == 2
    kv.allocate(seq, 5)
    assert len(seq.block_table) == 2 and kv.num_free_blocks == 2 and kv.usage == 0.5
    seq.num_computed_tokens = 5
    assert kv.num_blocks_needed(seq, 3) == 0  # positions 5..7 fit in the second block
    assert kv.num_blocks_needed(seq, 4) == 1
    assert kv.slot(seq, 6) == seq.block_table[1] * 4 + 2
    assert not kv.can_allocate(seq, 12)
    with pytest.raises(RuntimeError, match="exhausted"):
        kv.allocate(seq, 12)
    kv.free(seq)
    assert seq.block_table == [] and kv.num_free_blocks == 4 and kv.usage == 0.0


def test_admission_respects_max_num_seqs_and_arrival_order() -> None:
    sched = make_scheduler(max_num_seqs=2)
    for i in range(3):
        sched.add(make_seq(i, 3))
    assert run_step(sched) == [(0, 3), (1, 3)]
    assert sched.num_running == 2 and sched.num_waiting == 1
    assert run_step(sched) == [(0, 1), (1, 1)]  # decodes; no seat for seq 2


def test_token_budget_chunks_long_prompts() -> None:
    sched = make_scheduler(budget=8)
    long_seq, short = make_seq(0, 20), make_seq(1, 3)
    sched.add(long_seq)
    sched.add(short)
    assert run_step(sched) == [(0, 8)]  # budget used up by the first chunk
    assert long_seq.num_output_tokens == 0  # a partial chunk samples nothing
    assert run_step(sched) == [(0, 8)]
    assert run_step(sched) == [(0, 4), (1, 3)]  # last chunk + the newcomer share the step
    assert long_seq.num_output_tokens == 1 and short.num_output_tokens == 1
    assert run_step(sched) == [(0, 1), (1, 1)]


def test_running_decodes_come_before_new_prefills() -> None:
    sched = make_scheduler(budget=6)
    sched.add(make_seq(0, 4))
    run_step(sched)
    sched.add(make_seq(1, 10))
    assert run_step(sched) == [(0, 1), (1, 5)]


def test_preemption_recomputes_newest_when_cache_runs_out() -> None:
    sched = make_scheduler(num_blocks=4, block_size=4, budget=64)
    a, b = make_seq(0, 8, max_tokens=20), make_seq(1, 8, max_tokens=20)
    sched.add(a)
    sched.add(b)
    assert run_step(sched) == [(0, 8), (1, 8)]  # 2 blocks each, pool full
    assert run_step(sched) == [(0, 1)]  # a needs a 3rd block at position 8: b is preempted
    assert sched.num_preemptions_total == 1
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0 and b.block_table == []
    assert b.num_output_tokens == 1  # its sampled token is kept and recomputed, not lost
    assert list(sched.waiting) == [b]
    a.max_tokens = a.num_output_tokens + 1  # a finishes next step and frees its blocks
    run_step(sched)
    assert a.status is SequenceStatus.FINISHED
    assert run_step(sched) == [(1, 9)]  # b readmitted: prompt + its output token recomputed


def test_preempting_itself_when_alone_is_impossible_so_it_waits() -> None:
    sched = make_scheduler(num_blocks=2, block_size=4, budget=64)
    a, b = make_seq(0, 4, max_tokens=8), make_seq(1, 4, max_tokens=8)
    sched.add(a)
    sched.add(b)
    run_step(sched)
    out = sched.schedule()  # a needs block 2 -> b goes; then b itself would need one -> nothing
    assert [s.seq.seq_id for s in out.scheduled] == [0]
    assert [s.seq_id for s in out.preempted] == [1]


def test_finish_frees_blocks_and_is_idempotent() -> None:
    sched = make_scheduler(num_blocks=8)
    seq = make_seq(0, 6)
    sched.add(seq)
    run_step(sched)
    assert sched.kv_cache.num_free_blocks == 6
    sched.finish(seq)
    sched.finish(seq)
    assert sched.kv_cache.num_free_blocks == 8 and not sched.has_work()
    waiting = make_seq(1, 3)
    sched.add(waiting)
    sched.finish(waiting)  # aborted before it ever ran
    assert sched.num_waiting == 0


def test_max_tokens_and_stop_tokens_finish() -> None:
    seq = Sequence(0, [1, 2], max_tokens=2, stop_token_ids=frozenset({9}))
    seq.append_token(5)
    assert seq.finish_reason is None
    seq.append_token(9)
    assert seq.finish_reason == "stop"
    seq2 = Sequence(1, [1], max_tokens=1)
    seq2.append_token(5)
    assert seq2.finish_reason == "length"
    with pytest.raises(ValueError):
        Sequence(2, [], max_tokens=1)


@pytest.mark.parametrize(
    ("tokens", "num_draft", "expected"),
    [
        ([1, 2, 3, 9, 1, 2, 3], 3, [9, 1, 2]),  # 3-gram match, continuation capped by the sequence
        ([5, 6, 7, 5, 6], 4, [7, 5, 6]),
        ([1, 2, 3, 4], 2, []),  # no repeated n-gram
        ([4, 4, 4, 4], 2, [4]),  # latest match wins
        ([1, 2, 1, 2], 0, []),
    ],
)
def test_prompt_lookup_proposals(tokens: list[int], num_draft: int, expected: list[int]) -> None:
    assert propose_ngram(tokens, num_draft) == expected


def test_drafts_use_only_spare_budget_and_yield_to_memory() -> None:
    sched = make_scheduler(num_blocks=64, block_size=4, budget=6)
    a, b = make_seq(0, 3), make_seq(1, 3)
    sched.add(a)
    sched.add(b)
    run_step(sched)
    a.draft_token_ids = [1, 2, 3, 4, 5]
    out = sched.schedule()  # budget 6: two real decode tokens reserved, 4 left for a's drafts
    assert [(s.seq.seq_id, s.num_new_tokens, s.num_draft_tokens) for s in out.scheduled] == [(0, 5, 4), (1, 1, 0)]
    assert a.draft_token_ids == [1, 2, 3, 4] and out.scheduled[0].samples

    tight = make_scheduler(num_blocks=2, block_size=4, budget=64)
    c = make_seq(2, 3)
    tight.add(c)
    run_step(tight)  # 4 tokens: one block used, one free
    c.draft_token_ids = [1] * 8
    out = tight.schedule()
    assert [(s.num_new_tokens, s.num_draft_tokens) for s in out.scheduled] == [(1, 0)] and not out.preempted
