"""Load test: `aibox serve` (fake backend; auth, rate limits and audit ON) under N requests at
concurrency C, streaming and non-streaming mixed. Asserts 0 server errors, every response
complete, a clean SIGTERM exit, and audit rows == requests; prints p50/p99 latency and RPS.

    .venv/bin/python -m bench.load                       # 20,000 requests at concurrency 64
    .venv/bin/python -m bench.load -n 2000 --client httpx

Bounded: the run is cancelled after --timeout-s. The server is a subprocess on 127.0.0.1; the
client is this process (see bench/harness.py for why its CPU use is reported).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from backends.upstream_http import ConnectionPool, TransportError
from bench.harness import SECRET_ENV, Aibox, api_key, machine, percentile, temp_dir, write_config

SCRIPT = "The quick brown fox jumps over the lazy dog while the gateway counts every token it serves. "
NUM_PRINCIPALS = 8


def config_tables(db: str) -> dict[str, dict[str, Any]]:
    big = {"requests_per_minute": 10_000_000, "tokens_per_minute": 1_000_000_000, "max_concurrent": 1000}
    return {
        "server": {"shutdown_timeout_s": 30},
        "auth": {"secret_env": SECRET_ENV, "dev_generate_secret": False},
        "ratelimit": {"store": "memory"},
        "ratelimit.tiers.default": {"principal": big, "model": big},
        "audit": {"path": db},
        "backends.f": {"type": "fake", "script": SCRIPT},
    }


class Stats:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.statuses: Counter[int] = Counter()
        self.failures: Counter[str] = Counter()
        self.overhead_ms: list[float] = []


def requests_plan(n: int) -> list[tuple[bytes, bool]]:
    """(body, stream) per request: half streaming (a third of those with usage), sizes varied."""
    plan = []
    for i in range(n):
        stream = i % 2 == 1
        body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": f"request {i}"}], "max_tokens": 4 + i % 13}
        if stream:
            body["stream"] = True
            if i % 3 == 0:
                body["stream_options"] = {"include_usage": True}
        plan.append((json.dumps(body).encode(), stream))
    return plan


def check(status: int, body: bytes, stream: bool, stats: Stats) -> None:
    stats.statuses[status] += 1
    if status >= 500:
        stats.failures[f"status {status}"] += 1
    elif status != 200:
        stats.failures[f"unexpected status {status}"] += 1
    elif stream:
        if not body.endswith(b"data: [DONE]\n\n"):
            stats.failures["stream without [DONE]"] += 1
        elif b'data: {"error"' in body:
            stats.failures["error event in stream"] += 1
    elif b'"finish_reason":"length"' not in body and b'"finish_reason":"stop"' not in body:
        stats.failures["incomplete JSON body"] += 1


# post(body, headers) -> (status, headers, body); raises the client's transport error
Post = Callable[[bytes, dict[str, str]], Awaitable[tuple[int, Any, bytes]]]


async def drive(post: Post, transport_errors: tuple[type[BaseException], ...], plan: list[tuple[bytes, bool]],
                concurrency: int, keys: list[str], stats: Stats) -> None:  # fmt: skip
    """`concurrency` workers send the plan in order through `post` and check every response."""
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < len(plan):
            i = next_index
            next_index += 1
            body, stream = plan[i]
            headers = {"authorization": "Bearer " + keys[i % len(keys)], "content-type": "application/json"}
            t0 = time.perf_counter()
            try:
                status, resp_headers, data = await post(body, headers)
            except transport_errors as exc:
                stats.failures[f"transport: {type(exc).__name__}"] += 1
                continue
            stats.latencies.append(time.perf_counter() - t0)
            if "x-aibox-overhead-ms" in resp_headers:
                stats.overhead_ms.append(float(resp_headers["x-aibox-overhead-ms"]))
            check(status, data, stream, stats)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def run_pool(url: str, plan: list[tuple[bytes, bool]], concurrency: int, keys: list[str], stats: Stats) -> None:
    pool = ConnectionPool(url, max_connections=concurrency, connect_timeout_s=30)

    async def post(body: bytes, headers: dict[str, str]) -> tuple[int, Any, bytes]:
        resp = await pool.request("POST", "/v1/chat/completions", body, headers)
        data = await resp.aread()
        await resp.aclose()
        return resp.status_code, resp.headers, data

    try:
        await drive(post, (TransportError,), plan, concurrency, keys, stats)
    finally:
        await pool.aclose()


async def run_httpx(url: str, plan: list[tuple[bytes, bool]], concurrency: int, keys: list[str], stats: Stats) -> None:
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:

        async def post(body: bytes, headers: dict[str, str]) -> tuple[int, Any, bytes]:
            r = await client.post("/v1/chat/completions", content=body, headers=headers)
            return r.status_code, r.headers, r.content

        await drive(post, (httpx.TransportError,), plan, concurrency, keys, stats)


def audit_rows(db: str) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT count(*) FROM requests").fetchone()[0])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--requests", type=int, default=20_000)
    p.add_argument("-c", "--concurrency", type=int, default=64)
    p.add_argument("--client", choices=["pool", "httpx"], default="pool")
    p.add_argument("--timeout-s", type=float, default=600.0)
    args = p.parse_args()

    folder = temp_dir("aibox-load-")
    db = str(folder / "usage.db")
    server = Aibox(write_config(folder, config_tables(db), [{"name": "m", "deployments": [{"backend": "f"}]}]))
    stats = Stats()
    try:
        server.wait_ready()
        keys = [api_key(f"load-{k}") for k in range(NUM_PRINCIPALS)]
        plan = requests_plan(args.requests)
        run = run_pool if args.client == "pool" else run_httpx
        asyncio.run(run(server.url, plan[:200], min(args.concurrency, 16), keys, Stats()))  # warm-up, not counted
        warm_rows = 200
        cpu_server0, cpu_client0, t0 = server.cpu_s(), time.process_time(), time.perf_counter()
        asyncio.run(asyncio.wait_for(run(server.url, plan, args.concurrency, keys, stats), args.timeout_s))
        wall = time.perf_counter() - t0
        cpu_server, cpu_client = server.cpu_s() - cpu_server0, time.process_time() - cpu_client0
    except BaseException:
        server.kill()
        print(server.log_path.read_text(errors="replace")[-3000:], file=sys.stderr)
        raise
    rc = server.stop()
    rows = audit_rows(db) - warm_rows
    lat = sorted(stats.latencies)
    done = len(lat)
    print(f"machine: {machine()}")
    print(f"requests: {args.requests} at concurrency {args.concurrency} (client: {args.client}), half streaming")
    print(f"completed: {done}  statuses: {dict(stats.statuses)}  failures: {dict(stats.failures) or 0}")
    print(f"wall: {wall:.2f} s   RPS: {done / wall:.0f}")
    print(f"latency ms: p50 {percentile(lat, 50) * 1000:.2f}  p90 {percentile(lat, 90) * 1000:.2f}  p99 {percentile(lat, 99) * 1000:.2f}  max {lat[-1] * 1000:.2f}")
    oh = sorted(stats.overhead_ms)
    print(f"x-aibox-overhead-ms (at header time): p50 {percentile(oh, 50):.3f}  p99 {percentile(oh, 99):.3f}")
    print(f"server CPU: {cpu_server:.2f} s = {cpu_server / done * 1e6:.0f} us/request ({cpu_server / wall:.0%} of a core)")
    print(f"client CPU: {cpu_client:.2f} s = {cpu_client / done * 1e6:.0f} us/request ({cpu_client / wall:.0%} of a core; "
          f"{'well below' if cpu_client < cpu_server / 2 else 'NOT well below'} the server's, so the client is "
          f"{'not' if cpu_client < cpu_server / 2 else 'possibly'} the bottleneck)")
    print(f"server exit status after SIGTERM: {rc}   audit rows: {rows} (requests: {args.requests})")
    ok = not stats.failures and done == args.requests and rc == 0 and rows == args.requests
    print("RESULT:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
