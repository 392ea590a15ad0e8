"""Transport overhead of the openai upstream backend under concurrency.

Starts a minimal SSE upstream in its own process (raw asyncio, pre-encoded events, chunked
HTTP/1.1 keep-alive, so the upstream costs little), then streams C concurrent requests of T events
through each client and reports wall time, client CPU per event and time-to-first-event:

  backend   backends.openai_upstream.OpenAIUpstreamBackend (httpx + our SSE parsing + Chunk objects)
  httpx     bare httpx.AsyncClient stream + aiter_lines
  httpx2    bare httpx2.AsyncClient (pydantic's fork; installed as a dependency of openai)
  raw       a hand-written asyncio HTTP/1.1 client: the floor for Python on this loop

    .venv/bin/python -m bench.upstream --concurrency 1 16 64 256 --tokens 64 --streams 512 [--delay 0.005]
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
from collections.abc import AsyncIterator, Callable
from typing import Any

_CL = re.compile(rb"(?i)content-length:\s*(\d+)")


# --------------------------------------------------------------------------- the upstream
def _events(num_tokens: int) -> list[bytes]:
    out = []
    for i in range(num_tokens):
        fin = '"stop"' if i == num_tokens - 1 else "null"
        out.append(b'data: {"id":"x","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"tok%d "},"finish_reason":%s}]}\n\n' % (i, fin.encode()))
    out.append(b'data: {"id":"x","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":%d}}\n\n' % num_tokens)
    out.append(b"data: [DONE]\n\n")
    return [b"%x\r\n%s\r\n" % (len(e), e) for e in out]


async def _serve(port: int, num_tokens: int, delay_s: float) -> None:
    chunks = _events(num_tokens)
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                req = await reader.readuntil(b"\r\n\r\n")
                m = _CL.search(req)
                await reader.readexactly(int(m.group(1)) if m else 0)
                writer.write(head)
                for c in chunks:
                    writer.write(c)
                    if delay_s:
                        await writer.drain()
                        await asyncio.sleep(delay_s)
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


# --------------------------------------------------------------------------- clients
BODY = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()


async def _lines_httpx(client: Any, url: str) -> AsyncIterator[str]:
    async with client.stream("POST", url + "/chat/completions", content=BODY, headers={"content-type": "application/json"}) as r:
        async for line in r.aiter_lines():
            if line.startswith("data:"):
                yield line


async def _events_httpx_raw(client: Any, url: str) -> AsyncIterator[bytes]:
    """httpx without its text/line decoders: raw bytes split on the SSE event separator."""
    async with client.stream("POST", url + "/chat/completions", content=BODY, headers={"content-type": "application/json"}) as r:
        buf = b""
        async for data in r.aiter_raw():
            buf += data
            *events, buf = buf.split(b"\n\n")
            for e in events:
                if e.startswith(b"data:"):
                    yield e


class RawClient:
    """Minimal HTTP/1.1 keep-alive client: request line, content-length body, chunked response."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def lines(self) -> AsyncIterator[str]:
        reader, writer = self.idle.pop() if self.idle else await asyncio.open_connection(self.host, self.port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(BODY), BODY))
        await reader.readuntil(b"\r\n\r\n")
        buf = b""
        while True:
            size = int((await reader.readline()).strip(), 16)
            if size == 0:
                await reader.readline()
                break
            buf += (await reader.readexactly(size + 2))[:-2]
            *events, buf = buf.split(b"\n\n")
            for e in events:
                if e.startswith(b"data:"):
                    yield e.decode()
        self.idle.append((reader, writer))

    async def close(self) -> None:
        for _, w in self.idle:
            w.close()


