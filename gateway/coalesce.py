"""Coalesce SSE events that are ready together into one socket write.

A streaming response is one ASGI `http.response.body` message per event, and uvicorn writes
each to the socket at once: a backend that delivers a burst (an upstream's TCP read holding many
events, a fast engine step) costs one `write` syscall per token. On the 2-core dev box that was
30 % of the gateway's CPU for 8-token streams from a fast upstream (docs/benchmarks.md).

This middleware buffers the events of an SSE response and flushes them on the next turn of the
event loop, i.e. as soon as the producer waits for its next token: nothing is held back while
the backend thinks, so time-to-first-token and inter-token latency are unchanged, and a burst
becomes one write. The final message carries whatever is still buffered; past 64 KiB buffered the
producer writes and waits, so a slow client still applies backpressure.
Non-SSE responses pass through untouched.
"""

from __future__ import annotations

import asyncio
from typing import Any

_MAX_BUFFERED_BYTES = 64 * 1024


def coalesce_sse(app: Any) -> Any:
    """Litestar/ASGI middleware factory."""

    async def middleware(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        pending: list[bytes] = []
        num_pending_bytes = 0
        flushing: asyncio.Task[None] | None = None  # the last flush; each one waits for its predecessor
        handle: asyncio.Handle | None = None
        is_sse = False

        async def write_after(previous: asyncio.Task[None] | None, body: bytes) -> None:
            if previous is not None:
                await previous
            await send({"type": "http.response.body", "body": body, "more_body": True})

        def flush_soon() -> None:
            nonlocal handle, flushing, num_pending_bytes
            handle = None
            if pending:
                body = b"".join(pending)
                pending.clear()
                num_pending_bytes = 0
                flushing = loop.create_task(write_after(flushing, body))

        async def coalescing_send(message: Any) -> None:
            nonlocal is_sse, handle, num_pending_bytes
            kind = message["type"]
            if kind == "http.response.start":
                is_sse = any(k == b"content-type" and v.startswith(b"text/event-stream") for k, v in message.get("headers", ()))
            elif is_sse and kind == "http.response.body" and message.get("more_body", False):
                pending.append(message.get("body", b""))
                num_pending_bytes += len(pending[-1])
                if num_pending_bytes > _MAX_BUFFERED_BYTES:  # write now and wait: a slow client holds the producer back
                    if handle is not None:
                        handle.cancel()
                        handle = None
                    flush_soon()
                    assert flushing is not None
                    await flushing
                elif handle is None:
                    handle = loop.call_soon(flush_soon)
                return
            elif is_sse and kind == "http.response.body":  # the last message: buffered events go first
                if handle is not None:
                    handle.cancel()
                    handle = None
                if pending:
                    message = {**message, "body": b"".join(pending) + message.get("body", b"")}
                    pending.clear()
            if flushing is not None:
                await flushing
            await send(message)

        try:
            await app(scope, receive, coalescing_send)
        finally:
            if handle is not None:
                handle.cancel()
            if flushing is not None and not flushing.done():
                flushing.cancel()
                await asyncio.gather(flushing, return_exceptions=True)

    return middleware
