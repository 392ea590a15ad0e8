"""Batched greedy decoding vs one request at a time, on the real bundled model.

llama.cpp does not promise bit-identical logits across batch compositions: its CPU matmul
and attention kernels pick different code paths (repacked GEMM vs GEMV, tiled flash attention)
by the number of rows in a batch, so sums are rounded in a different order. The llama.cpp
server README says so for `cache_prompt` ("logits are not guaranteed to be bit-for-bit
identical for different batch sizes"). So this test asserts what can be asserted: every
batched output either equals its solo output, or first departs from it at a near-tie of
the solo run's logits (the two candidate tokens within `NEAR_TIE_LOGITS`), and it prints
how often outputs agree.
"""

from __future__ import annotations

import threading

import pytest

from backends.base import Chunk, SamplingParams
from backends.bundled import resolve_model_path
from backends.llamacpp_engine import Job, LlamaEngine
from backends.llamacpp_model import BatchEntry, LlamaModel

NUM_PROMPTS = 8
NUM_TOKENS = 16
NEAR_TIE_LOGITS = 1.0  # measured: |gap| < 0.2 at every divergence; a real bug gives >> 1
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at a temperature of",
    "My favourite recipe for pancakes is",
    "The largest planet in the solar system",
    "In 1969, the first person to walk on the moon",
]


class Collector:
    """A sink that lets the test thread wait for a job's final chunk."""

    def __init__(self) -> None:
        self.chunks: list[Chunk | BaseException] = []
        self.done = threading.Event()

    def __call__(self, item: Chunk | BaseException) -> None:
        self.chunks.append(item)
        if isinstance(item, BaseException) or item.finish_reason is not None:
            self.done.set()


def run_jobs(engine: LlamaEngine, prompts: list[list[int]]) -> list[list[int]]:
    jobs, sinks = [], []
    for tokens in prompts:
        sink = Collector()
        job = Job(prompt_tokens=tokens, max_tokens=NUM_TOKENS, sampling=SamplingParams(temperature=0), stops=(), sink=sink)
        jobs.append(job)
        sinks.append(sink)
    for job in jobs:  # submitted together: admitted in the same step, prefilled in one batch
        engine.submit(job)
    for sink in sinks:
        assert sink.done.wait(60), "engine did not finish"
        assert not any(isinstance(c, BaseException) for c in sink.chunks), sink.chunks
    return [job.output_tokens for job in jobs]


def logit_gap(model: LlamaModel, context: list[int], preferred: int, other: int) -> float:
    """logit(preferred) - logit(other) after `context`, computed on sequence 0 alone."""
    model.decode([BatchEntry(t, i, 0, i == len(context) - 1) for i, t in enumerate(context)])
    logits = model.logits(len(context) - 1)
    gap = float(logits[preferred] - logits[other])
    model.free_seq(0)
    return gap


def common_prefix_len(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def load_model() -> LlamaModel:
    path = str(resolve_model_path("bundled:gemma3-270m"))
    return LlamaModel(path, n_ctx_per_seq=256, n_seq_max=NUM_PROMPTS, n_batch=512, n_threads=1)


def assert_same_or_near_tie(model: LlamaModel, prompts: list[list[int]], expected: list[list[int]], got: list[list[int]]) -> str:
    """Each `got` equals `expected` or leaves it where `expected`'s choice was a near-tie."""
    num_equal, agreed_tokens, gaps = 0, 0, []
    for prompt, a, b in zip(prompts, expected, got, strict=True):
        assert len(a) > 0 and len(b) > 0
        first_diff = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if first_diff is None:  # equal (both end at max_tokens or at the same EOG)
            assert a == b
            num_equal += 1
            agreed_tokens += len(a)
            continue
        agreed_tokens += first_diff
        gap = logit_gap(model, prompt + a[:first_diff], a[first_diff], b[first_diff])
        gaps.append(gap)
        assert abs(gap) < NEAR_TIE_LOGITS, f"output left the reference at a clear choice (gap {gap:.3f})"
    total = sum(len(a) for a in expected)
    return (
        f"{num_equal}/{len(prompts)} identical, {agreed_tokens}/{total} tokens before first divergence, "
        f"divergence gaps {[round(g, 3) for g in gaps]}"
    )


@pytest.mark.slow
def test_batched_greedy_equals_solo_or_departs_only_at_a_near_tie() -> None:
    model = load_model()
    engine = LlamaEngine(model, queue_size=NUM_PROMPTS)
    engine.start()
    try:
        prompts = [model.tokenize(p, add_special=True) for p in PROMPTS]
        solo = [run_jobs(engine, [p])[0] for p in prompts]
        batched = run_jobs(engine, prompts)
    finally:
        engine.stop()
    try:
        print("\nbatched vs solo:", assert_same_or_near_tie(model, prompts, solo, batched))
    finally:
        model.close()


@pytest.mark.slow
def test_prefix_cache_reuses_a_shared_prompt_start_without_changing_the_answer() -> None:
    model = load_model()
    engine = LlamaEngine(model, queue_size=NUM_PROMPTS, prefix_cache=True)
    engine.start()
    shared = "You are a careful assistant who answers in full sentences. " * 6
    try:
        prompts = [model.tokenize(shared + p, add_special=True) for p in PROMPTS[:3]]
        first = run_jobs(engine, [prompts[0]])[0]  # computes everything
        assert engine.stats()["prefix_cache_tokens_reused_total"] == 0
        later = [run_jobs(engine, [p])[0] for p in prompts[1:]] + run_jobs(engine, [prompts[0]])
        # each prompt reuses its longest common start with an earlier one (a repeat: all but
        # its last token, which must be computed to get logits)
        expected = sum(
            min(len(p) - 1, max(common_prefix_len(p, q) for q in prompts[:i]))
            for i, p in enumerate(prompts[1:] + prompts[:1], start=1)
        )
        assert engine.stats()["prefix_cache_tokens_reused_total"] == expected > 3 * 60
    finally:
        engine.stop()
    try:
        fresh = LlamaEngine(model, queue_size=NUM_PROMPTS)  # the same prompts, computed from scratch
        fresh.start()
        try:
            reference = [run_jobs(fresh, [p])[0] for p in prompts[1:]]
        finally:
            fresh.stop()
        print("\nprefix-cached vs fresh:", assert_same_or_near_tie(model, prompts[1:] + prompts[:1], reference + [first], later))
    finally:
        model.close()
