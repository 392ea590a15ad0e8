"""Graceful drain on SIGTERM (and the first SIGINT).

    signal -> `/ready` answers 503 at once (state.draining), the listener stays open
           -> new API requests get 503 service_unavailable (+ Retry-After, Connection: close)
           -> in-flight requests run to completion, up to server.shutdown_timeout_s
           -> the rest are aborted: a started SSE stream gets an error event then [DONE], a request
              without a response yet gets a 503 body; the pipeline sees a disconnect and cleans up
           -> uvicorn stops (lifespan shutdown flushes the audit store) and the process exits 0.

uvicorn's own handler would close the listener first (so /ready could not say "draining") and
re-raise the signal after shutdown (so the exit status would not be 0); `DrainingServer`
replaces that handler. A second signal falls back to uvicorn's immediate exit.

The abort works the way a client leaving does: `Drain.middleware` fires the request's ClientHub
(gateway.corked; the pipeline listens to it), hands a task waiting in `receive` an
`http.disconnect` (under another server), and finishes the response on the app's behalf, so no
pipeline code needs to know about draining.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Any

import uvicorn

from gateway.corked import CLIENT_KEY
from gateway.errors import Unavailable
from gateway.schemas import encoder
from gateway.streaming import DONE, error_event

log = logging.getLogger("aibox.drain")

# Set in the ASGI scope of a request the drain aborted (the app then sees an http.disconnect).
ABORTED_SCOPE_KEY = "aibox.drain_aborted"
# Paths that stay open while draining: probes and scrapes.
OPS_PATHS = ("/health", "/ready", "/metrics")
# Requests that get an audit row (the pipeline's endpoints), also when refused here.
API_PATHS = ("/v1/chat/completions", "/v1/completions")
_ABORTED = Unavailable("The server is shutting down; retry on another instance.", code="server_shutting_down")


def aborted_error(scope: Any) -> Unavailable | None:
    """For a request that ends without its client: the error if a drain aborted it (503
    server_shutting_down), None if the client itself left."""
    if scope is not None and scope.get(ABORTED_SCOPE_KEY):
        return Unavailable(_ABORTED.message, code=_ABORTED.code)
    return None
_REFUSED = Unavailable("The server is shutting down and accepts no new requests.", code="server_shutting_down")


_DISCONNECT = {"type": "http.disconnect"}


class _Active:
    """One request in flight. An abort wakes the tasks blocked in `receive` by cancelling them
    (and un-cancelling them as they return `http.disconnect`): no extra task per request."""

    __slots__ = ("scope", "aborted", "receivers", "cancelled", "started", "is_sse", "complete")

    def __init__(self, scope: Any) -> None:
        self.scope = scope
        self.aborted = False
        self.receivers: set[asyncio.Task[Any]] = set()
        self.cancelled: set[asyncio.Task[Any]] = set()
        self.started = False
        self.is_sse = False
        self.complete = False

    def abort(self) -> None:
        self.aborted = True
        self.scope[ABORTED_SCOPE_KEY] = True  # lets the pipeline tell a drain abort from a client leaving
        hub = self.scope.get(CLIENT_KEY)
        if hub is not None:  # gateway.corked: the pipeline watches through the hub
            hub.fire()
        for task in self.receivers:
            self.cancelled.add(task)
            task.cancel()


class Drain:
    """Counts requests in flight, refuses new ones while draining and aborts stragglers."""

    def __init__(self, shutdown_timeout_s: float) -> None:
        self.shutdown_timeout_s = shutdown_timeout_s
        self.draining = False
        self._active: set[_Active] = set()
        # Records a refused API request (audit row, metrics, access log) and returns extra
        # response headers (x-request-id); the app sets it once its services exist.
        self.on_refused: Callable[[Any, Unavailable], Awaitable[list[tuple[bytes, bytes]]]] | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def num_active(self) -> int:
        return len(self._active)

    def middleware(self, app: Any) -> Any:
        """Litestar middleware factory (pure ASGI, a few attribute reads per request)."""

        async def drain_middleware(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http" or scope["path"].startswith(OPS_PATHS):
                await app(scope, receive, send)
                return
            if self.draining:
                await self._refuse(scope, send)
                return
            await self._run(app, scope, receive, send)

        return drain_middleware

    async def _refuse(self, scope: Any, send: Any) -> None:
        """503 a new request; an API request is recorded first (audit row, metrics, access log),
        counted as active meanwhile so that shutdown does not close the audit store under it."""
        headers: list[tuple[bytes, bytes]] = []
        if self.on_refused is not None and scope["method"] == "POST" and scope["path"].rstrip("/") in API_PATHS:
            act = _Active(scope)
            self._active.add(act)
            self._idle.clear()
            try:  # audited like any other rejected request, before the response
                headers = await self.on_refused(scope, _REFUSED)
            except Exception:
                log.exception("could not record a request refused while draining")
            finally:
                self._active.discard(act)
                if not self._active:
                    self._idle.set()
        await _send_error(send, _REFUSED, close=True, headers=headers)

    async def _run(self, app: Any, scope: Any, receive: Any, send: Any) -> None:
        act = _Active(scope)
        self._active.add(act)
        self._idle.clear()
        body_done = False

        async def receive_or_abort() -> Any:
            nonlocal body_done
            if act.aborted:
                return _DISCONNECT
            if not body_done:  # reading the body
                message = await receive()
                body_done = message["type"] != "http.request" or not message.get("more_body", False)
                return message
            # Waiting for a disconnect (streams, long generations): an abort cancels this wait.
            task = asyncio.current_task()
            assert task is not None
            act.receivers.add(task)
            try:
                return await receive()
            except asyncio.CancelledError:
                if task not in act.cancelled:
                    raise
                act.cancelled.discard(task)
                if task.uncancel() > 0:  # someone else cancelled it too
                    raise
                return _DISCONNECT
            finally:
                act.receivers.discard(task)

        async def send_unless_aborted(message: Any) -> None:
            if act.aborted:
                return  # the app is being told the client left; we finish the response
            if message["type"] == "http.response.start":
                act.started = True
                act.is_sse = any(k == b"content-type" and v.startswith(b"text/event-stream") for k, v in message["headers"])
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                act.complete = True
            await send(message)

        try:
            await app(scope, receive_or_abort, send_unless_aborted)
        finally:
            self._active.discard(act)
            if not self._active:
                self._idle.set()
        if act.aborted and not act.complete:
            await _finish_aborted(send, act)

    def begin(self, state: Any) -> None:
        """Stop admitting work and turn /ready false (synchronous: call from a signal callback)."""
        self.draining = True
        state.draining = True

    async def run(self, state: Any) -> None:
        """Drain: wait for in-flight requests up to the timeout, then abort the rest."""
        self.begin(state)
        log.info("draining: %d requests in flight, waiting up to %.1fs", self.num_active, self.shutdown_timeout_s)
        try:
            await asyncio.wait_for(self._idle.wait(), self.shutdown_timeout_s)
        except TimeoutError:
            log.warning("drain timeout: aborting %d requests", self.num_active)
            for act in list(self._active):
                act.abort()
            try:
                await asyncio.wait_for(self._idle.wait(), 10.0)
            except TimeoutError:
                log.error("%d requests did not stop after the abort", self.num_active)
        services = getattr(state, "services", None)
        if services is not None and services.background:  # cleanup of aborted requests (audit rows)
            await asyncio.gather(*list(services.background), return_exceptions=True)
        log.info("drained")


async def _send_error(send: Any, err: Unavailable, *, close: bool = False, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [(b"content-type", b"application/json"), (b"retry-after", b"1"), *(headers or [])]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": err.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": encoder.encode(err.body()), "more_body": False})


async def _finish_aborted(send: Any, act: _Active) -> None:
    try:
        if not act.started:
            await _send_error(send, _ABORTED, close=True)
        elif act.is_sse:
            await send({"type": "http.response.body", "body": error_event(_ABORTED.body()) + DONE, "more_body": False})
        else:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
    except Exception:  # the client may be gone too
        log.debug("could not finish an aborted response", exc_info=True)


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains through the app's `Drain` before exiting."""

    def __init__(self, config: uvicorn.Config, state: Any) -> None:
        super().__init__(config)
        self._state = state  # the app's state; the lifespan puts a `Drain` at state.drain
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        ready = self.started and self._loop is not None and getattr(self._state, "drain", None) is not None
        if self._drain_task is None and not self.should_exit and ready and sig in (signal.SIGTERM, signal.SIGINT):
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._start_drain)
            return
        super().handle_exit(sig, frame)  # not started yet, or a second signal: uvicorn's exit

    def _start_drain(self) -> None:
        if self._drain_task is not None:
            return
        drain: Drain = self._state.drain
        drain.begin(self._state)
        self._drain_task = asyncio.get_running_loop().create_task(drain.run(self._state))
        self._drain_task.add_done_callback(self._drained)

    def _drained(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("drain failed", exc_info=task.exception())
        self.should_exit = True
