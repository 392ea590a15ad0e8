"""Any OpenAI-compatible server as a backend: vLLM, llama-server, or another aibox worker.

Every request goes upstream with `stream: true` and `stream_options.include_usage`, whatever the
client asked: usage is then always known (for limits and audit), and the first-token timeout can
be enforced on the token itself, not on response headers. The gateway joins chunks for
non-streaming clients. (A server that ignores `stream` and answers with one JSON body still works.)

Deadlines (per request, from [backends.NAME]): connect_timeout_s (TCP+headers), first_token_timeout_s
(request sent -> first text), idle_timeout_s (between two upstream events once tokens flow),
total_timeout_s. Any of them -> BackendTimeout (retriable before the first byte).

Upstream errors -> ours (table in `backends.openai_wire`): connection errors, 429, 5xx and 401/403/404
(a misconfigured deployment) are retriable; 400/413/422 are the request's fault and are not.

Transport: `backends.upstream_http` (asyncio + httptools, a keep-alive pool of max_connections per
backend), not httpx. `bench/upstream.py`, 64 concurrent streams x 64 events from a local upstream
process on the 2-core dev VM (full tables: docs/upstream-transport.md):
    client                          CPU us/event   TTFT p99 (burst)   TTFT p99 (5 ms/event)
    this backend (httptools pool)        9.7           147 ms              34 ms
    first version of it over httpx      56.0           773 ms             331 ms
    bare httpx 0.28 stream()            84.4         5 173 ms           5 489 ms
    bare httpx2 2.16                    33.5           412 ms              93 ms
httpx's per-event cost (h11 + anyio + pool bookkeeping) grows with concurrency and shares the event
loop with every client connection; ours stays ~10 us/event (JSON decoding included).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from backends import openai_wire as wire
from backends.base import (
    BackendError,
    BackendInfo,
    BackendOverloaded,
    BackendTimeout,
    BackendUnavailable,
    Chunk,
    GenerationRequest,
    Usage,
)
from backends.upstream_http import ConnectionPool, ConnectTimeout, PoolTimeout, Response, TransportError
from gateway.settings import OpenAIBackendConfig

log = logging.getLogger("aibox.backends.openai")

# Extra OpenAI fields forwarded verbatim from the client's body when present (others are modelled).
_PASSTHROUGH = ("logit_bias", "response_format", "user", "min_p", "repetition_penalty")
_encoder = msgspec.json.Encoder()


class OpenAIUpstreamBackend:
    """Streams from an OpenAI-compatible server; see the module docstring for the contract."""

    def __init__(self, name: str, config: OpenAIBackendConfig) -> None:
        self.name = name
        self.config = config
        self._pool: ConnectionPool | None = None
        self.num_in_flight = 0
        self.num_requests_total = 0
        self.num_failures_total = 0
        self._warned_no_usage = False

    async def start(self) -> None:
        """Open the connection pool. Nothing is sent upstream: a down upstream must not stop startup."""
        headers = {"accept": "text/event-stream"}
        if self.config.api_key_env:
            key = os.environ.get(self.config.api_key_env)
            if not key:
                raise BackendError(f"backends.{self.name}.api_key_env: environment variable {self.config.api_key_env} is not set")
            headers["authorization"] = f"Bearer {key}"
        cfg = self.config
        # Reads are bounded by our own first-token/idle/total deadlines, not by the pool.
        self._pool = ConnectionPool(cfg.base_url, max_connections=cfg.max_connections, connect_timeout_s=cfg.connect_timeout_s, headers=headers)

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.aclose()

    def info(self) -> BackendInfo:
        return BackendInfo(
            name=self.name,
            type="openai",
            model_id=self.config.model_id or self.config.model,
            context_length=self.config.context_length,
            ready=self._pool is not None,
            detail={"upstream_model": self.config.model},
        )

    def stats(self) -> dict[str, float]:
        return {
            "in_flight": float(self.num_in_flight),
            "num_requests_total": float(self.num_requests_total),
            "num_failures_total": float(self.num_failures_total),
        }

    # ------------------------------------------------------------------ request
    def build_body(self, request: GenerationRequest) -> dict[str, Any]:
        """The upstream JSON body for a request (always streaming, always asking for usage)."""
        s = request.sampling
        body: dict[str, Any] = {"model": self.config.model, "stream": True, "stream_options": {"include_usage": True}}
        if request.messages is not None:
            body["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
        else:
            body["prompt"] = request.prompt or ""  # echo is the gateway's job: never forwarded
        if request.max_tokens is not None:
            body["max_tokens"] = request.max_tokens
        body["temperature"] = s.temperature
        body["top_p"] = s.top_p
        if s.top_k:
            body["top_k"] = s.top_k  # vLLM / llama-server extension; OpenAI itself has none
        if s.presence_penalty:
            body["presence_penalty"] = s.presence_penalty
        if s.frequency_penalty:
            body["frequency_penalty"] = s.frequency_penalty
        if s.seed is not None:
            body["seed"] = s.seed
        if s.stop:
            body["stop"] = list(s.stop)
        for key in _PASSTHROUGH:
            if request.raw and key in request.raw:
                body[key] = request.raw[key]
        return body

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        """Stream chunks from upstream. Errors before the first chunk are clean to fail over."""
        pool = self._pool
        if pool is None:
            raise BackendUnavailable("The model backend is not started.")
        chat = request.messages is not None
        path = "chat/completions" if chat else "completions"
        cfg = self.config
        start = time.monotonic()
        total_deadline = start + cfg.total_timeout_s
        self.num_in_flight += 1
        self.num_requests_total += 1
        try:
            body = _encoder.encode(self.build_body(request))
            headers = {"content-type": "application/json", "x-request-id": request.request_id}
            response = await self._send(pool, path, body, headers, start)
            try:
                if response.status_code != 200:
                    deadline = min(total_deadline, start + cfg.first_token_timeout_s)
                    try:
                        error_body = await self._bounded(response.aread(), deadline, "first token")
                    except TransportError:
                        error_body = b""
                    raise self._status_error(response.status_code, error_body, response.headers.get("retry-after"))
                if response.headers.get("content-type", "").startswith("application/json"):
                    inner = self._whole(response, chat, min(total_deadline, start + cfg.first_token_timeout_s))
                else:
                    inner = self._stream(response, chat, start, total_deadline)
                # Closed here, not left to the garbage collector: a consumer stops after the
                # finish chunk, and a suspended generator dropped unclosed costs the event loop
                # a finalizer task and a self-pipe wake-up per request (strace: write(eventfd)).
                async with contextlib.aclosing(inner):
                    async for chunk in inner:
                        yield chunk
            finally:
                await response.aclose()
        except BackendError as exc:
            if exc.retriable:
                self.num_failures_total += 1
            raise
        finally:
            self.num_in_flight -= 1

    async def _send(self, pool: ConnectionPool, path: str, body: bytes, headers: dict[str, str], start: float) -> Response:
        deadline = min(start + self.config.first_token_timeout_s, start + self.config.total_timeout_s)
        try:
            return await self._bounded(pool.request("POST", path, body, headers), deadline, "first token")
        except ConnectTimeout:
            raise BackendTimeout("Timed out connecting to the model backend.") from None
        except PoolTimeout:
            raise BackendOverloaded("The model backend has no free connection.", retry_after_s=1.0) from None
        except TransportError as exc:
            log.warning("upstream %s: %s: %s", self.name, type(exc).__name__, exc)
            raise BackendUnavailable("The model backend cannot be reached.") from None

    async def _bounded(self, awaitable: Any, deadline: float, what: str) -> Any:
        """Await with an absolute monotonic deadline; a miss is a BackendTimeout naming the deadline."""
        remaining = deadline - time.monotonic()
        try:
            async with asyncio.timeout(max(0.0, remaining)):
                return await awaitable
        except TimeoutError:
            raise BackendTimeout(f"The model backend did not answer in time ({what} timeout).") from None

    async def _stream(self, response: Response, chat: bool, start: float, total_deadline: float) -> AsyncIterator[Chunk]:
        cfg = self.config
        pieces = response.aiter_bytes()
        first_deadline = min(total_deadline, start + cfg.first_token_timeout_s)
        num_text_chunks = 0
        finish: str | None = None
        usage: Usage | None = None
        last = start
        buf = b""
        done = False
        while not done:
            deadline = first_deadline if num_text_chunks == 0 else min(total_deadline, last + cfg.idle_timeout_s)
            what = "first token" if num_text_chunks == 0 else ("total" if deadline == total_deadline else "idle")
            try:
                # A timer only when the read may wait: an upstream's burst is often buffered already.
                piece = await (anext(pieces) if response.ready() else self._bounded(anext(pieces), deadline, what))
            except StopAsyncIteration:
                break
            except TransportError as exc:
                log.warning("upstream %s: stream broken: %s", self.name, exc)
                raise BackendUnavailable("The model backend closed the connection mid-response.") from None
            piece += response.read_buffered()  # HTTP chunks that came in the same read (one per event, typically)
            *lines, buf = (buf + piece).split(b"\n")
            texts: list[str] = []  # the text events that arrived together, yielded as one chunk
            failure: BackendError | None = None  # raised once the text before it is out
            for line in lines:
                if not line.startswith(b"data:"):
                    continue  # blank separators, comments (keep-alives), `event:` lines
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                try:
                    event = wire.event_decoder.decode(data)
                except msgspec.DecodeError:
                    failure = BackendError("The model backend sent a malformed stream.")
                    break
                if event.error is not None:
                    log.warning("upstream %s sent an error event: %s", self.name, event.error.message)
                    failure = wire.stream_error(event.error)
                    break
                if event.usage is not None:
                    usage = Usage(prompt_tokens=event.usage.prompt_tokens, completion_tokens=event.usage.completion_tokens)
                for choice in event.choices:
                    if choice.index != 0:
                        continue  # we always ask for n=1; the gateway fans out itself
                    text = (choice.delta.content if choice.delta else None) if chat else choice.text
                    if choice.finish_reason:
                        finish = "length" if choice.finish_reason == "length" else "stop"
                    if text:
                        num_text_chunks += 1
                        texts.append(text)
            if texts:
                # Events that arrived together (an upstream under load batches tokens) are
                # already late for each other: one chunk costs the gateway one pass instead
                # of one per event, and the client gets their text in one SSE event.
                last = time.monotonic()
                yield Chunk(text=texts[0] if len(texts) == 1 else "".join(texts), num_tokens=len(texts))
            if failure is not None:
                raise failure
        if finish is None:
            raise BackendUnavailable("The model backend ended the response early.")
        if usage is None:
            if not self._warned_no_usage:
                log.warning("upstream %s sends no usage despite stream_options.include_usage; counting chunks", self.name)
                self._warned_no_usage = True
            usage = Usage(prompt_tokens=0, completion_tokens=num_text_chunks)
        if done:
            await self._drain(response, pieces, total_deadline)
        yield Chunk(finish_reason=finish, usage=usage)  # type: ignore[arg-type]

    async def _whole(self, response: Response, chat: bool, deadline: float) -> AsyncIterator[Chunk]:
        """A server that answered with one JSON body: one text chunk, then the final chunk."""
        try:
            body = await self._bounded(response.aread(), deadline, "first token")
            whole = wire.whole_decoder.decode(body)
        except TransportError:
            raise BackendUnavailable("The model backend closed the connection mid-response.") from None
        except (msgspec.DecodeError, msgspec.ValidationError):
            raise BackendError("The model backend sent a malformed response.") from None
        choice = next((c for c in whole.choices if c.index == 0), None)
        if choice is None:
            raise BackendError("The model backend sent a response without choices.")
        text = (choice.message.content if choice.message else None) if chat else choice.text
        if text:
            yield Chunk(text=text)
        u = whole.usage
        usage = Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens) if u else Usage(completion_tokens=1 if text else 0)
        yield Chunk(finish_reason="length" if choice.finish_reason == "length" else "stop", usage=usage)

    def _status_error(self, status: int, body: bytes, retry_after: str | None) -> BackendError:
        err = wire.status_error(status, body, retry_after)
        log.warning("upstream %s answered HTTP %d: %s", self.name, status, err.message)
        return err

    async def _drain(self, response: Response, pieces: AsyncIterator[bytes], deadline: float) -> None:
        """Read the (empty) rest after [DONE] so the connection goes back to the pool."""
        while response.ready():  # usually the whole rest is in already: no timer needed
            try:
                await anext(pieces)
            except (StopAsyncIteration, TransportError):
                return
        try:
            async with asyncio.timeout(max(0.0, min(deadline - time.monotonic(), 0.1))):
                async for _ in pieces:
                    pass
        except (TimeoutError, TransportError):
            pass  # the connection is closed instead of reused; nothing is lost
