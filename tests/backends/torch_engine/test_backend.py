"""TorchBackend over a tiny model saved as a Hugging Face directory (the real loading path)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from backends.base import (
    BackendOverloaded,
    BackendUnavailable,
    ContextLengthExceeded,
    GenerationRequest,
    Message,
    SamplingParams,
)
from backends.torch_engine.backend import TorchBackend
from gateway.settings import TorchBackendConfig


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model: Any, tokenizer: Any) -> Path:
    path = tmp_path_factory.mktemp("tiny-gemma3")
    tiny_model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


async def started(tiny_dir: Path, **overrides: Any) -> TorchBackend:
    settings = {"model": str(tiny_dir), "max_num_seqs": 4, "num_kv_blocks": 64, "block_size": 4, **overrides}
    backend = TorchBackend("tiny", TorchBackendConfig(**settings))
    await backend.start()
    return backend


def request(prompt: str = "w1 w2 w3 w4", max_tokens: int = 8, **sampling: Any) -> GenerationRequest:
    return GenerationRequest(
        request_id="r", model="tiny", prompt=prompt, max_tokens=max_tokens,
        sampling=SamplingParams(temperature=0.0, **sampling),
    )


async def wait_for(predicate: Any, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_stream_reports_usage_queue_time_and_info(tiny_dir: Path) -> None:
    backend = await started(tiny_dir)
    seen: list[Any] = []
    backend.add_request_listener(seen.append)  # what a metrics endpoint hooks into
    try:
        chunks = [c async for c in backend.generate(request(max_tokens=8))]
        last = chunks[-1]
        assert last.finish_reason == "length"
        assert last.usage is not None and last.usage.prompt_tokens == 5 and last.usage.completion_tokens == 8
        assert all(c.queue_ms is not None and c.queue_ms >= 0 for c in chunks)
        assert all(c.finish_reason is None for c in chunks[:-1])
        info = backend.info()
        assert info.ready and info.type == "torch" and info.context_length == 256  # the KV pool, 64 blocks x 4
        stats = backend.stats()
        assert stats["num_requests_finished_total"] == 1 and stats["time_to_first_token_seconds_count"] == 1
        assert stats["in_flight"] == 0 and stats["kv_cache_usage_perc"] == 0
        (metrics,) = seen
        assert metrics.num_output_tokens == 8 and metrics.finish_reason == "length"
        assert 0 <= metrics.queue_s <= metrics.ttft_s <= metrics.e2e_s and metrics.tpot_s is not None
    finally:
        await backend.close()


async def test_chat_uses_gemma_template_when_tokenizer_has_none(tiny_dir: Path) -> None:
    backend = await started(tiny_dir)
    try:
        req = GenerationRequest(request_id="c", model="tiny", messages=[Message(role="user", content="w1 w2")], max_tokens=4)
        chunks = [c async for c in backend.generate(req)]
        assert chunks[-1].finish_reason in ("stop", "length")
        # <bos><start_of_turn>user\nw1 w2<end_of_turn>\n<start_of_turn>model\n: unknown words map to <unk>
        assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens >= 6
        with pytest.raises(Exception, match="messages must not be empty"):
            await anext(backend.generate(GenerationRequest(request_id="e", model="tiny", messages=[])))
    finally:
        await backend.close()


async def test_disconnect_aborts_and_frees_the_cache(tiny_dir: Path) -> None:
    backend = await started(tiny_dir)
    try:
        stream = backend.generate(request(max_tokens=200))
        await anext(stream)
        assert backend.stats()["kv_cache_usage_perc"] > 0
        await stream.aclose()  # what the gateway does when the client goes away
        await wait_for(lambda: backend.stats()["kv_cache_usage_perc"] == 0)
        assert backend.stats()["num_requests_running"] == 0 and backend.stats()["in_flight"] == 0
    finally:
        await backend.close()


async def test_full_queue_is_overloaded_with_retry_after(tiny_dir: Path) -> None:
    backend = await started(tiny_dir, max_num_seqs=1, queue_size=1)
    try:
        running = backend.generate(request(max_tokens=200))
        await anext(running)
        waiting = backend.generate(request(max_tokens=4))
        pending = asyncio.ensure_future(anext(waiting))
        await wait_for(lambda: backend.stats()["num_requests_waiting"] == 1)
        with pytest.raises(BackendOverloaded) as err:
            await anext(backend.generate(request()))
        assert err.value.retry_after_s >= 1.0 and err.value.status_code == 503
        await running.aclose()
        assert (await pending).text is not None  # the waiting one gets its turn
        await waiting.aclose()
    finally:
        await backend.close()


async def test_context_length_is_checked_before_the_first_chunk(tiny_dir: Path) -> None:
    backend = await started(tiny_dir, max_model_len=32)
    try:
        with pytest.raises(ContextLengthExceeded, match="maximum context length is 32"):
            await anext(backend.generate(request(max_tokens=30)))
        assert backend.stats()["in_flight"] == 0
    finally:
        await backend.close()


async def test_close_fails_in_flight_requests_as_retriable(tiny_dir: Path) -> None:
    backend = await started(tiny_dir)
    stream = backend.generate(request(max_tokens=200))
    await anext(stream)
    await backend.close()
    with pytest.raises(BackendUnavailable, match="shutting down"):
        async for _ in stream:
            pass
