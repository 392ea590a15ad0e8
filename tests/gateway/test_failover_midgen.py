"""A deployment dying mid-generation: a non-streaming client never saw a byte, so the request is
retried on the next deployment; a streaming client already has output, so it gets an error event."""

from __future__ import annotations

import httpx
import msgspec
import openai
import pytest

from tests.live import serve, settings_from


@pytest.fixture(scope="module")
def server():
    doc = {
        "auth": {"enabled": False},
        "ratelimit": {"enabled": False},
        "audit": {"enabled": False},
        "backends": {
            "flaky": {"type": "fake", "script": "one two three four five six", "fail_after_tokens": 2},
            "steady": {"type": "fake", "script": "uno dos tres cuatro cinco seis"},
        },
        "models": [
            {
                "name": "m",
                "strategy": "priority",
                "allowed_fails": 100,
                "deployments": [{"backend": "flaky", "priority": 0}, {"backend": "steady", "priority": 1}],
            }
        ],
    }
    with serve(settings_from(doc)) as s:
        yield s


def test_non_stream_is_retried_on_the_next_deployment(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as client:
        r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert r.choices[0].message.content == "uno dos tres cuatro"
    assert r.usage.completion_tokens == 4


def test_stream_that_already_sent_output_ends_with_an_error_event(server):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = msgspec.json.decode(events[-2])["error"]
    assert error["code"] == "backend_unavailable"
    texts = [msgspec.json.decode(e)["choices"][0]["delta"].get("content") for e in events[1:-2]]
    assert "".join(t for t in texts if t) == "one two"
