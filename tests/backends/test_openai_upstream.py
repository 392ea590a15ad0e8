"""OpenAIUpstreamBackend against a real HTTP upstream on 127.0.0.1 (tests/upstream_server.py)."""

from __future__ import annotations

import asyncio
import gc
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from backends.base import (
    Backend,
    BackendError,
    BackendOverloaded,
    BackendRequestError,
    BackendTimeout,
    BackendUnavailable,
    Chunk,
    ContextLengthExceeded,
    GenerationRequest,
    Message,
    SamplingParams,
)
from backends.openai_upstream import OpenAIUpstreamBackend
from backends.registry import backend_class
from gateway.generation import Choice
from gateway.settings import OpenAIBackendConfig
from tests.upstream_server import UpstreamServer


@pytest.fixture(scope="module")
def upstream() -> Iterator[UpstreamServer]:
    with UpstreamServer("up1") as server:
        yield server


def make_backend(url: str, model: str = "tiny", **kw: object) -> OpenAIUpstreamBackend:
    return OpenAIUpstreamBackend("remote", OpenAIBackendConfig(base_url=url, model=model, **kw))  # type: ignore[arg-type]


@pytest.fixture
async def started(upstream: UpstreamServer) -> AsyncIterator[OpenAIUpstreamBackend]:
    backend = make_backend(upstream.url)
    await backend.start()
    yield backend
    await backend.close()


def chat(text: str = "hi", **kw: object) -> GenerationRequest:
    return GenerationRequest(request_id="r1", model="public", messages=[Message(role="user", content=text)], **kw)  # type: ignore[arg-type]


async def collect(backend: OpenAIUpstreamBackend, request: GenerationRequest) -> list[Chunk]:
    return [c async for c in backend.generate(request)]


async def test_registry_and_protocol(upstream: UpstreamServer) -> None:
    assert backend_class("openai") is OpenAIUpstreamBackend
    assert isinstance(make_backend(upstream.url), Backend)


