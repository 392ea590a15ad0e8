"""Issue acceptance: the official OpenAI SDK against the real llama.cpp backend serving the
bundled Gemma 3 270M, over real HTTP. One slot (`parallel = 1`), so the disconnect test proves
that an abandoned stream frees the model for the next request."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.live import serve, settings_from

pytestmark = pytest.mark.slow

PROMPT = [{"role": "user", "content": "Name three colours of the rainbow."}]


@pytest.fixture(scope="module")
def server():
    doc = {
        "auth": {"enabled": False},
        "ratelimit": {"enabled": False},
        "audit": {"enabled": False},
        "backends": {"gemma": {"type": "llamacpp", "model": "bundled:gemma3-270m", "n_ctx": 1024, "parallel": 1, "queue_size": 8}},
        "models": [{"name": "gemma-3-270m", "aliases": ["gemma"], "deployments": [{"backend": "gemma"}]}],
    }
    with serve(settings_from(doc)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def test_models(client):
    data = client.models.list().data
    assert [m.id for m in data] == ["gemma-3-270m"]


def test_chat_stream_equals_non_stream_at_temperature_0(client):
    full = client.chat.completions.create(model="gemma", messages=PROMPT, max_tokens=24, temperature=0)
    text = full.choices[0].message.content
    assert text and full.usage.completion_tokens > 0 and full.usage.prompt_tokens > 5
    chunks = list(
        client.chat.completions.create(
            model="gemma", messages=PROMPT, max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_completions_max_tokens_and_length(client):
    r = client.completions.create(model="gemma-3-270m", prompt="The capital of France is", max_tokens=5, temperature=0)
    assert r.usage.completion_tokens == 5
    assert r.choices[0].finish_reason == "length"
    streamed = list(client.completions.create(model="gemma-3-270m", prompt="The capital of France is", max_tokens=5, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text


def test_stop_is_honoured_and_not_returned(client):
    base = client.completions.create(model="gemma", prompt="1, 2, 3, 4,", max_tokens=12, temperature=0).choices[0].text
    assert len(base.strip()) > 2
    stop = base.strip()[1:3]  # something the model will certainly produce
    r = client.completions.create(model="gemma", prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[stop])
    assert stop not in r.choices[0].text
    assert r.choices[0].finish_reason == "stop"
    assert base.startswith(r.choices[0].text)


def test_n_and_seed(client):
    r = client.chat.completions.create(model="gemma", messages=PROMPT, max_tokens=8, n=2, temperature=0.9, seed=7)
    assert len(r.choices) == 2
    again = client.chat.completions.create(model="gemma", messages=PROMPT, max_tokens=8, n=2, temperature=0.9, seed=7)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]


def test_errors_map_to_sdk_classes(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=PROMPT)
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="gemma", messages=PROMPT, max_tokens=5000)
    assert exc.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="gemma", messages=[{"role": "user", "content": "word " * 1200}], max_tokens=5)
    assert exc.value.code == "context_length_exceeded"


def test_disconnect_mid_stream_frees_the_backend(server, client):
    body = {"model": "gemma", "messages": PROMPT, "max_tokens": 900, "temperature": 0.8, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        for n, _line in enumerate(r.iter_lines()):
            if n >= 6:
                break  # a few tokens in: hang up with ~890 tokens still to go
    # The slot is released at once (decoding the rest would take ~9 s here).
    deadline = time.monotonic() + 1.5
    while (detail := httpx.get(server.url + "/ready").json()["backends"]["gemma"]).get("in_flight", 0) != 0:
        assert time.monotonic() < deadline, f"the abandoned stream still holds the backend: {detail}"
        time.sleep(0.02)
    t0 = time.perf_counter()
    stream = client.chat.completions.create(model="gemma", messages=PROMPT, max_tokens=4, stream=True)
    first = next(iter(stream))
    ttft = time.perf_counter() - t0
    list(stream)
    assert first.choices[0].delta.role == "assistant"
    assert ttft < 3.0, f"next request waited {ttft:.2f}s"


def test_echo_prepends_the_prompt_once(client):
    prompt = "Roses are red,"
    r = client.completions.create(model="gemma", prompt=prompt, max_tokens=4, temperature=0, echo=True)
    plain = client.completions.create(model="gemma", prompt=prompt, max_tokens=4, temperature=0)
    assert r.choices[0].text == prompt + plain.choices[0].text
