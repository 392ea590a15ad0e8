"""Gateway overhead: aibox (auth, rate limits and audit ON) in front of a fast local
OpenAI-compatible server through the `openai` backend type, vs the same server called directly.

    .venv/bin/python -m bench.overhead                 # c=1: 2,000 requests; c=32: 10,000 requests

Reports, per mode (JSON body / SSE stream):
  c=1   p50/p99 latency direct and through aibox; p50 overhead = difference of the p50s, measured
        in `--rounds` rounds that alternate direct and aibox (the median of the per-round
        differences: this VM's speed drifts within minutes, and a round pairs two measurements
        taken seconds apart); and the gateway's own `x-aibox-overhead-ms` header (time in the
        gateway minus time waiting on the backend, measured when the response headers are sent)
  c=32  RPS direct and through aibox, and the server's CPU per request, which gives the RPS one
        worker process sustains on one core (the client and the upstream share this machine's
        other core, so wall-clock RPS on 2 cores understates a worker's capacity)
Goals (issue 8): p50 overhead <= 0.5 ms at c=1; >= 1,500 RPS per worker at c=32.

The upstream is a raw asyncio server in its own process answering canned bytes (chunked SSE for
`stream: true`, which is what the openai backend always asks for; a JSON body otherwise).

    .venv/bin/python -m bench.overhead --floor        # what a relay costs before any aibox code

`--floor` measures, at c=1 on the JSON path, the two relays aibox is built from, with none of its
code: a bare uvicorn ASGI app that forwards each request through the same upstream client
(`backends.upstream_http`), and the same relay as a one-route Litestar app.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import subprocess
import sys
import time
from typing import Any

from litestar import Litestar, Request, Response, post

from backends.upstream_http import ConnectFailed, ConnectionPool
from bench.harness import SECRET_ENV, Aibox, api_key, free_port, machine, percentile, temp_dir, write_config

NUM_TOKENS = 8
_CL = re.compile(rb"(?i)content-length:\s*(\d+)")


# --------------------------------------------------------------------------- the upstream
def _canned() -> tuple[bytes, bytes]:
    chunks = [
        {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "tiny",
         "choices": [{"index": 0, "delta": {"content": f" tok{i}"}, "finish_reason": "length" if i == NUM_TOKENS - 1 else None}]}
        for i in range(NUM_TOKENS)
    ]  # fmt: skip
    chunks.append({"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "tiny", "choices": [],
                   "usage": {"prompt_tokens": 9, "completion_tokens": NUM_TOKENS, "total_tokens": 9 + NUM_TOKENS}})  # fmt: skip
    events = b"".join(b"data: " + json.dumps(c, separators=(",", ":")).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"
    sse = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    sse += b"%x\r\n%s\r\n0\r\n\r\n" % (len(events), events)
    body = json.dumps({
        "id": "x", "object": "chat.completion", "created": 0, "model": "tiny",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(f" tok{i}" for i in range(NUM_TOKENS))}, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": NUM_TOKENS, "total_tokens": 9 + NUM_TOKENS},
    }).encode()  # fmt: skip
    js = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    return sse, js


async def _serve_upstream(port: int) -> None:
    sse, js = _canned()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                m = _CL.search(head)
                body = await reader.readexactly(int(m.group(1)) if m else 0)
                writer.write(sse if b'"stream":true' in body.replace(b" ", b"") else js)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


# --------------------------------------------------------------------------- floor relays
def _serve_relay(kind: str, port: int, up_port: int) -> None:
    """A relay with no aibox code: read the body, forward it upstream (streamed, as the openai
    backend asks), answer the upstream bytes as one JSON body."""
    import uvicorn

    pool: list[ConnectionPool] = []

    async def forward() -> bytes:
        if not pool:
            pool.append(ConnectionPool(f"http://127.0.0.1:{up_port}", max_connections=64, connect_timeout_s=5))
        resp = await pool[0].request("POST", "/v1/chat/completions", b'{"stream":true}', {"content-type": "application/json"})
        data = await resp.aread()
        await resp.aclose()
        return data

    async def raw(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        out = await forward()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(out)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": out})

    app: Any = raw
    if kind == "litestar":

        @post("/v1/chat/completions", status_code=200)
        async def relay(request: Request[Any, Any, Any]) -> Response[bytes]:
            await request.body()
            return Response(content=await forward(), media_type="application/json")

        app = Litestar([relay], debug=False, logging_config=None)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, proxy_headers=False)  # as aibox serve


def _floor(up_port: int, n: int) -> None:
    body, headers = _body(False, "tiny"), {"content-type": "application/json"}
    rows = []
    for kind in ("direct", "uvicorn", "litestar"):
        port, relay = up_port, None
        if kind != "direct":
            port = free_port()
            relay = subprocess.Popen([sys.executable, "-m", "bench.overhead", "--relay", kind, str(port), str(up_port)])
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(100):  # wait for it to listen
                try:
                    asyncio.run(_measure(url, "/v1/chat/completions", body, headers, 10, 1))
                    break
                except (OSError, ConnectFailed):
                    time.sleep(0.1)
            asyncio.run(_measure(url, "/v1/chat/completions", body, headers, min(n, 500), 1))  # warm-up
            rows.append((kind, [asyncio.run(_measure(url, "/v1/chat/completions", body, headers, n, 1))["p50"] for _ in range(3)]))
        finally:
            if relay is not None:
                relay.terminate()
                relay.wait()
    direct = statistics.median(rows[0][1])
    print(f"machine: {machine()}")
    print("| relay (c=1, JSON) | p50 ms, 3 runs | median p50 | overhead vs direct |")
    print("|---|---|---|---|")
    for kind, p50s in rows:
        med = statistics.median(p50s)
        print(f"| {kind} | {' / '.join(f'{v:.3f}' for v in p50s)} | {med:.3f} | {med - direct:.3f} |")


# --------------------------------------------------------------------------- measuring
async def _measure(url: str, path: str, body: bytes, headers: dict[str, str], n: int, concurrency: int) -> dict[str, Any]:
    pool = ConnectionPool(url, max_connections=concurrency, connect_timeout_s=30)
    latencies: list[float] = []
    overheads: list[float] = []
    bad = 0
    remaining = n

    async def worker() -> None:
        nonlocal remaining, bad
        while remaining > 0:
            remaining -= 1
            t0 = time.perf_counter()
            resp = await pool.request("POST", path, body, headers)
            data = await resp.aread()
            await resp.aclose()
            latencies.append(time.perf_counter() - t0)
            if resp.status_code != 200 or not (data.endswith(b"[DONE]\n\n") or data.endswith(b"}")):
                bad += 1
            if "x-aibox-overhead-ms" in resp.headers:
                overheads.append(float(resp.headers["x-aibox-overhead-ms"]))

    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    finally:
        await pool.aclose()
    latencies.sort()
    overheads.sort()
    return {"rps": n / wall, "p50": percentile(latencies, 50) * 1000, "p99": percentile(latencies, 99) * 1000,
            "overhead_hdr_p50": percentile(overheads, 50) if overheads else None, "bad": bad, "wall": wall}  # fmt: skip


def gateway_tables(folder: Any, up_port: int) -> dict[str, dict[str, Any]]:
    """aibox with auth, rate limits (never reached) and audit on, serving model `m` from the
    canned upstream through the `openai` backend."""
    big = {"requests_per_minute": 100_000_000, "tokens_per_minute": 1_000_000_000}
    return {
        "auth": {"secret_env": SECRET_ENV, "dev_generate_secret": False},
        "ratelimit": {"store": "memory"},
        "ratelimit.tiers.default": {"principal": big, "model": big},
        "audit": {"path": str(folder / "usage.db")},
        "backends.up": {"type": "openai", "base_url": f"http://127.0.0.1:{up_port}/v1", "model": "tiny"},
    }


def _combine(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One row for several rounds: medians of the per-round figures, summed bad responses."""
    med = lambda key: statistics.median(r[key] for r in rounds)  # noqa: E731
    out = {key: med(key) for key in ("rps", "p50", "p99", "server_cpu_us")}
    hdr = [r["overhead_hdr_p50"] for r in rounds if r["overhead_hdr_p50"] is not None]
    return out | {"overhead_hdr_p50": statistics.median(hdr) if hdr else None, "bad": sum(r["bad"] for r in rounds)}