async def test_chat_streams_and_forwards_params(upstream: UpstreamServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UPSTREAM_KEY", "sk-test-123")
    backend = make_backend(upstream.url, model="tiny?tokens=4", api_key_env="UPSTREAM_KEY")
    await backend.start()
    try:
        sampling = SamplingParams(temperature=0.2, top_p=0.9, top_k=5, seed=42, stop=("END",))
        chunks = await collect(backend, chat(max_tokens=10, sampling=sampling, raw={"user": "u1", "n": 3}))
    finally:
        await backend.close()
    assert "".join(c.text for c in chunks) == "up1 w1 w2 w3 "
    last = chunks[-1]
    assert last.finish_reason == "stop" and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (7, 4)
    body = upstream.app.last_body
    assert body is not None
    assert body["model"] == "tiny?tokens=4" and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["messages"] == [{"role": "user", "content": "hi"}]
    assert (body["temperature"], body["top_p"], body["top_k"], body["seed"], body["stop"], body["max_tokens"]) == (0.2, 0.9, 5, 42, ["END"], 10)
    assert body["user"] == "u1" and "n" not in body  # n is the gateway's job
    assert upstream.app.last_headers["authorization"] == "Bearer sk-test-123"
    assert upstream.app.last_headers["x-request-id"] == "r1"


async def test_completions_length_and_missing_usage(upstream: UpstreamServer) -> None:
    backend = make_backend(upstream.url, model="tiny?tokens=2&no_usage=1")
    await backend.start()
    try:
        req = GenerationRequest(request_id="r2", model="m", prompt="Once", max_tokens=2)
        chunks = await collect(backend, req)
    finally:
        await backend.close()
    assert upstream.app.last_body is not None and upstream.app.last_body["prompt"] == "Once"
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 2  # counted, not lost


@pytest.mark.parametrize(
    ("model", "error", "retriable"),
    [
        ("x?status=400", BackendRequestError, False),
        ("x?status=400&code=ctx", ContextLengthExceeded, False),
        ("x?status=422", BackendRequestError, False),
        ("x?status=429&retry_after=3", BackendOverloaded, True),
        ("x?status=500", BackendUnavailable, True),
        ("x?status=503", BackendUnavailable, True),
        ("x?status=401", BackendUnavailable, True),
    ],
)
async def test_upstream_status_mapping(upstream: UpstreamServer, model: str, error: type, retriable: bool) -> None:
    backend = make_backend(upstream.url, model=model)
    await backend.start()
    try:
        with pytest.raises(error) as info:
            await collect(backend, chat())
    finally:
        await backend.close()
    assert info.value.retriable is retriable
    if error is BackendRequestError:
        assert "upstream says" in info.value.message  # upstream's own message reaches the client
    if error is BackendOverloaded:
        assert info.value.retry_after_s == 3.0
    assert "127.0.0.1" not in info.value.message


async def test_connection_refused_is_unavailable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: nothing listens there
    backend = make_backend(f"http://127.0.0.1:{port}/v1")
    await backend.start()
    try:
        with pytest.raises(BackendUnavailable):
            await collect(backend, chat())
    finally:
        await backend.close()


@pytest.mark.parametrize("usage", ["", "&no_usage=1"])
async def test_events_that_arrive_together_are_one_chunk(upstream: UpstreamServer, usage: str) -> None:
    backend = make_backend(upstream.url, model="tiny?tokens=4&burst=1" + usage)
    await backend.start()
    try:
        chunks = await collect(backend, chat(max_tokens=10))
    finally:
        await backend.close()
    assert [(c.text, c.num_tokens) for c in chunks[:-1]] == [("up1 w1 w2 w3 ", 4)]
    last = chunks[-1]
    assert last.finish_reason == "stop" and last.usage is not None and last.usage.completion_tokens == 4  # events, not chunks


async def test_text_before_an_error_in_the_same_read_is_not_lost(upstream: UpstreamServer) -> None:
    backend = make_backend(upstream.url, model="tiny?tokens=4&burst=1&error_after=2")
    await backend.start()
    got: list[Chunk] = []
    try:
        with pytest.raises(BackendError, match="failed mid-response"):
            async for chunk in backend.generate(chat()):
                got.append(chunk)
    finally:
        await backend.close()
    assert [(c.text, c.num_tokens) for c in got] == [("up1 w1 ", 2)]
    choice = Choice(0)
    choice.take(got[0])
    assert choice.num_tokens == 2  # what a cut-off choice is charged: tokens, not chunks


@pytest.mark.parametrize(
    ("model", "timeouts", "num_text_before"),
    [
        ("x?first_delay=3", {"first_token_timeout_s": 0.3}, 0),
        ("x?tokens=5&delay=3", {"idle_timeout_s": 0.3}, 1),
        ("x?tokens=50&delay=0.1", {"total_timeout_s": 0.5}, None),
    ],
)
async def test_timeouts(upstream: UpstreamServer, model: str, timeouts: dict, num_text_before: int | None) -> None:
    backend = make_backend(upstream.url, model=model, **timeouts)
    await backend.start()
    got: list[Chunk] = []
    t0 = time.monotonic()
    try:
        with pytest.raises(BackendTimeout):
            async for chunk in backend.generate(chat()):
                got.append(chunk)
    finally:
        await backend.close()
    assert time.monotonic() - t0 < 2.0
    if num_text_before is not None:
        assert len(got) == num_text_before
    else:
        assert 0 < len(got) < 50


async def test_connection_cut_mid_stream(upstream: UpstreamServer) -> None:
    backend = make_backend(upstream.url, model="x?tokens=5&cut=2")
    await backend.start()
    got: list[Chunk] = []
    try:
        with pytest.raises(BackendError):
            async for chunk in backend.generate(chat()):
                got.append(chunk)
    finally:
        await backend.close()
    assert "".join(c.text for c in got) == "up1 w1 "  # one chunk, or two: as the reads fell


async def test_missing_api_key_env_fails_start(upstream: UpstreamServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIBOX_TEST_NO_SUCH_KEY", raising=False)
    backend = make_backend(upstream.url, api_key_env="AIBOX_TEST_NO_SUCH_KEY")
    with pytest.raises(BackendError, match="AIBOX_TEST_NO_SUCH_KEY"):
        await backend.start()


async def test_concurrent_streams_share_the_pool(upstream: UpstreamServer) -> None:
    backend = make_backend(upstream.url, model="tiny?tokens=8&delay=0.01", max_connections=16)
    await backend.start()
    try:
        results = await asyncio.gather(*(collect(backend, chat()) for _ in range(48)))
    finally:
        await backend.close()
    assert all(r[-1].usage is not None and r[-1].usage.completion_tokens == 8 for r in results)
    assert backend.stats()["in_flight"] == 0 and backend.stats()["num_failures_total"] == 0


async def test_early_close_releases_the_request(started: OpenAIUpstreamBackend, upstream: UpstreamServer) -> None:
    gen = started.generate(chat())
    first = await anext(gen)  # type: ignore[call-overload]
    assert first.text.startswith("up1 ")
    await gen.aclose()  # the client went away
    assert started.stats()["in_flight"] == 0


@pytest.mark.parametrize("model", ["tiny", "tiny?json=1"])  # SSE, and one JSON body
async def test_closing_after_the_finish_chunk_leaves_nothing_to_the_gc(started: OpenAIUpstreamBackend, model: str) -> None:
    """The gateway stops at the finish chunk and closes the stream: no inner generator may be left
    to the event loop's async-generator finalizer (a task and a loop wake-up per request)."""
    finalized: list[str] = []
    hooks = sys.get_asyncgen_hooks()

    def finalizer(agen: Any) -> None:
        finalized.append(agen.__qualname__)
        hooks.finalizer(agen)  # type: ignore[misc]

    sys.set_asyncgen_hooks(firstiter=hooks.firstiter, finalizer=finalizer)
    try:
        started.config.model = model
        gen = started.generate(chat(max_tokens=3))
        while (await anext(gen)).finish_reason is None:  # type: ignore[call-overload]
            pass
        await gen.aclose()
        del gen
        gc.collect()
    finally:
        sys.set_asyncgen_hooks(*hooks)
    assert finalized == []


async def test_connections_are_kept_alive_and_reused(upstream: UpstreamServer) -> None:
    backend = make_backend(upstream.url, model="tiny?tokens=2")
    await backend.start()
    try:
        for _ in range(5):
            assert (await collect(backend, chat()))[-1].finish_reason == "stop"
        pool = backend._pool
        assert pool is not None and len(pool._idle) == 1  # five requests, one connection
    finally:
        await backend.close()


async def test_full_pool_is_overloaded_not_hung(upstream: UpstreamServer) -> None:
    backend = make_backend(upstream.url, model="tiny?tokens=3&delay=0.5", max_connections=1, connect_timeout_s=0.2)
    await backend.start()
    try:
        holder = backend.generate(chat())
        assert (await anext(holder)).text == "up1 "  # type: ignore[call-overload]
        with pytest.raises(BackendOverloaded):
            await collect(backend, chat())
        await holder.aclose()  # type: ignore[attr-defined]
        assert (await collect(backend, chat()))[-1].finish_reason == "stop"  # the slot came back
    finally:
        await backend.close()


async def test_upstream_restart_on_same_port_needs_no_client_retry() -> None:
    with UpstreamServer("old") as first:
        port = first.port
        backend = make_backend(first.url, model="tiny?tokens=2")
        await backend.start()
        assert (await collect(backend, chat()))[0].text.startswith("old ")
    try:
        # The pooled keep-alive connection now points at a dead server; it must not be used.
        with UpstreamServer("new", port=port):
            assert (await collect(backend, chat()))[0].text.startswith("new ")
    finally:
        await backend.close()


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
async def test_upstream_that_ignores_stream_still_works(upstream: UpstreamServer, endpoint: str) -> None:
    backend = make_backend(upstream.url, model="tiny?json=1&tokens=3")
    await backend.start()
    req = chat() if endpoint == "chat" else GenerationRequest(request_id="r", model="m", prompt="p")
    try:
        chunks = await collect(backend, req)
    finally:
        await backend.close()
    assert "".join(c.text for c in chunks) == "up1 w1 w2 "
    assert chunks[-1].finish_reason == "stop" and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3


async def test_ready_says_when_a_read_will_not_wait(upstream: UpstreamServer) -> None:
    """What lets the backend skip arming a timer for reads of bytes that are already in."""
    from backends.upstream_http import ConnectionPool

    pool = ConnectionPool(upstream.url, max_connections=2, connect_timeout_s=5)
    body = b'{"model": "tiny?tokens=3&first_delay=0.3", "messages": [{"role": "user", "content": "hi"}], "stream": true}'
    try:
        response = await pool.request("POST", "chat/completions", body, {"content-type": "application/json"})
        assert not response.ready()  # headers only: the first token is 0.3 s away
        pieces = response.aiter_bytes()
        await anext(pieces)  # type: ignore[call-overload]
        while not response.ready():  # the rest follows in a moment
            await asyncio.sleep(0.01)
        rest = [p async for p in pieces]
        assert b"[DONE]" in b"".join(rest) and response.ready()  # ended: a read returns at once
        await response.aclose()
        assert not response.ready()  # closed: nothing to read
    finally:
        await pool.aclose()


async def test_events_in_separate_http_chunks_of_one_read_are_one_chunk() -> None:
    """vLLM and llama-server send one HTTP chunk per event; a busy one's chunks arrive together."""

    def event(text: str, finish: str | None = None) -> bytes:
        data = b'data: {"choices": [{"index": 0, "delta": {"content": "%s"}, "finish_reason": %s}]}\n\n' % (
            text.encode(), b"null" if finish is None else b'"' + finish.encode() + b'"')  # fmt: skip
        return b"%x\r\n%s\r\n" % (len(data), data)

    usage = b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 3}}\n\n'
    body = event("a ") + event("b ") + event("c ", "stop") + b"%x\r\n%s\r\n" % (len(usage), usage) + b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n"
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"

    handled = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(head + body)  # every chunk in one write
            await writer.drain()
            await reader.read()  # until the client closes
        finally:
            writer.close()
            await writer.wait_closed()
            handled.set()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    backend = make_backend(f"http://127.0.0.1:{port}/v1")
    await backend.start()
    try:
        chunks = await collect(backend, chat())
    finally:
        await backend.close()
        await asyncio.wait_for(handled.wait(), 5)
        server.close()
        await server.wait_closed()
    assert [(c.text, c.num_tokens) for c in chunks[:-1]] == [("a b c ", 3)]
    assert chunks[-1].finish_reason == "stop" and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
