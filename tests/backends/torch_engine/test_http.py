"""The torch backend served by the real gateway, driven by the official OpenAI SDK."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.live import serve, settings_from

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, tiny_model: Any, tokenizer: Any):
    model_dir: Path = tmp_path_factory.mktemp("tiny-http")
    tiny_model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    doc = {
        "auth": {"enabled": False},
        "ratelimit": {"enabled": False},
        "audit": {"enabled": False},
        "backends": {"t": {"type": "torch", "model": str(model_dir), "max_num_seqs": 4, "num_kv_blocks": 64, "block_size": 4}},
        "models": [{"name": "tiny", "deployments": [{"backend": "t"}]}],
    }
    with serve(settings_from(doc)) as server:
        with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
            yield c


def test_completion_stream_equals_non_stream(client: openai.OpenAI) -> None:
    full = client.completions.create(model="tiny", prompt="w1 w2 w3", max_tokens=10, temperature=0)
    assert full.choices[0].finish_reason in ("length", "stop") and full.usage.prompt_tokens == 4
    streamed = list(client.completions.create(model="tiny", prompt="w1 w2 w3", max_tokens=10, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == full.choices[0].text


def test_chat_concurrent_requests_are_batched_and_deterministic(client: openai.OpenAI) -> None:
    def ask(seed: int) -> str:
        r = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "w3 w4"}], max_tokens=8, temperature=0.9, seed=seed
        )
        return r.choices[0].message.content or ""

    results: dict[int, str] = {}
    threads = [threading.Thread(target=lambda s=s: results.__setitem__(s, ask(s % 2))) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 6
    assert results[0] == results[2] == results[4] and results[1] == results[3] == results[5]
