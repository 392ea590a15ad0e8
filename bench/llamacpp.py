"""llama.cpp backend benchmark: aibox vs llama-cpp-python called directly, same run, same model.

    .venv/bin/python -m bench.llamacpp [--threads 1] [--threads-batch N] [--max-tokens 128] [--repeats 5] [--no-http]

Measures, on the bundled Gemma 3 270M (greedy, one prompt per stream):
  step     raw `llama_decode` of 1 vs N sequences: the ceiling any batching scheduler can reach
  direct   `Llama.create_completion` (llama-cpp-python's high-level API), one stream, in a child
           process: a `Llama` loaded beside our backend slowed the backend's 8-stream runs ~15%
  backend  `LlamaCppBackend.generate` in this process: one stream, then N concurrent streams
  http     `aibox serve` in a subprocess, driven over HTTP/SSE: one stream, then N concurrent
  prefix   TTFT of prompts sharing a long preamble, first (computed) vs later (KV copied)
Throughput is completion tokens / wall time of the whole request (prefill included, the same
for every path). Rounds alternate the paths so a noisy neighbour hits all of them alike;
medians are reported. Both engines use the same thread count (`--threads`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx
from llama_cpp import Llama

from backends.base import GenerationRequest, SamplingParams
from backends.bundled import resolve_model_path
from backends.llamacpp import LlamaCppBackend
from backends.llamacpp_model import BatchEntry, LlamaModel
from bench.harness import Aibox, machine, temp_dir, write_config
from gateway.settings import LlamaCppBackendConfig

PROMPTS = [  # one per stream
    "Once upon a time, in a small village by the sea,",
    "The history of the Roman Empire begins",
    "Here is a long list of fruits and vegetables:",
    "Dear diary, today I went to the market and",
    "The recipe for a perfect chocolate cake is",
    "In the year 2050, cities will",
    "The rules of chess are simple. First,",
    "A guide to planting a vegetable garden:",
]
N_CTX = 1024


@dataclass
class Run:
    tokens: int
    seconds: float
    ttft_s: list[float]

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds


class DirectWorker:
    """llama-cpp-python in a child process (`--direct-worker`), driven one request at a time."""

    def __init__(self, threads: int, threads_batch: int) -> None:
        cmd = [sys.executable, "-m", "bench.llamacpp", "--direct-worker", "--threads", str(threads),
               "--threads-batch", str(threads_batch)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run(self, prompt: str, max_tokens: int) -> Run:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"prompt": prompt, "max_tokens": max_tokens}) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        return Run(reply["tokens"], reply["seconds"], [reply["ttft_s"]])

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def direct_worker(threads: int, threads_batch: int) -> None:
    """Serve `DirectWorker.run` requests on stdin/stdout."""
    path = str(resolve_model_path("bundled:gemma3-270m"))
    llm = Llama(path, n_ctx=N_CTX, n_batch=512, n_threads=threads, n_threads_batch=threads_batch, verbose=False)
    for line in sys.stdin:
        req = json.loads(line)
        run = run_direct(llm, req["prompt"], req["max_tokens"])
        print(json.dumps({"tokens": run.tokens, "seconds": run.seconds, "ttft_s": run.ttft_s[0]}), flush=True)


def run_direct(llm: Llama, prompt: str, max_tokens: int) -> Run:
    start = time.perf_counter()
    ttft = None
    tokens = 0
    for chunk in llm.create_completion(prompt, max_tokens=max_tokens, temperature=0, stream=True):
        if ttft is None:
            ttft = time.perf_counter() - start
        tokens += 1  # llama-cpp-python streams one chunk per generated token (no stop strings here)
    return Run(tokens, time.perf_counter() - start, [ttft or 0.0])


async def backend_stream(backend: LlamaCppBackend, prompt: str, max_tokens: int) -> tuple[int, float]:
    start = time.perf_counter()
    ttft, tokens = None, 0
    req = GenerationRequest(request_id="b", model="m", prompt=prompt, max_tokens=max_tokens, sampling=SamplingParams(temperature=0))
    async for chunk in backend.generate(req):
        if ttft is None:
            ttft = time.perf_counter() - start
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return tokens, ttft or 0.0


async def http_stream(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> tuple[int, float]:
    start = time.perf_counter()
    ttft, tokens = None, 0
    body = {"model": "gemma", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if ttft is None and event["choices"] and event["choices"][0]["text"]:
                ttft = time.perf_counter() - start
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return tokens, ttft or 0.0


async def concurrent(stream, num: int, max_tokens: int, first: int = 0) -> Run:  # type: ignore[no-untyped-def]
    """`num` streams at once, prompts PROMPTS[first], PROMPTS[first + 1], ..."""
    start = time.perf_counter()
    results = await asyncio.gather(*(stream(PROMPTS[(first + i) % len(PROMPTS)], max_tokens) for i in range(num)))
    return Run(sum(r[0] for r in results), time.perf_counter() - start, [r[1] for r in results])


def step_ceiling(path: str, threads: int, threads_batch: int, num_seqs: int) -> tuple[float, float]:
    """Raw llama_decode time (ms) of one decode step with 1 and with `num_seqs` sequences.

    This bounds what any scheduler can reach: N streams can be at most
    N * t(1) / t(N) times faster than one.
    """
    model = LlamaModel(path, n_ctx_per_seq=N_CTX, n_seq_max=num_seqs, n_batch=512, n_threads=threads,
                       n_threads_batch=threads_batch)
    try:
        positions = []
        for seq, prompt in enumerate(PROMPTS[:num_seqs]):
            tokens = model.tokenize(prompt, add_special=True)
            model.decode([BatchEntry(t, i, seq, i == len(tokens) - 1) for i, t in enumerate(tokens)])
            positions.append(len(tokens))
        timings: dict[int, list[float]] = {1: [], num_seqs: []}
        for _ in range(8):
            for k, samples in timings.items():
                start = time.perf_counter()
                model.decode([BatchEntry(100, positions[s], s, True) for s in range(k)])
                samples.append(time.perf_counter() - start)
                positions[:k] = [p + 1 for p in positions[:k]]
        return statistics.median(timings[1]) * 1000, statistics.median(timings[num_seqs]) * 1000
    finally:
        model.close()


async def prefix_ttft(backend: LlamaCppBackend, repeats: int) -> tuple[float, float]:
    """Median TTFT (ms) of prompts sharing a ~300-token preamble: first one (cold) vs the rest."""
    preamble = "You are a meticulous assistant. Answer in full sentences and cite sources. " * 20
    cold = (await backend_stream(backend, preamble + "Question: what is rain?", 1))[1]
    warm = [(await backend_stream(backend, preamble + f"Question {i}: what is snow?", 1))[1] for i in range(repeats)]
    return cold * 1000, statistics.median(warm) * 1000


def median(runs: list[Run]) -> tuple[float, float, float]:
    """(median tok/s, median TTFT ms, median of per-round max TTFT ms)"""
    return (
        statistics.median(r.tok_s for r in runs),
        statistics.median(statistics.median(r.ttft_s) for r in runs) * 1000,
        statistics.median(max(r.ttft_s) for r in runs) * 1000,
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--threads-batch", type=int, default=None, help="default: --threads")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-http", action="store_true")
    parser.add_argument("--direct-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.direct_worker:
        direct_worker(args.threads, args.threads_batch or args.threads)
        return
    path = str(resolve_model_path("bundled:gemma3-270m"))
    threads_batch = args.threads_batch or args.threads
    print(f"machine: {machine()}; threads={args.threads} threads_batch={threads_batch} max_tokens={args.max_tokens}")

    direct_proc = DirectWorker(args.threads, threads_batch)
    backend = LlamaCppBackend("gemma", LlamaCppBackendConfig(
        n_ctx=N_CTX, n_threads=args.threads, n_threads_batch=threads_batch, parallel=args.concurrency))
    await backend.start()
    server = client = None
    if not args.no_http:
        folder = temp_dir("aibox-bench-llamacpp-")
        config = write_config(
            folder,
            {"auth": {"enabled": False}, "ratelimit": {"enabled": False}, "audit": {"enabled": False},
             "backends.gemma": {"type": "llamacpp", "n_ctx": N_CTX, "n_threads": args.threads,
                               "n_threads_batch": threads_batch, "parallel": args.concurrency}},
            [{"name": "gemma", "deployments": [{"backend": "gemma"}]}],
        )
        server = Aibox(config)
        server.wait_ready(120)
        client = httpx.AsyncClient(base_url=server.url, timeout=300, limits=httpx.Limits(max_connections=64))

    async def b_stream(prompt: str, n: int) -> tuple[int, float]:
        return await backend_stream(backend, prompt, n)

    async def h_stream(prompt: str, n: int) -> tuple[int, float]:
        assert client is not None
        return await http_stream(client, prompt, n)

    results: dict[str, list[Run]] = {k: [] for k in ("direct", "backend1", "backendN", "http1", "httpN")}
    try:
        await asyncio.to_thread(direct_proc.run, PROMPTS[-1], 8)  # warm-up: first-call allocations
        await concurrent(b_stream, args.concurrency, 8)
        if client:
            await concurrent(h_stream, args.concurrency, 8)
        for r in range(args.repeats):
            # A new prompt each round: llama-cpp-python reuses the KV of an identical previous
            # prompt, which would hand the direct path a free prefill.
            prompt = PROMPTS[r % len(PROMPTS)]
            results["direct"].append(await asyncio.to_thread(direct_proc.run, prompt, args.max_tokens))
            results["backend1"].append(await concurrent(b_stream, 1, args.max_tokens, first=r))
            results["backendN"].append(await concurrent(b_stream, args.concurrency, args.max_tokens))
            if client:
                results["http1"].append(await concurrent(h_stream, 1, args.max_tokens, first=r))
                results["httpN"].append(await concurrent(h_stream, args.concurrency, args.max_tokens))
        cold_ms, warm_ms = await prefix_ttft(backend, args.repeats)
    finally:
        direct_proc.close()
        await backend.close()
        if client:
            await client.aclose()
        if server:
            server.stop()

    # Last, after the backend is gone: a model loaded (even freed) earlier in a process slowed the
    # next one's 8-stream runs by 10-20% here, so the backend under test is this process's first.
    t1, tn = step_ceiling(path, args.threads, threads_batch, args.concurrency)
    print(f"raw llama_decode step: 1 seq {t1:.1f} ms, {args.concurrency} seqs {tn:.1f} ms -> "
          f"batching ceiling {args.concurrency * t1 / tn:.2f}x")
    direct = median(results["direct"])
    print(f"{'path':<28}{'tok/s':>9}{'TTFT p50 ms':>13}{'TTFT max ms':>13}")
    labels = {"direct": "llama-cpp-python direct x1", "backend1": "aibox backend x1", "http1": "aibox HTTP x1",
              "backendN": f"aibox backend x{args.concurrency}", "httpN": f"aibox HTTP x{args.concurrency}"}
    for key, label in labels.items():
        if results[key]:
            tok_s, ttft, ttft_max = median(results[key])
            print(f"{label:<28}{tok_s:>9.1f}{ttft:>13.0f}{ttft_max:>13.0f}")
    b1, bn = median(results["backend1"])[0], median(results["backendN"])[0]
    print(f"ratio backend x1 / direct: {b1 / direct[0]:.2f}  (target >= 0.9)")
    print(f"ratio backend x{args.concurrency} / backend x1: {bn / b1:.2f}  (target >= 2.5)")
    if results["http1"]:
        h1, hn = median(results["http1"])[0], median(results["httpN"])[0]
        print(f"ratio HTTP x1 / direct: {h1 / direct[0]:.2f}  (target >= 0.9)")
        print(f"ratio HTTP x{args.concurrency} / HTTP x1: {hn / h1:.2f}  (target >= 2.5)")
    print(f"prefix cache, ~300-token shared preamble: TTFT cold {cold_ms:.0f} ms, cached {warm_ms:.0f} ms")
    print(f"machine after: {machine()}")


if __name__ == "__main__":
    asyncio.run(main())
