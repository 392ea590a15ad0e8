"""Any OpenAI-compatible server as a backend: vLLM, llama-server, or another aibox worker.

Every request goes upstream with `stream: true` and `stream_options.include_usage`, whatever the
client asked: usage is then always known (for limits and audit), and the first-token timeout can
be enforced on the token itself, not on response headers. The gateway joins chunks for
non-streaming clients. (A server that ignores `stream` and answers with one JSON body still works.)

Deadlines (per request, from [backends.NAME]): connect_timeout_s (TCP+headers), first_token_timeout_s
(request sent -> first text), idle_timeout_s (between two upstream events once tokens flow),
total_timeout_s. Any of them -> BackendTimeout (retriable before the first byte).

Upstream errors -> ours:
    connection refused/reset, DNS          BackendUnavailable   (retriable)
    429, or 503 with Retry-After          BackendOverloaded    (retriable; carries Retry-After)
    5xx, 408, 409                          BackendUnavailable   (retriable)
    401, 403, 404                          BackendUnavailable   (retriable: our key or our configured
                                                                 model is wrong for this deployment,
                                                                 another deployment may be right)
    400, 413, 422 and other 4xx            BackendRequestError  (not retriable; upstream's message),
                                           ContextLengthExceeded when upstream says so

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
import email.utils
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from backends.base import (
    BackendError,
    BackendInfo,
    BackendOverloaded,
    BackendRequestError,
    BackendTimeout,
    BackendUnavailable,
    Chunk,
    ContextLengthExceeded,
    GenerationRequest,
    Usage,
)
from backends.upstream_http import ConnectionPool, ConnectTimeout, PoolTimeout, Response, TransportError
from gateway.settings import OpenAIBackendConfig

log = logging.getLogger("aibox.backends.openai")

# Extra OpenAI fields forwarded verbatim from the client's body when present (others are modelled).
_PASSTHROUGH = ("logit_bias", "response_format", "user", "min_p", "repetition_penalty")
_REQUEST_CAUSED = {400, 413, 422}
_RETRIABLE_4XX = {401, 403, 404, 408, 409, 425}


class _UpstreamUsage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    index: int = 0
    text: str | None = None  # /completions
    delta: _Delta | None = None  # /chat/completions
    finish_reason: str | None = None


class _UpstreamError(msgspec.Struct):
    message: str = "upstream error"
    type: str | None = None
    code: str | int | None = None


class _Event(msgspec.Struct):
    choices: list[_Choice] = []
    usage: _UpstreamUsage | None = None
    error: _UpstreamError | None = None


class _ErrorBody(msgspec.Struct):
    error: _UpstreamError | str | None = None
    message: str | None = None  # some servers (llama-server, FastAPI) use a flat shape


class _Message(msgspec.Struct):
    content: str | None = None


class _WholeChoice(msgspec.Struct):
    index: int = 0
    text: str | None = None
    message: _Message | None = None
    finish_reason: str | None = None


class _Whole(msgspec.Struct):
    """A non-streaming answer, from servers that ignore `stream: true`."""

    choices: list[_WholeChoice] = []
    usage: _UpstreamUsage | None = None


_event_decoder = msgspec.json.Decoder(_Event)
_whole_decoder = msgspec.json.Decoder(_Whole)
_error_decoder = msgspec.json.Decoder(_ErrorBody)
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
            body["prompt"] = request.prompt or ""
            if request.echo:
                body["echo"] = True
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
                    async for chunk in self._whole(response, chat, min(total_deadline, start + cfg.first_token_timeout_s)):
                        yield chunk
                else:
                    async for chunk in self._stream(response, chat, start, total_deadline):
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
                piece = await self._bounded(anext(pieces), deadline, what)
            except StopAsyncIteration:
                break
            except TransportError as exc:
                log.warning("upstream %s: stream broken: %s", self.name, exc)
                raise BackendUnavailable("The model backend closed the connection mid-response.") from None
            *lines, buf = (buf + piece).split(b"\n")
            for line in lines:
                if not line.startswith(b"data:"):
                    continue  # blank separators, comments (keep-alives), `event:` lines
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                try:
                    event = _event_decoder.decode(data)
                except msgspec.DecodeError:
                    raise BackendError("The model backend sent a malformed stream.") from None
                if event.error is not None:
                    raise self._stream_error(event.error)
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
                        last = time.monotonic()
                        yield Chunk(text=text)
        if finish is None:
            raise BackendUnavailable("The model backend ended the response early.")
        if usage is None:
            if not self._warned_no_usage:
                log.warning("upstream %s sends no usage despite stream_options.include_usage; counting chunks", self.name)
                self._warned_no_usage = True
            usage = Usage(prompt_tokens=0, completion_tokens=num_text_chunks)
        if done:
            await self._drain(pieces, total_deadline)
        yield Chunk(finish_reason=finish, usage=usage)  # type: ignore[arg-type]

    async def _whole(self, response: Response, chat: bool, deadline: float) -> AsyncIterator[Chunk]:
        """A server that answered with one JSON body: one text chunk, then the final chunk."""
        try:
            body = await self._bounded(response.aread(), deadline, "first token")
            whole = _whole_decoder.decode(body)
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

    async def _drain(self, pieces: AsyncIterator[bytes], deadline: float) -> None:
        """Read the (empty) rest after [DONE] so the connection goes back to the pool."""
        try:
            async with asyncio.timeout(max(0.0, min(deadline - time.monotonic(), 0.1))):
                async for _ in pieces:
                    pass
        except (TimeoutError, TransportError):
            pass  # the connection is closed instead of reused; nothing is lost

    # ------------------------------------------------------------------ errors
    def _status_error(self, status: int, body: bytes, retry_after: str | None) -> BackendError:
        message, code = _error_message(body)
        log.warning("upstream %s answered HTTP %d: %s", self.name, status, message)
        retry_after_s = _parse_retry_after(retry_after)
        if status == 429 or (status == 503 and retry_after_s is not None):
            return BackendOverloaded("The model backend is overloaded; try again later.", retry_after_s=retry_after_s or 1.0)
        if status >= 500 or status in _RETRIABLE_4XX:
            return BackendUnavailable(f"The model backend failed (upstream HTTP {status}).", code="upstream_error")
        if code == "context_length_exceeded" or "context length" in message.lower() or "maximum context" in message.lower():
            return ContextLengthExceeded(message)
        err = BackendRequestError(message, code=str(code) if code is not None else None)
        if status not in _REQUEST_CAUSED:
            err.code = err.code or f"upstream_{status}"
        return err

    def _stream_error(self, error: _UpstreamError) -> BackendError:
        log.warning("upstream %s sent an error event: %s", self.name, error.message)
        if error.type == "invalid_request_error" or error.code in (400, "400"):
            return BackendRequestError(error.message)
        return BackendUnavailable("The model backend failed mid-response.", code="upstream_error")


def _error_message(body: bytes) -> tuple[str, str | int | None]:
    """Upstream's error message and code from an OpenAI-shaped (or flat) error body."""
    try:
        parsed = _error_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        text = body.decode("utf-8", "replace").strip()
        return (text[:300] or "upstream error", None)
    if isinstance(parsed.error, _UpstreamError):
        return (parsed.error.message[:500], parsed.error.code)
    return ((parsed.error or parsed.message or "upstream error")[:500], None)


def _parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
