"""Torch engine throughput vs transformers, on the bundled Gemma 3 270M (CPU fp32 by default).

16 concurrent requests with fixed output budgets spread over 16..64 tokens (EOS ignored, so every
contender does the same useful work), greedy. Useful tokens = the sum of the budgets.

  (engine) our continuous-batching engine: all 16 submitted at once, steps until done.
  (a)      transformers `generate` on the same prompts, left-padded static batch: every row runs
           to the largest budget (the tokens past a row's budget are wasted work).
  (b)      transformers `generate_batch` (its continuous-batching API) as documented: one
           max_new_tokens for the batch, so every request runs to the largest budget.
  (b')     the same continuous-batching manager fed per-request budgets through
           `add_request(max_new_tokens=...)`: the closest transformers gets to this workload.

    .venv/bin/python bench/engine.py [--device cpu] [--dtype float32] [--repeats 2] [--threads N]
                                     [--spec K] [--skip-b]

`--spec K` adds a run of the engine with prompt-lookup speculative decoding (K drafts per step;
output identical to greedy, checked below), an opt-in engine feature.

Prints tokens/s per contender and the ratios. Runs alternate (engine, a, b, engine, a, b...) so
that load from other processes on a shared machine hits all contenders alike; the best run of
each is reported with the median next to it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from backends.base import SamplingParams  # noqa: E402
from backends.torch_engine.loader import engine_for_model  # noqa: E402
from backends.torch_engine.model_store import load_model, resolve_model_dir  # noqa: E402
from gateway.settings import TorchBackendConfig  # noqa: E402

TOPICS = [
    "The history of the printing press", "How bees make honey", "A recipe for bread",
    "Why the sky is blue", "The rules of chess", "A short story about a lighthouse keeper",
    "How volcanoes form", "The water cycle", "A letter to a friend about autumn",
    "How to plant tomatoes", "The life of a star", "A poem about the sea",
    "How trains changed travel", "The best way to learn a language", "A day in a busy kitchen",
    "Why cats purr",
]
NUM_REQUESTS = 16


def workload(tokenizer: Any) -> tuple[list[list[int]], list[int]]:
    prompts = [tokenizer(f"{t}. Write a few sentences about it:\n").input_ids for t in TOPICS[:NUM_REQUESTS]]
    budgets = [16 + round(i * 48 / (NUM_REQUESTS - 1)) for i in range(NUM_REQUESTS)]  # 16..64
    return prompts, budgets


def run_engine(
    hf_model: Any, tokenizer: Any, prompts: list[list[int]], budgets: list[int], args: Any, num_spec: int = 0
) -> tuple[float, list[list[int]]]:
    cfg = TorchBackendConfig(
        device=args.device, dtype=args.dtype, max_num_seqs=16, max_model_len=1024, num_kv_blocks=1024,
        num_speculative_tokens=num_spec,
    )
    engine = engine_for_model(hf_model, tokenizer, cfg, model_id="gemma3-270m").engine
    outputs: dict[int, list[int]] = {}
    start = time.perf_counter()
    for p, b in zip(prompts, budgets, strict=True):
        engine.add_request(
            p, max_tokens=b, sampling=SamplingParams(temperature=0.0),
            on_output=lambda o: outputs.setdefault(o.seq_id, []).extend(o.token_ids),
        )
    while engine.step():
        pass
    _sync(args.device)
    elapsed = time.perf_counter() - start
    del engine
    return elapsed, [outputs[i] for i in range(len(prompts))]


def run_static(hf_model: Any, tokenizer: Any, prompts: list[list[int]], budgets: list[int], args: Any) -> tuple[float, list[list[int]]]:
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id or 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=args.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=args.device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = hf_model.generate(
            input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max(budgets),
            min_new_tokens=max(budgets), pad_token_id=pad,
        )
    _sync(args.device)
    elapsed = time.perf_counter() - start
    return elapsed, [out[i, width : width + b].tolist() for i, b in enumerate(budgets)]


def run_hf_continuous(hf_model: Any, prompts: list[list[int]], budgets: list[int], args: Any) -> tuple[float, list[list[int]]]:
    from transformers import GenerationConfig

    gen = GenerationConfig(do_sample=False, max_new_tokens=max(budgets), eos_token_id=-1, pad_token_id=0)
    start = time.perf_counter()
    results: dict[str, Any] = {}
    with hf_model.continuous_batching_context_manager(generation_config=gen, block=True, timeout=30) as manager:
        ids = [manager.add_request(p, max_new_tokens=b, eos_token_id=-1) for p, b in zip(prompts, budgets, strict=True)]
        while len(results) < len(ids):
            r = manager.get_result(timeout=60)
            if r is not None and r.is_finished():
                results[r.request_id] = r
    _sync(args.device)
    elapsed = time.perf_counter() - start
    return elapsed, [list(results[i].generated_tokens) for i in ids]


def run_generate_batch(hf_model: Any, prompts: list[list[int]], budgets: list[int], args: Any) -> tuple[float, list[list[int]]]:
    """`generate_batch` as documented: one max_new_tokens for the whole batch (the largest budget)."""
    from transformers import GenerationConfig

    gen = GenerationConfig(do_sample=False, max_new_tokens=max(budgets), eos_token_id=-1, pad_token_id=0)
    start = time.perf_counter()
    results = hf_model.generate_batch(inputs=prompts, generation_config=gen, progress_bar=False)
    _sync(args.device)
    elapsed = time.perf_counter() - start
    outs = [list(r.generated_tokens) for r in results.values()]
    return elapsed, [o[:b] for o, b in zip(outs, budgets, strict=True)]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bundled:gemma3-270m")
    parser.add_argument("--store-dir", default=".aibox/models")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    parser.add_argument("--spec", type=int, default=0, help="also run the engine with this many prompt-lookup drafts")
    parser.add_argument("--skip-b", action="store_true", help="skip transformers continuous batching")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    hf_model, tokenizer = load_model(resolve_model_dir(args.model, args.store_dir), args.dtype)
    hf_model.to(args.device)
    print(f"model loaded in {time.perf_counter() - t0:.1f}s; torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"device {args.device}, dtype {args.dtype}, cpus {os.cpu_count()}, loadavg {os.getloadavg()[0]:.2f}")
    prompts, budgets = workload(tokenizer)
    useful = sum(budgets)
    print(f"{len(prompts)} requests, prompt tokens {min(map(len, prompts))}-{max(map(len, prompts))}, "
          f"budgets {min(budgets)}-{max(budgets)}, useful tokens {useful}")

    contenders = {"engine": lambda: run_engine(hf_model, tokenizer, prompts, budgets, args),
                  "a: static generate": lambda: run_static(hf_model, tokenizer, prompts, budgets, args)}
    if args.spec:
        contenders[f"engine + lookup k={args.spec}"] = lambda: run_engine(hf_model, tokenizer, prompts, budgets, args, args.spec)
    if not args.skip_b:
        contenders["b: generate_batch"] = lambda: run_generate_batch(hf_model, prompts, budgets, args)
        contenders["b': CB per-request budget"] = lambda: run_hf_continuous(hf_model, prompts, budgets, args)
    run_engine(hf_model, tokenizer, prompts[:2], [4, 4], args)  # warm-up (allocator, kernels)
    times: dict[str, list[float]] = {k: [] for k in contenders}
    outputs: dict[str, list[list[int]]] = {}
    for rep in range(args.repeats):
        for name, fn in contenders.items():
            elapsed, out = fn()
            assert [len(o) for o in out] == budgets, f"{name} produced {[len(o) for o in out]} tokens"
            times[name].append(elapsed)
            outputs[name] = out
            print(f"  run {rep + 1} {name:<26} {elapsed:7.2f}s  {useful / elapsed:7.1f} useful tok/s  (loadavg {os.getloadavg()[0]:.2f})", flush=True)
    best = {k: min(v) for k, v in times.items()}
    print("\nresults (best of runs; median in brackets)")
    for name, v in times.items():
        print(f"  {name:<26} {useful / best[name]:7.1f} tok/s  [{useful / statistics.median(v):7.1f}]")
    for name in contenders:
        if not name.startswith("engine"):
            print(f"  engine vs {name:<26} {best[name] / best['engine']:.2f}x  [{statistics.median(times[name]) / statistics.median(times['engine']):.2f}x]")
    if args.spec:
        spec_name = f"engine + lookup k={args.spec}"
        for name in contenders:
            if not name.startswith("engine"):
                print(f"  {spec_name} vs {name:<26} {best[name] / best[spec_name]:.2f}x  [{statistics.median(times[name]) / statistics.median(times[spec_name]):.2f}x]")
        same_spec = sum(o == r for o, r in zip(outputs[spec_name], outputs["engine"], strict=True))
        print(f"  speculative outputs identical to plain engine: {same_spec}/{len(prompts)} requests")
    same = sum(o == r for o, r in zip(outputs["engine"], outputs["a: static generate"], strict=True))
    print(f"  greedy outputs identical to static generate: {same}/{len(prompts)} requests")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
