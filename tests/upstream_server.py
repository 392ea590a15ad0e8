"""A tiny OpenAI-compatible upstream for tests and benchmarks: a raw ASGI app on uvicorn.

Behaviour is chosen per request by the `model` string sent upstream, so one server can play many
deployments: `model = "tiny?tokens=5&delay=0.01&first_delay=0.2&status=503&retry_after=3"`.
  tokens       number of completion tokens (default 3); the first one is the server's name
  first_delay  seconds before the first token;  delay  seconds between tokens
  status       answer with this HTTP status and an OpenAI error body instead
  retry_after  Retry-After header on an error answer
  no_usage     never send a usage chunk (like servers that ignore stream_options)
  cut          close the connection abruptly after this many tokens
  json         answer with one non-streaming JSON body (a server that ignores `stream`)
  burst        send the whole stream in one write (an upstream batching tokens under load)
  error_after  send an error event after this many tokens, then end the stream
A message (or prompt) starting with `opts:` adds options for that one request (`opts:first_delay=2`),
and `UpstreamApp.force_status` makes every request fail until reset.
Run in a thread (`UpstreamServer`) or as a process that can be killed
(`python -m tests.upstream_server --name NAME`, prints `PORT <n>`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import threading
import time
from collections import Counter
from typing import Any
from urllib.parse import parse_qsl

import uvicorn


class UpstreamApp:
    """ASGI app; counts requests and in-flight streams so tests can see who served what."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.num_requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.by_model: Counter[str] = Counter()
        self.last_body: dict[str, Any] | None = None
        self.last_headers: dict[str, str] = {}
        self.force_status: int | None = None  # tests flip this to make the whole server fail

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        if scope["method"] == "GET":
            if path.endswith("/stats"):
                stats = {"name": self.name, "requests": self.num_requests, "in_flight": self.in_flight, "by_model": dict(self.by_model)}
                return await _json(send, 200, stats)
            if path.endswith("/models"):
                return await _json(send, 200, {"object": "list", "data": [{"id": "tiny", "object": "model"}]})
            return await _json(send, 404, {"error": {"message": "no such path"}})
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        req = json.loads(body)
        self.num_requests += 1
        self.last_body = req
        self.last_headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        model = str(req.get("model", ""))
        self.by_model[model] += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            opts = dict(parse_qsl(model.partition("?")[2]))
            text = str(req.get("prompt") or (req.get("messages") or [{}])[-1].get("content") or "")
            if text.startswith("opts:"):
                opts.update(parse_qsl(text[5:].split()[0] if text[5:].split() else ""))
            if self.force_status is not None:
                opts["status"] = str(self.force_status)
            await self._generate(path, req, opts, send)
        finally:
            self.in_flight -= 1

    async def _generate(self, path: str, req: dict, opts: dict[str, str], send: Any) -> None:
        if "status" in opts:
            headers = [(b"retry-after", opts["retry_after"].encode())] if "retry_after" in opts else []
            code = "context_length_exceeded" if opts.get("code") == "ctx" else None
            err = {"error": {"message": f"upstream says {opts['status']}", "type": "invalid_request_error", "code": code}}
            return await _json(send, int(opts["status"]), err, headers)
        chat = path.endswith("/chat/completions")
        num_tokens = int(opts.get("tokens", 3))
        words = [f"{self.name} "] + [f"w{i} " for i in range(1, num_tokens)]
        if "json" in opts:  # a server that ignores `stream: true`
            text = "".join(words)
            choice = {"index": 0, "message": {"role": "assistant", "content": text}} if chat else {"index": 0, "text": text}
            usage = {"prompt_tokens": 7, "completion_tokens": num_tokens, "total_tokens": 7 + num_tokens}
            return await _json(send, 200, {"id": "x", "choices": [{**choice, "finish_reason": "stop"}], "usage": usage})
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await asyncio.sleep(float(opts.get("first_delay", 0)))
        held: list[bytes] = []  # burst: everything goes out with [DONE]

        async def event(obj: dict) -> None:
            data = b"data: " + json.dumps(obj).encode() + b"\n\n"
            if "burst" in opts:
                held.append(data)
            else:
                await send({"type": "http.response.body", "body": data, "more_body": True})

        for i, word in enumerate(words):
            if "cut" in opts and i >= int(opts["cut"]):
                raise ConnectionAbortedError("cut by test")  # uvicorn drops the connection mid-body
            if "error_after" in opts and i >= int(opts["error_after"]):
                await event({"error": {"message": "upstream broke mid-stream", "type": "server_error"}})
                break
            if i and float(opts.get("delay", 0)):
                await asyncio.sleep(float(opts["delay"]))
            choice = {"index": 0, "delta": {"content": word}} if chat else {"index": 0, "text": word}
            choice["finish_reason"] = ("length" if num_tokens == req.get("max_tokens") else "stop") if i == num_tokens - 1 else None
            await event({"id": "x", "object": "chunk", "created": int(time.time()), "model": "tiny", "choices": [choice]})
        if (req.get("stream_options") or {}).get("include_usage") and "no_usage" not in opts:
            usage = {"prompt_tokens": 7, "completion_tokens": num_tokens, "total_tokens": 7 + num_tokens}
            await event({"id": "x", "object": "chunk", "choices": [], "usage": usage})
        await send({"type": "http.response.body", "body": b"".join(held) + b"data: [DONE]\n\n", "more_body": False})


async def _json(send: Any, status: int, obj: dict, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json"), *(headers or [])]})
    await send({"type": "http.response.body", "body": json.dumps(obj).encode()})


def _config(app: UpstreamApp) -> uvicorn.Config:
    return uvicorn.Config(app, log_level="error", lifespan="off", ws="none", http="h11", loop="asyncio", access_log=False)


class UpstreamServer:
    """Runs an UpstreamApp on 127.0.0.1:<free port> in a background thread."""

    def __init__(self, name: str, port: int = 0) -> None:
        self.app = UpstreamApp(name)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", port))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._server = uvicorn.Server(_config(self.app))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def __enter__(self) -> UpstreamServer:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("upstream server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._server.force_exit = True
        self._thread.join(timeout=10)
        self._sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", default="up")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    uvicorn.Server(_config(UpstreamApp(args.name))).run(sockets=[sock])


if __name__ == "__main__":
    main()
