"""The llama.cpp backend on the real bundled Gemma 3 270M: streaming, stops, limits, aborts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from backends.base import (
    Backend,
    BackendOverloaded,
    BackendUnavailable,
    Chunk,
    ContextLengthExceeded,
    GenerationRequest,
    Message,
    SamplingParams,
)
from backends.llamacpp import LlamaCppBackend
from gateway.settings import LlamaCppBackendConfig

GREEDY = SamplingParams(temperature=0)
N_CTX = 256


def make_backend(**overrides: object) -> LlamaCppBackend:
    fields: dict[str, object] = {"n_ctx": N_CTX, "n_threads": 1, "parallel": 4, "queue_size": 4} | overrides
    config = LlamaCppBackendConfig(**fields)  # type: ignore[arg-type]
    backend = LlamaCppBackend("gemma", config)
    asyncio.run(backend.start())  # the engine thread outlives this loop; each test uses its own
    return backend


@pytest.fixture(scope="module")
def backend() -> Iterator[LlamaCppBackend]:
    backend = make_backend()
    yield backend
    asyncio.run(backend.close())


def request(prompt: str | None = "The capital of France is", **kw: object) -> GenerationRequest:
    kw.setdefault("sampling", GREEDY)
    kw.setdefault("max_tokens", 16)
    return GenerationRequest(request_id="t", model="gemma", prompt=prompt, **kw)  # type: ignore[arg-type]


async def collect(stream: AsyncIterator[Chunk]) -> list[Chunk]:
    return [chunk async for chunk in stream]


async def wait_for_stats(backend: LlamaCppBackend, **expected: float) -> dict[str, float]:
    deadline = time.monotonic() + 5.0
    while True:
        stats = backend.stats()
        if all(stats[k] == v for k, v in expected.items()) or time.monotonic() > deadline:
            return stats
        await asyncio.sleep(0.01)


def test_is_a_backend_and_reports_its_model(backend: LlamaCppBackend) -> None:
    assert isinstance(backend, Backend)
    info = backend.info()
    assert (info.ready, info.type, info.model_id, info.context_length) == (True, "llamacpp", "gemma3-270m", N_CTX)
    assert info.detail["chat_template"] == "builtin-gemma"  # the bundled base model ships none


async def test_max_tokens_ends_with_length_and_counts_tokens(backend: LlamaCppBackend) -> None:
    chunks = await collect(backend.generate(request(max_tokens=5)))
    final = chunks[-1]
    assert final.finish_reason == "length" and all(c.finish_reason is None for c in chunks[:-1])
    assert final.usage is not None and final.usage.completion_tokens == 5
    assert final.usage.prompt_tokens == 6  # <bos> + 5 tokens of the prompt
    assert final.queue_ms is not None and final.queue_ms >= 0
    assert "".join(c.text for c in chunks).strip()


async def test_stop_string_is_never_returned_and_cuts_exactly(backend: LlamaCppBackend) -> None:
    full = "".join(c.text for c in await collect(backend.generate(request(max_tokens=24))))
    words = full.split()
    stop = words[len(words) // 2]  # a word from the middle of the greedy output
    chunks = await collect(backend.generate(request(max_tokens=24, sampling=SamplingParams(temperature=0, stop=(stop,)))))
    text = "".join(c.text for c in chunks)
    assert text == full[: full.index(stop)]
    assert chunks[-1].finish_reason == "stop"
    assert all(stop not in c.text for c in chunks)


async def test_seeded_sampling_is_reproducible(backend: LlamaCppBackend) -> None:
    def seeded(seed: int) -> GenerationRequest:
        return request("Once upon a time", max_tokens=16, sampling=SamplingParams(temperature=1.0, top_p=0.95, top_k=40, seed=seed))

    first, again, other = [
        "".join(c.text for c in await collect(backend.generate(seeded(s)))) for s in (7, 7, 8)
    ]
    assert first == again
    assert first != other


async def test_chat_renders_gemma_turns_and_never_returns_the_turn_marker(backend: LlamaCppBackend) -> None:
    messages = [Message(role="system", content="Answer briefly."), Message(role="user", content="What is 2+2?")]
    chunks = await collect(backend.generate(GenerationRequest(request_id="c", model="gemma", messages=messages, max_tokens=48, sampling=GREEDY)))
    text = "".join(c.text for c in chunks)
    assert "<end_of_turn>" not in text and "<start_of_turn>" not in text
    assert chunks[-1].finish_reason in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens > 10


@pytest.mark.parametrize(("prompt_words", "max_tokens"), [(400, 1), (100, N_CTX), (400, None)])
async def test_context_overflow_raises_before_the_first_chunk(backend: LlamaCppBackend, prompt_words: int, max_tokens: int | None) -> None:
    stream = backend.generate(request("hello " * prompt_words, max_tokens=max_tokens))
    with pytest.raises(ContextLengthExceeded, match=f"maximum context length is {N_CTX} tokens") as exc:
        await anext(stream)
    assert "-" not in exc.value.message.split("However")[1]  # no negative token counts


async def test_default_max_tokens_runs_to_the_end_of_the_context(backend: LlamaCppBackend) -> None:
    # 250 of 256 positions taken by the prompt: the rest is the default budget.
    chunks = await collect(backend.generate(request("hello " * 249, max_tokens=None)))
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens + usage.completion_tokens <= N_CTX
    assert chunks[-1].finish_reason == "length" or usage.completion_tokens < N_CTX - usage.prompt_tokens


@pytest.mark.slow
async def test_disconnect_frees_the_slot_for_the_next_request_at_once() -> None:
    backend = await asyncio.to_thread(make_backend, parallel=1, queue_size=1)
    try:
        long_stream = backend.generate(request("Once upon a time", max_tokens=200))
        await anext(long_stream)  # running in the only slot
        waiting_stream = backend.generate(request(max_tokens=4))
        waiting_first = asyncio.ensure_future(anext(waiting_stream))
        stats = await wait_for_stats(backend, num_requests_waiting=1)
        assert (stats["num_requests_running"], stats["num_requests_waiting"], stats["slots"]) == (1, 1, 1)
        assert stats["kv_cache_usage_perc"] > 0

        with pytest.raises(BackendOverloaded) as overloaded:  # slot and queue both full
            await anext(backend.generate(request(max_tokens=4)))
        assert overloaded.value.retry_after_s >= 1

        closed_at = time.monotonic()
        await long_stream.aclose()  # the client went away
        first = await asyncio.wait_for(waiting_first, 10)
        # 200 tokens would take seconds; the waiting request got the slot within a step or two.
        assert time.monotonic() - closed_at < 1.5
        assert first.queue_ms is not None and first.queue_ms > 0
        await collect(waiting_stream)
        stats = await wait_for_stats(backend, in_flight=0)
        assert (stats["in_flight"], stats["kv_cache_usage_perc"]) == (0, 0)
    finally:
        await backend.close()


async def test_close_fails_in_flight_requests_and_reports_not_ready() -> None:
    backend = await asyncio.to_thread(make_backend, parallel=1, queue_size=1)
    stream = backend.generate(request("Once upon a time", max_tokens=200))
    await anext(stream)
    await backend.close()
    with pytest.raises(BackendUnavailable):
        async for _ in stream:
            pass
    assert backend.info().ready is False
    with pytest.raises(BackendUnavailable, match="not started"):
        await anext(backend.generate(request()))


async def test_multibyte_output_arrives_whole(backend: LlamaCppBackend) -> None:
    chunks = await collect(backend.generate(request("日本の首都は東京です。中国の首都は", max_tokens=12)))
    text = "".join(c.text for c in chunks)
    assert text and "\ufffd" not in text
    assert any(ord(ch) > 0x3000 for ch in text)  # CJK came through


async def test_frequency_and_presence_penalties_reduce_repetition(backend: LlamaCppBackend) -> None:
    def most_repeated(text: str) -> int:
        words = text.replace(",", " ").split()
        return max(words.count(w) for w in words)

    prompt = "List of fruits: apple, banana,"
    plain = "".join(c.text for c in await collect(backend.generate(request(prompt, max_tokens=40))))
    penalised = SamplingParams(temperature=0, frequency_penalty=1.5, presence_penalty=1.0)
    varied = "".join(c.text for c in await collect(backend.generate(request(prompt, max_tokens=40, sampling=penalised))))
    assert most_repeated(varied) < most_repeated(plain)