def _body(stream: bool, model: str) -> bytes:
    b: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": NUM_TOKENS}
    if stream:
        b["stream"] = True
    return json.dumps(b).encode()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n1", type=int, default=2000, help="requests at concurrency 1")
    p.add_argument("--n32", type=int, default=10000, help="requests at concurrency 32")
    p.add_argument("--rounds", type=int, default=8, help="c=1: alternating direct/aibox rounds sharing --n1")
    p.add_argument("--disable", default="", help="comma list of auth,ratelimit,audit to turn off (ablation)")
    p.add_argument("--modes", default="json,sse", help="json,sse")
    p.add_argument("--no-access-log", action="store_true", help='server.log_level = "warning" (ablation)')
    p.add_argument("--floor", action="store_true", help="measure bare uvicorn and Litestar relays instead (c=1, JSON)")
    p.add_argument("--upstream", type=int, default=None, help=argparse.SUPPRESS)  # child mode
    p.add_argument("--relay", nargs=3, default=None, help=argparse.SUPPRESS)  # child mode: KIND PORT UPSTREAM_PORT
    args = p.parse_args()
    if args.upstream is not None:
        asyncio.run(_serve_upstream(args.upstream))
        return 0
    if args.relay is not None:
        _serve_relay(args.relay[0], int(args.relay[1]), int(args.relay[2]))
        return 0

    up_port = free_port()
    upstream = subprocess.Popen([sys.executable, "-m", "bench.overhead", "--upstream", str(up_port)])
    if args.floor:
        try:
            _floor(up_port, args.n1)
        finally:
            upstream.terminate()
            upstream.wait()
        return 0
    folder = temp_dir("aibox-overhead-")
    tables = gateway_tables(folder, up_port)
    if args.no_access_log:
        tables["server"] = {"log_level": "warning"}
    for part in filter(None, args.disable.split(",")):
        tables[part] = {"enabled": False}
        tables.pop(f"{part}.tiers.default", None)
    server = Aibox(write_config(folder, tables, [{"name": "m", "deployments": [{"backend": "up"}]}]))
    direct_url = f"http://127.0.0.1:{up_port}"
    json_h = {"content-type": "application/json"}
    auth_h = {**json_h, "authorization": "Bearer " + api_key("overhead")}
    results: dict[tuple[str, str, int], dict[str, Any]] = {}
    try:
        server.wait_ready()
        for mode, stream in [(m, m == "sse") for m in args.modes.split(",")]:
            targets = {
                "direct": (direct_url, json_h, _body(stream, "tiny")),
                "aibox": (server.url, auth_h, _body(stream, "m")),
            }
            for url, headers, body in targets.values():  # warm-up
                asyncio.run(_measure(url, "/v1/chat/completions", body, headers, 500, 1))
            rounds: dict[str, list[dict[str, Any]]] = {"direct": [], "aibox": []}
            per_round = max(50, args.n1 // max(1, args.rounds))
            for i in range(max(1, args.rounds)):
                for target in ("direct", "aibox") if i % 2 == 0 else ("aibox", "direct"):
                    url, headers, body = targets[target]
                    cpu0 = server.cpu_s()
                    r = asyncio.run(_measure(url, "/v1/chat/completions", body, headers, per_round, 1))
                    r["server_cpu_us"] = (server.cpu_s() - cpu0) / per_round * 1e6
                    rounds[target].append(r)
            for target, rs in rounds.items():
                results[(mode, target, 1)] = _combine(rs)
            results[(mode, "aibox", 1)]["overhead"] = statistics.median(
                a["p50"] - d["p50"] for a, d in zip(rounds["aibox"], rounds["direct"], strict=True)
            )
            for target in ("direct", "aibox"):
                url, headers, body = targets[target]
                asyncio.run(_measure(url, "/v1/chat/completions", body, headers, min(args.n32, 500), 32))  # warm-up
                cpu0 = server.cpu_s()
                r = asyncio.run(_measure(url, "/v1/chat/completions", body, headers, args.n32, 32))
                r["server_cpu_us"] = (server.cpu_s() - cpu0) / args.n32 * 1e6
                results[(mode, target, 32)] = r
    finally:
        rc = server.stop()
        upstream.terminate()
        upstream.wait()
    print(f"machine: {machine()}")
    print(f"aibox exit status after SIGTERM: {rc}; disabled: {args.disable or 'nothing (auth, limits, audit on)'}"
          f"{'; access log off' if args.no_access_log else ''}")
    print("| mode | c | direct p50 ms | aibox p50 ms | p50 overhead ms | x-aibox-overhead-ms p50 | direct p99 | aibox p99 | direct RPS | aibox RPS | aibox/direct RPS | aibox CPU us/req | RPS/worker core |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    failed = False
    for mode in args.modes.split(","):
        for conc in (1, 32):
            d, a = results[(mode, "direct", conc)], results[(mode, "aibox", conc)]
            failed |= bool(d["bad"] or a["bad"])
            overhead = a.get("overhead", a["p50"] - d["p50"])
            print(f"| {mode} | {conc} | {d['p50']:.3f} | {a['p50']:.3f} | {overhead:.3f} | {a['overhead_hdr_p50']:.3f} | "
                  f"{d['p99']:.3f} | {a['p99']:.3f} | {d['rps']:.0f} | {a['rps']:.0f} | {a['rps'] / d['rps']:.2f} | "
                  f"{a['server_cpu_us']:.0f} | {1e6 / a['server_cpu_us']:.0f} |")  # fmt: skip
    if failed:
        print("RESULT: FAIL (bad responses)")
    return 1 if failed or rc != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
