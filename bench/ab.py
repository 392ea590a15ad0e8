"""Interleaved A/B of two checkouts of aibox in front of the same canned upstream.

    git worktree add /tmp/aibox-a <rev>          # each checkout needs no venv of its own
    .venv/bin/python -m bench.ab /tmp/aibox-a . [--mode json|sse] [--rounds 12] [--n 300] [--concurrency 1]

This VM's speed drifts within minutes, so two benchmark runs taken one after the other compare
the machine as much as the code. Here both gateways (auth, rate limits and audit on, as in
bench.overhead) run at once against one upstream process, and the client alternates short
rounds between direct, A and B (the order flips every round). Reported per checkout: the median
over rounds of (its p50 - the direct p50 of the same round), and the median server CPU per
request, with the per-round values so the spread is visible.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.harness import Aibox, api_key, free_port, machine, temp_dir, write_config
from bench.overhead import _body, _measure, gateway_tables

ROOT = Path(__file__).resolve().parents[1]


def _serve(checkout: Path, up_port: int) -> Aibox:
    folder = temp_dir("aibox-ab-")
    config = write_config(folder, gateway_tables(folder, up_port), [{"name": "m", "deployments": [{"backend": "up"}]}])
    return Aibox(config, root=checkout)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", type=Path, help="checkout A (the baseline)")
    p.add_argument("b", type=Path, help="checkout B")
    p.add_argument("--mode", choices=["json", "sse"], default="json")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--n", type=int, default=300, help="requests per target per round")
    p.add_argument("--concurrency", type=int, default=1)
    args = p.parse_args()
    up_port = free_port()
    upstream = subprocess.Popen([sys.executable, "-m", "bench.overhead", "--upstream", str(up_port)], cwd=ROOT)
    servers = {str(c): _serve(c.resolve(), up_port) for c in (args.a, args.b)}
    try:
        for server in servers.values():
            server.wait_ready()
        stream = args.mode == "sse"
        auth = {"content-type": "application/json", "authorization": "Bearer " + api_key("ab")}
        targets: list[tuple[str, str, bytes, dict[str, str], Aibox | None]] = [
            ("direct", f"http://127.0.0.1:{up_port}", _body(stream, "tiny"), {"content-type": "application/json"}, None)
        ]
        targets += [(name, server.url, _body(stream, "m"), auth, server) for name, server in servers.items()]
        for _, url, body, headers, _ in targets:  # warm-up
            asyncio.run(_measure(url, "/v1/chat/completions", body, headers, 500, args.concurrency))
        p50s: dict[str, list[float]] = {t[0]: [] for t in targets}
        cpus: dict[str, list[float]] = {t[0]: [] for t in targets}
        bad = 0
        for i in range(args.rounds):
            for name, url, body, headers, server in targets if i % 2 == 0 else targets[::-1]:
                cpu0 = server.cpu_s() if server else 0.0
                r: dict[str, Any] = asyncio.run(_measure(url, "/v1/chat/completions", body, headers, args.n, args.concurrency))
                bad += r["bad"]
                p50s[name].append(r["p50"])
                if server:
                    cpus[name].append((server.cpu_s() - cpu0) / args.n * 1e6)
    finally:
        for server in servers.values():
            server.stop()
        upstream.terminate()
        upstream.wait()
    print(f"machine: {machine()}")
    print(f"mode {args.mode}, concurrency {args.concurrency}, {args.rounds} rounds x {args.n} requests; "
          f"direct p50 median {statistics.median(p50s['direct']):.3f} ms")  # fmt: skip
    print("| checkout | p50 overhead ms (median of rounds) | server CPU µs/req (median) | per-round overhead | per-round CPU |")
    print("|---|---|---|---|---|")
    for name in servers:
        diffs = [a - d for a, d in zip(p50s[name], p50s["direct"], strict=True)]
        print(f"| {name} | {statistics.median(diffs):.3f} | {statistics.median(cpus[name]):.0f} | "
              f"{' '.join(f'{x:.2f}' for x in diffs)} | {' '.join(f'{x:.0f}' for x in cpus[name])} |")  # fmt: skip
    if bad:
        print(f"RESULT: FAIL ({bad} bad responses)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
