"""Backend chunks -> OpenAI response objects and SSE frames.

SSE framing is exactly OpenAI's: `data: {json}\\n\\n` per chunk and `data: [DONE]\\n\\n` last.
Chat streams open with a role delta, close each choice with an empty delta carrying
`finish_reason`, and (with `stream_options.include_usage`) end with a `choices: []` usage chunk,
every earlier chunk then carrying `"usage": null`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from gateway.coalesce import CoalescingSend
from gateway.corked import CLIENT_KEY, ClientHub
from gateway.schemas import encoder

DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"


class JSONResponse:
    """A finished JSON body as a bare ASGI app. A route annotated to return `ASGIApp` hands it
    to the server as is, skipping Litestar's Response -> ASGIResponse conversion (header
    normalisation, cookies, media-type checks): ~7% of a small request's CPU."""

    __slots__ = ("after", "body", "headers", "status_code")

    def __init__(self, body: bytes, status_code: int = 200, headers: dict[str, str] | None = None) -> None:
        self.body = body
        self.status_code = status_code
        self.headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        self.headers += _encode_headers(headers or {})
        self.after: Callable[[], None] | None = None  # runs once the last byte is sent (or could not be)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.headers})
            await send({"type": "http.response.body", "body": self.body, "more_body": False})
        finally:
            if self.after is not None:
                self.after()


