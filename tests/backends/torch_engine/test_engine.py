"""The engine with a tiny random Gemma 3: continuous batching must not change any sequence's output."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from backends.base import SamplingParams
from backends.torch_engine.engine import Engine, RequestOutput
from backends.torch_engine.loader import engine_for_model
from gateway.settings import TorchBackendConfig
from tests.backends.torch_engine.tiny import tiny_gemma3

GREEDY = SamplingParams(temperature=0.0)
PROMPTS = [[2, *range(5, 5 + n)] for n in (3, 17, 9, 30, 5, 12)]  # some past the sliding window (6)
NUM_NEW = 12


def make_engine(model: Any, tokenizer: Any, **overrides: Any) -> Engine:
    settings = {"max_num_seqs": 4, "max_num_batched_tokens": 16, "num_kv_blocks": 64, "block_size": 4, **overrides}
    return engine_for_model(model, tokenizer, TorchBackendConfig(**settings), model_id="tiny").engine


def reference(model: Any, prompt: list[int], num_new: int = NUM_NEW) -> list[int]:
    """transformers' own greedy decoding of the prompt alone."""
    out = model.generate(
        torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=num_new, do_sample=False, eos_token_id=None, pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


class Collector:
    def __init__(self) -> None:
        self.tokens: dict[int, list[int]] = {}
        self.finish: dict[int, str | None] = {}
        self.text: dict[int, str] = {}

    def __call__(self, out: RequestOutput) -> None:
        self.tokens.setdefault(out.seq_id, []).extend(out.token_ids)
        self.text[out.seq_id] = self.text.get(out.seq_id, "") + out.text
        if out.finish_reason is not None:
            self.finish[out.seq_id] = out.finish_reason


def add(engine: Engine, sink: Collector, prompt: list[int], sampling: SamplingParams = GREEDY, n: int = NUM_NEW) -> int:
    return engine.add_request(prompt, max_tokens=n, sampling=sampling, on_output=sink)


def run_until_idle(engine: Engine, max_steps: int = 500) -> int:
    for num_steps in range(max_steps):
        if not engine.step():
            return num_steps
    raise AssertionError("engine did not go idle")


def test_sliding_window_changes_the_reference(tiny_model: Any) -> None:
    """Guard for the next test: with a window of 6 the long prompts really depend on it."""
    wide = tiny_gemma3(sliding_window=512)
    assert any(reference(tiny_model, p) != reference(wide, p) for p in PROMPTS[1:4])


def test_greedy_batch_matches_generate_with_joins_and_aborts(tiny_model: Any, tokenizer: Any) -> None:
    engine = make_engine(tiny_model, tokenizer)
    sink = Collector()
    ids = [add(engine, sink, p) for p in PROMPTS[:3]]
    doomed = add(engine, sink, [2, 40, 41, 42, 43, 44, 45, 46], n=50)
    for _ in range(4):
        engine.step()
    ids += [add(engine, sink, p) for p in PROMPTS[3:]]  # join mid-run (one needs chunked prefill)
    engine.step()
    engine.abort(doomed)
    run_until_idle(engine)
    assert doomed not in sink.finish and 0 < len(sink.tokens[doomed]) < 50
    for seq_id, prompt in zip(ids, PROMPTS, strict=True):
        assert sink.tokens[seq_id] == reference(tiny_model, prompt), f"prompt {prompt}"
        assert sink.finish[seq_id] == "length"
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks  # aborted one freed too
    assert engine.stats()["num_requests_running"] == 0


def test_preemption_under_tiny_kv_budget_keeps_outputs_exact(tiny_model: Any, tokenizer: Any) -> None:
    engine = make_engine(tiny_model, tokenizer, num_kv_blocks=14, max_num_batched_tokens=64)
    sink = Collector()
    prompts = [PROMPTS[1], PROMPTS[2], PROMPTS[5], PROMPTS[4]]
    ids = [add(engine, sink, p) for p in prompts]
    run_until_idle(engine)
    assert engine.stats()["num_preemptions_total"] > 0
    for seq_id, prompt in zip(ids, prompts, strict=True):
        assert sink.tokens[seq_id] == reference(tiny_model, prompt)


def test_seeded_sampling_ignores_batch_mates(tiny_model: Any, tokenizer: Any) -> None:
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=20, presence_penalty=0.5, frequency_penalty=0.3, seed=42)
    prompt = PROMPTS[2]

    alone_engine = make_engine(tiny_model, tokenizer)
    alone = Collector()
    add(alone_engine, alone, prompt, params)
    run_until_idle(alone_engine)

    crowded_engine = make_engine(tiny_model, tokenizer)
    crowd = Collector()
    add(crowded_engine, crowd, PROMPTS[3], SamplingParams(temperature=0.7, seed=1))
    add(crowded_engine, crowd, PROMPTS[0])
    crowded_engine.step()
    target = add(crowded_engine, crowd, prompt, params)  # joins later, different mates and row
    add(crowded_engine, crowd, PROMPTS[1], SamplingParams(temperature=1.5, top_k=5))
    run_until_idle(crowded_engine)

    assert crowd.tokens[target] == alone.tokens[0]
    others = []
    for seed in (1, 2, 3):
        engine = make_engine(tiny_model, tokenizer)
        sink = Collector()
        add(engine, sink, prompt, SamplingParams(temperature=1.0, seed=seed))
        run_until_idle(engine)
        others.append(sink.tokens[0])
    assert any(o != alone.tokens[0] for o in others)  # the seed matters


