"""Coalesce SSE events that are ready together into one socket write.

A streaming response is one ASGI `http.response.body` message per event, and uvicorn writes
each to the socket at once: a backend that delivers a burst (an upstream's TCP read holding many
events, a fast engine step) costs one `write` syscall per token. On the 2-core dev box that was
30 % of the gateway's CPU for 8-token streams from a fast upstream (docs/benchmarks.md).

`CoalescingSend` wraps the ASGI `send` of an SSE response (streaming.SSEResponse uses it): it
buffers the events and flushes them on the next turn of the event loop, i.e. as soon as the
producer waits for its next token: nothing is held back while the backend thinks, so
time-to-first-token and inter-token latency are unchanged, and a burst becomes one write. The
final message carries whatever is still buffered; past 64 KiB buffered the producer writes and
waits, so a slow client still applies backpressure. (It was a middleware around every response;
as part of the SSE response, JSON responses no longer pay for it.)

The response's `http.response.start` is held the same way and sent just before the first events
(or at the end of its loop turn if none are ready): uvicorn writes the head at once, and with
`gateway.corked` the head and the events that follow it in the same step go out as one write.
"""

from __future__ import annotations

import asyncio
from typing import Any

_MAX_BUFFERED_BYTES = 64 * 1024


class CoalescingSend:
    """`send = CoalescingSend(send)`, then `await send.aclose()` when the response is over."""

    __slots__ = ("_flushing", "_handle", "_loop", "_num_pending_bytes", "_pending", "_send", "_start")

    def __init__(self, send: Any) -> None:
        self._send = send
        self._loop = asyncio.get_running_loop()
        self._pending: list[bytes] = []
        self._num_pending_bytes = 0
        self._flushing: asyncio.Task[None] | None = None  # the last flush; each one waits for its predecessor
        self._handle: asyncio.Handle | None = None
        self._start: Any = None  # the held http.response.start message

    def push(self, body: bytes) -> asyncio.Task[None] | None:
        """Buffer one event: what sending `{"type": "http.response.body", "body": body,
        "more_body": True}` does, without the message or a coroutine. Returns the write to
        await when past 64 KiB (a slow client holds the producer back), else None."""
        self._pending.append(body)
        self._num_pending_bytes += len(body)
        if self._num_pending_bytes > _MAX_BUFFERED_BYTES:
            self._cancel_handle()
            self._flush()
            return self._flushing
        if self._handle is None:
            self._handle = self._loop.call_soon(self._flush)
        return None

    async def __call__(self, message: Any) -> None:
        if message["type"] == "http.response.start":
            self._start = message
            if self._handle is None:
                self._handle = self._loop.call_soon(self._flush)
            return
        if message["type"] == "http.response.body":
            if message.get("more_body", False):
                backpressure = self.push(message.get("body", b""))
                if backpressure is not None:
                    await backpressure
                return
            self._cancel_handle()  # the last message: buffered events go first
            if self._pending:
                message = {**message, "body": b"".join(self._pending) + message.get("body", b"")}
                self._pending.clear()
        if self._flushing is not None:
            await self._flushing
        start, self._start = self._start, None
        if start is not None:
            await self._send(start)
        await self._send(message)

    def _flush(self) -> None:
        self._handle = None
        if self._pending or self._start is not None:
            body = b"".join(self._pending)
            self._pending.clear()
            self._num_pending_bytes = 0
            start, self._start = self._start, None
            self._flushing = self._loop.create_task(self._write_after(self._flushing, start, body))

    async def _write_after(self, previous: asyncio.Task[None] | None, start: Any, body: bytes) -> None:
        if previous is not None:
            await previous
        if start is not None:
            await self._send(start)
        if body:
            await self._send({"type": "http.response.body", "body": body, "more_body": True})

    def _cancel_handle(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    async def aclose(self) -> None:
        """Drop what was not sent (the response was cut off) and stop a flush in progress."""
        self._cancel_handle()
        flushing = self._flushing
        if flushing is not None and not flushing.done():
            flushing.cancel()
            await asyncio.gather(flushing, return_exceptions=True)