def _encode_headers(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


class ClientGone:
    """Calls `callback()` once when the client of this request goes away. With gateway.corked's
    protocol that is a callback on the scope's ClientHub (no task); under another server, a
    task blocked in `receive` until `http.disconnect`. `close()` when no longer interested."""

    __slots__ = ("_callback", "_hub", "_task", "fired")

    def __init__(self, scope: Any, receive: Any, callback: Callable[[], object]) -> None:
        self._callback = callback
        self.fired = False  # the client went away (the callback ran)
        self._hub: ClientHub | None = scope.get(CLIENT_KEY)
        self._task: asyncio.Task[None] | None = None
        if self._hub is not None:
            self._hub.add(self._fire)
        else:
            self._task = asyncio.ensure_future(self._watch(receive))

    def _fire(self) -> None:
        self.fired = True
        self._callback()

    async def _watch(self, receive: Any) -> None:
        try:
            while (await receive())["type"] != "http.disconnect":
                pass
        except Exception:  # a broken receive: the connection is gone as far as we can tell
            pass
        self._fire()

    def close(self) -> None:
        if self._hub is not None:
            self._hub.discard(self._fire)
        elif self._task is not None:
            self._task.cancel()


class ClientWatch:
    """`async with ClientWatch(scope, receive) as watch:` cancels the body of the block when the
    client disconnects (ClientGone), and the block then ends normally with `watch.client_gone`
    set. A cancellation from anyone else propagates as usual.

    `hold()`: while it returns True the block is finishing up on its own (a stream writing its
    audit row before [DONE]) and a disconnect only sets `client_gone`: nothing is cut in half,
    and no task is needed to shield that work."""

    __slots__ = ("scope", "receive", "task", "gone", "armed", "client_gone", "hold", "cancelled")

    def __init__(self, scope: Any, receive: Any, hold: Callable[[], bool] | None = None) -> None:
        self.scope = scope
        self.receive = receive
        self.hold = hold
        self.armed = True
        self.client_gone = False
        self.cancelled = False  # we cancelled the block

    async def __aenter__(self) -> ClientWatch:
        task = asyncio.current_task()
        assert task is not None
        self.task = task
        self.gone = ClientGone(self.scope, self.receive, self._left)
        return self

    def _left(self) -> None:
        if self.armed:
            self.client_gone = True
            if self.hold is None or not self.hold():  # the cancel lands inside the block: the task is suspended in it now
                self.cancelled = True
                self.task.cancel()

    def disarm(self) -> None:
        """From here on a disconnect is not the client leaving (uvicorn also says "disconnect"
        once the response is complete)."""
        self.armed = False

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        self.armed = False
        self.gone.close()
        return exc_type is asyncio.CancelledError and self.cancelled and self.task.uncancel() == 0


class SSEResponse:
    """An SSE body as a bare ASGI app: sends each event as the iterator yields it, and stops the
    iteration when the client leaves (unless `hold()` says it is finishing up on its own), so the
    iterator's `finally` cleans up (abort the backend, settle limits, audit). No task of its own
    (ClientWatch listens to the scope's ClientHub), where Litestar's Stream runs an anyio task
    group with cancel scopes."""

    __slots__ = ("after", "events", "headers", "hold")

    def __init__(
        self,
        events: AsyncIterator[bytes],
        headers: dict[str, str] | None = None,
        hold: Callable[[], bool] | None = None,
    ) -> None:
        self.events = events
        self.headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
        self.headers += _encode_headers(headers or {})
        self.hold = hold  # see ClientWatch
        self.after: Callable[[], None] | None = None  # runs once the last byte is sent (or could not be)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        send = CoalescingSend(send)  # events ready in the same loop turn go out in one write
        try:
            # The head is held by CoalescingSend and written with the first events. Nothing
            # here suspends before the first __anext__ enters the iterator, so its `finally`
            # always runs: a disconnect's cancel lands inside it (or in a body send after it).
            await send({"type": "http.response.start", "status": 200, "headers": self.headers})
            async with ClientWatch(scope, receive, self.hold) as watch:
                async for event in self.events:
                    backpressure = send.push(event)  # buffered, written on the next loop turn
                    if backpressure is not None:
                        await backpressure
                watch.disarm()
                if not watch.client_gone:  # gone while finishing up (hold): nothing left to send it
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            try:
                await send.aclose()
            finally:
                try:
                    await self.events.aclose()  # type: ignore[attr-defined]  # its cleanup, if cut off mid-way
                finally:
                    if self.after is not None:
                        self.after()


def sse(obj: Any) -> bytes:
    return b"data: " + encoder.encode(obj) + b"\n\n"


def usage_dict(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class ResponseShape:
    """Builds objects for one response (chat or text completion), sharing id/created/model."""

    def __init__(self, endpoint: str, response_id: str, created: int, model: str, include_usage: bool) -> None:
        self.chat = endpoint == "chat.completions"
        self.base: dict[str, Any] = {
            "id": response_id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": created,
            "model": model,
            "system_fingerprint": None,
        }
        self.include_usage = include_usage

    def _chunk(self, choices: list[dict[str, Any]]) -> bytes:
        obj = {**self.base, "choices": choices}
        if self.include_usage:
            obj["usage"] = None
        return sse(obj)

    def role_chunk(self, index: int) -> bytes:
        return self._chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])

    def text_chunk(self, index: int, text: str) -> bytes:
        if self.chat:
            return self._chunk([{"index": index, "delta": {"content": text}, "logprobs": None, "finish_reason": None}])
        return self._chunk([{"index": index, "text": text, "logprobs": None, "finish_reason": None}])

    def finish_chunk(self, index: int, finish_reason: str) -> bytes:
        if self.chat:
            return self._chunk([{"index": index, "delta": {}, "logprobs": None, "finish_reason": finish_reason}])
        return self._chunk([{"index": index, "text": "", "logprobs": None, "finish_reason": finish_reason}])

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        return sse({**self.base, "choices": [], "usage": usage_dict(prompt_tokens, completion_tokens)})

    def full(self, texts: list[str], finish_reasons: list[str], prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        """The non-streaming response body."""
        if self.chat:
            choices = [
                {"index": i, "message": {"role": "assistant", "content": t, "refusal": None}, "logprobs": None, "finish_reason": f}
                for i, (t, f) in enumerate(zip(texts, finish_reasons, strict=True))
            ]
            obj_type = "chat.completion"
        else:
            choices = [
                {"index": i, "text": t, "logprobs": None, "finish_reason": f}
                for i, (t, f) in enumerate(zip(texts, finish_reasons, strict=True))
            ]
            obj_type = "text_completion"
        return {**self.base, "object": obj_type, "choices": choices, "usage": usage_dict(prompt_tokens, completion_tokens)}


def error_event(body: dict[str, Any]) -> bytes:
    """An error after the stream began: an `error` event, then the caller sends [DONE]."""
    return sse(body)