def test_stop_string_ends_with_stop_and_is_not_emitted(tiny_model: Any, tokenizer: Any) -> None:
    # Pick the stop string from the reference output so the test does not depend on the weights.
    prompt, expected = next(
        (p, ids) for p in PROMPTS if len(set(ids := reference(tiny_model, p, 20)[:6])) >= 3
    )
    full_text = " " + tokenizer.decode(expected, skip_special_tokens=True)
    stop_string = full_text.split()[2]
    engine = make_engine(tiny_model, tokenizer)
    sink = Collector()
    seq_id = add(engine, sink, prompt, SamplingParams(temperature=0.0, stop=(stop_string, "zz-unused")), n=20)
    run_until_idle(engine)
    assert sink.finish[seq_id] == "stop"
    assert sink.text[seq_id] == full_text[: full_text.find(stop_string)]
    assert stop_string not in sink.text[seq_id]


def test_eos_token_finishes_with_stop(tiny_model: Any, tokenizer: Any) -> None:
    prompt = PROMPTS[0]
    first = reference(tiny_model, prompt, 1)[0]
    engine = make_engine(tiny_model, tokenizer)
    sink = Collector()
    seq_id = engine.add_request(
        prompt, max_tokens=5, sampling=GREEDY, on_output=sink, stop_token_ids=frozenset({first})
    )
    run_until_idle(engine)
    assert sink.finish[seq_id] == "stop" and sink.tokens[seq_id] == [first]


@pytest.mark.parametrize("num_kv_blocks", [64, 14])  # 14: preemption under speculation too
def test_speculative_greedy_is_exact_and_saves_steps(tiny_model: Any, tokenizer: Any, num_kv_blocks: int) -> None:
    steps = {}
    for k in (0, 4):
        engine = make_engine(
            tiny_model, tokenizer, num_speculative_tokens=k, num_kv_blocks=num_kv_blocks, max_num_batched_tokens=64
        )
        sink = Collector()
        ids = [add(engine, sink, p, n=20) for p in PROMPTS[:4]]
        sampled = add(engine, sink, PROMPTS[4], SamplingParams(temperature=1.0, seed=3), n=20)  # never drafts
        steps[k] = run_until_idle(engine)
        for seq_id, prompt in zip(ids, PROMPTS[:4], strict=True):
            assert sink.tokens[seq_id] == reference(tiny_model, prompt, 20), f"k={k} prompt {prompt}"
            assert sink.finish[seq_id] == "length"
        assert len(sink.tokens[sampled]) == 20
        assert engine.kv_cache.num_free_blocks == num_kv_blocks
    assert steps[4] < steps[0]  # the tiny model repeats itself, so drafts get accepted
