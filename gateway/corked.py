"""One socket write per response where uvicorn makes two.

uvicorn writes a response's status line and headers to the socket as soon as the app sends
`http.response.start`, and the body as a second write: two `write` syscalls for every JSON
response, each waking the client's reader on its own. `CorkedHttpToolsProtocol` is uvicorn's
httptools protocol with a corked transport: the first write of each response (the head) is held
back, and goes out joined with the second one, at once, when that follows in the same turn of
the event loop (a JSON body, or an SSE response's first events: streaming.SSEResponse sends
its head with them). A head left alone goes out at the end of that turn (`loop.call_soon`).
Later writes of the response go straight through, so nothing is held back while a backend
thinks. `aibox serve` runs it (`uvicorn.Config(http=...)`).

It also gives each request's scope a `ClientHub` (`scope[CLIENT_KEY]`): callbacks run the
moment the connection is lost before the response is complete (or a drain aborts the request,
gateway.drain). The pipeline learns that the client left from it without a task per request
blocked in `receive` (gateway.streaming.ClientGone, which falls back to that task under
another server).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class CorkedTransport:
    """A transport proxy for `CorkedHttpToolsProtocol`. After `cork()` the next write is held
    until a second one joins it or the loop turn ends; `close()` sends it first, `abort()`
    drops it."""

    __slots__ = ("_corked", "_handle", "_loop", "_pending", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._corked = False
        self._pending: bytes | None = None
        self._handle: asyncio.Handle | None = None

    def cork(self) -> None:
        self._corked = True

    def write(self, data: bytes) -> None:
        if not self._corked:
            self._transport.write(data)
        elif self._pending is None:
            self._pending = data
            self._handle = self._loop.call_soon(self._flush)
        else:
            self._cancel()
            data, self._pending, self._corked = self._pending + data, None, False
            self._transport.write(data)

    def _flush(self) -> None:
        self._handle = None
        self._corked = False
        data, self._pending = self._pending, None
        if data is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _flush_now(self) -> None:
        self._cancel()
        self._flush()

    def close(self) -> None:
        self._flush_now()
        self._transport.close()

    def abort(self) -> None:
        self._cancel()
        self._pending, self._corked = None, False
        self._transport.abort()

    def writelines(self, chunks: Any) -> None:
        self.write(b"".join(chunks))

    def write_eof(self) -> None:
        self._flush_now()
        self._transport.write_eof()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def __getattr__(self, name: str) -> Any:  # get_extra_info, set_write_buffer_limits, ...
        return getattr(self._transport, name)


CLIENT_KEY = "aibox.client"


class ClientHub:
    """Who to tell when the client of one request goes away. `fire()` runs the callbacks once,
    at once, in the event loop (they must only cancel or flag); a callback added after that
    runs at once too."""

    __slots__ = ("callbacks", "gone")

    def __init__(self) -> None:
        self.callbacks: list[Callable[[], object]] = []
        self.gone = False

    def add(self, callback: Callable[[], object]) -> None:
        if self.gone:
            callback()
        else:
            self.callbacks.append(callback)

    def discard(self, callback: Callable[[], object]) -> None:
        try:
            self.callbacks.remove(callback)
        except ValueError:
            pass

    def fire(self) -> None:
        if self.gone:
            return
        self.gone = True
        callbacks, self.callbacks = self.callbacks, []
        for callback in callbacks:
            callback()


class CorkedHttpToolsProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CorkedTransport(transport, self.loop))  # type: ignore[arg-type]

    def on_headers_complete(self) -> None:
        self.transport.cork()  # type: ignore[attr-defined]
        self.scope[CLIENT_KEY] = ClientHub()  # type: ignore[typeddict-unknown-key]
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if not self.pipeline:
            # uvicorn pauses reading while a big body is buffered and resumes only in receive();
            # nothing calls receive() once the body is in (the pipeline listens to the hub), and
            # a socket that is not read never reports the peer leaving. The body is complete:
            # read on (a pipelined request pauses reading again in on_headers_complete).
            self.flow.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        cycle = self.cycle
        super().connection_lost(exc)
        if cycle is not None and not cycle.response_complete:
            hub = cycle.scope.get(CLIENT_KEY)  # type: ignore[misc]
            if hub is not None:
                hub.fire()
