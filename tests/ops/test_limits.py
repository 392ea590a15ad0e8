"""Configured caps (body size, messages, n, max_tokens) and SSE keep-alive during a long prefill,
over real HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.live import LiveServer, serve, settings_from
from tests.ops.helpers import chat, config, is_openai_error, sse_events

CAPS = {"max_body_bytes": 2048, "max_messages": 3, "max_n": 2, "max_tokens_cap": 50}


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with serve(settings_from(config(server=CAPS))) as live:
        yield live


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/v1/chat/completions", chat("x" * 4000), 413, None),
        ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}] * 4}, 400, "messages"),
        ("/v1/chat/completions", chat(n=3), 400, "n"),
        ("/v1/completions", {"model": "m", "prompt": "hi", "n": 3}, 400, "n"),
        ("/v1/chat/completions", chat(max_tokens=51), 400, "max_tokens"),
        ("/v1/chat/completions", chat(max_completion_tokens=51), 400, "max_completion_tokens"),
        ("/v1/completions", {"model": "m", "prompt": "hi", "max_tokens": 51}, 400, "max_tokens"),
    ],
    ids=["body", "messages", "chat-n", "completions-n", "max_tokens", "max_completion_tokens", "completions-max_tokens"],
)
def test_caps_are_enforced_with_openai_errors(server: LiveServer, path: str, body: dict[str, Any], status: int, param: str | None) -> None:
    r = httpx.post(server.url + path, json=body)
    assert r.status_code == status, r.text
    assert is_openai_error(r.json())
    assert r.json()["error"]["param"] == param


def test_values_at_the_caps_are_served(server: LiveServer) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}] * 3, "n": 2, "max_tokens": 50}
    r = httpx.post(server.url + "/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 2


def test_oversized_body_without_content_length_is_refused(server: LiveServer) -> None:
    """A chunked upload is cut off at the cap too (no Content-Length to check up front)."""

    def chunks() -> Iterator[bytes]:
        yield b'{"model": "m", "messages": [{"role": "user", "content": "'
        for _ in range(8):
            yield b"y" * 512
        yield b'"}]}'

    r = httpx.post(server.url + "/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert is_openai_error(r.json())


@pytest.mark.slow
def test_keepalive_comments_during_a_long_prefill() -> None:
    """The backend takes 0.7 s to its first token; with keepalive_s = 0.15 the client sees SSE
    comments before the first data event, and the stream still completes normally."""
    doc = config(server={"keepalive_s": 0.15}, fake={"first_token_delay_s": 0.7})
    with serve(settings_from(doc)) as live:
        with httpx.stream("POST", live.url + "/v1/chat/completions", json=chat(max_tokens=3, stream=True)) as r:
            assert r.status_code == 200
            raw = r.read().decode()
    first_data = raw.index("data: ")
    assert raw[:first_data].count(": keep-alive") >= 2
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] == "length"