async def _run(make_stream: Callable[[], AsyncIterator[Any]], concurrency: int, num_streams: int) -> dict[str, float]:
    ttfts: list[float] = []
    num_events = 0
    sem = asyncio.Semaphore(concurrency)

    async def one() -> None:
        nonlocal num_events
        async with sem:
            t0 = time.perf_counter()
            first = True
            async for _ in make_stream():
                if first:
                    ttfts.append(time.perf_counter() - t0)
                    first = False
                num_events += 1

    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(one() for _ in range(num_streams)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    ttfts.sort()
    return {
        "wall_s": wall,
        "events_per_s": num_events / wall,
        "cpu_us_per_event": cpu / num_events * 1e6,
        "ttft_p50_ms": statistics.median(ttfts) * 1000,
        "ttft_p99_ms": ttfts[int(len(ttfts) * 0.99) - 1] * 1000 if len(ttfts) > 1 else ttfts[0] * 1000,
    }


async def bench(port: int, concurrency: int, num_streams: int, num_tokens: int, which: list[str]) -> dict[str, dict[str, float]]:
    import httpx

    from backends.base import GenerationRequest, Message
    from backends.openai_upstream import OpenAIUpstreamBackend
    from gateway.settings import OpenAIBackendConfig

    url = f"http://127.0.0.1:{port}/v1"
    limits = dict(max_connections=max(256, concurrency), max_keepalive_connections=max(256, concurrency))
    out: dict[str, dict[str, float]] = {}
    for name in which:
        if name == "backend":
            backend = OpenAIUpstreamBackend("bench", OpenAIBackendConfig(base_url=url, model="tiny", max_connections=max(256, concurrency)))
            await backend.start()
            req = GenerationRequest(request_id="b", model="m", messages=[Message(role="user", content="hi")])
            await _run(lambda: backend.generate(req), concurrency, concurrency)  # warm the pool
            out[name] = await _run(lambda: backend.generate(req), concurrency, num_streams)
            await backend.close()
        elif name in ("httpx", "httpx2"):
            mod = httpx if name == "httpx" else __import__("httpx2")
            async with mod.AsyncClient(limits=mod.Limits(**limits), timeout=None, trust_env=False) as client:
                await _run(lambda: _lines_httpx(client, url), concurrency, concurrency)
                out[name] = await _run(lambda: _lines_httpx(client, url), concurrency, num_streams)
        elif name == "httpx-raw":
            async with httpx.AsyncClient(limits=httpx.Limits(**limits), timeout=None, trust_env=False) as client:
                await _run(lambda: _events_httpx_raw(client, url), concurrency, concurrency)
                out[name] = await _run(lambda: _events_httpx_raw(client, url), concurrency, num_streams)
        elif name == "raw":
            raw = RawClient("127.0.0.1", port)
            await _run(raw.lines, concurrency, concurrency)
            out[name] = await _run(raw.lines, concurrency, num_streams)
            await raw.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--streams", type=int, default=512)
    p.add_argument("--delay", type=float, default=0.0, help="upstream seconds between events (0: burst)")
    p.add_argument("--clients", nargs="+", default=["backend", "httpx", "httpx2", "raw"])
    p.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve is not None:
        asyncio.run(_serve(args.serve, args.tokens, args.delay))
        return
    proc = subprocess.Popen([sys.executable, "-m", "bench.upstream", "--serve", "0", "--tokens", str(args.tokens), "--delay", str(args.delay)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline().split()[1])
        print(f"upstream: {args.tokens} events/stream, delay {args.delay}s; {args.streams} streams per cell")
        print(f"{'C':>4} {'client':<8} {'wall s':>7} {'events/s':>9} {'CPU us/ev':>10} {'TTFT p50':>9} {'p99 ms':>7}")
        for c in args.concurrency:
            for name, r in asyncio.run(bench(port, c, args.streams, args.tokens, args.clients)).items():
                print(f"{c:>4} {name:<8} {r['wall_s']:>7.2f} {r['events_per_s']:>9.0f} {r['cpu_us_per_event']:>10.1f} {r['ttft_p50_ms']:>9.1f} {r['ttft_p99_ms']:>7.1f}", flush=True)
    finally:
        proc.kill()
        proc.wait()


if __name__ == "__main__":
    main()
