"""Faults over real HTTP with the scripted fake backend: a backend failing mid-stream, a backend
hanging (request and idle deadlines), and clients that disconnect (backend aborted, rate-limit
slot released)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import msgspec
import pytest

from gateway.corked import CorkedHttpToolsProtocol
from tests.live import LiveServer, serve, settings_from
from tests.ops.helpers import chat, config, is_openai_error, sse_events

DEADLINES = {"request_timeout_s": 1.0, "idle_timeout_s": 0.4, "keepalive_s": 0.2}


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with serve(settings_from(config(server=DEADLINES))) as live:
        yield live


def backend_in_flight(live: LiveServer) -> float:
    detail = msgspec.json.decode(httpx.get(live.url + "/ready").content)
    return detail["backends"]["f"]["in_flight"]


def wait_in_flight_zero(live: LiveServer, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while backend_in_flight(live) != 0:
        assert time.monotonic() < deadline, "the backend kept working after the request ended"
        time.sleep(0.02)


def test_failure_mid_stream_sends_error_event_then_done(server: LiveServer) -> None:
    r = httpx.post(server.url + "/v1/chat/completions", json=chat("[[fail-after:3]]", max_tokens=10, stream=True))
    assert r.status_code == 200  # headers were committed with the first token
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    assert is_openai_error(events[-2]) and events[-2]["error"]["type"] == "server_error"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-2])
    assert len(text.split()) == 3  # what was produced before the failure reached the client
    assert "Traceback" not in r.text
    wait_in_flight_zero(server)


def test_failure_mid_generation_without_stream_is_a_500_in_openai_shape(server: LiveServer) -> None:
    r = httpx.post(server.url + "/v1/completions", json={"model": "m", "prompt": "[[fail-after:2]]", "max_tokens": 10})
    assert r.status_code == 500
    assert is_openai_error(r.json())


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_hanging_backend_hits_the_request_deadline(server: LiveServer, stream: bool) -> None:
    t0 = time.monotonic()
    r = httpx.post(server.url + "/v1/chat/completions", json=chat("[[hang]]", stream=stream), timeout=10)
    elapsed = time.monotonic() - t0
    assert 0.9 <= elapsed < 3.0
    if stream:  # headers were committed after keepalive_s; the deadline ends the stream
        assert r.status_code == 200 and ": keep-alive" in r.text
        events = sse_events(r.text)
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "timeout"
    else:
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"
    wait_in_flight_zero(server)


@pytest.mark.slow
def test_backend_silent_between_chunks_hits_the_idle_deadline() -> None:
    """One token a second: the first arrives within the request deadline, the gap to the
    second exceeds idle_timeout_s."""
    doc = config(server={"request_timeout_s": 10.0, "idle_timeout_s": 0.4, "keepalive_s": 5.0}, fake={"tokens_per_s": 1.0})
    with serve(settings_from(doc)) as live:
        t0 = time.monotonic()
        r = httpx.post(live.url + "/v1/chat/completions", json=chat(max_tokens=5, stream=True), timeout=10)
        assert time.monotonic() - t0 < 3.0
        events = sse_events(r.text)
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "timeout"
        wait_in_flight_zero(live)


@pytest.fixture(scope="module", params=["corked", "httptools"])
def limited(request: pytest.FixtureRequest) -> Iterator[LiveServer]:
    """50 tokens/s and one concurrent request per principal: a slot leak shows up as a 429. Under
    `aibox serve`'s protocol (the client leaving fires the scope's hub) and uvicorn's own (the
    pipeline's fallback: a task waiting in receive() for http.disconnect)."""
    ratelimit = {"store": "memory", "tiers": {"default": {"principal": {"max_concurrent": 1}}}}
    http = CorkedHttpToolsProtocol if request.param == "corked" else request.param
    with serve(settings_from(config(ratelimit=ratelimit, fake={"tokens_per_s": 50.0})), http=http) as live:
        yield live


def test_stream_disconnect_aborts_backend_and_releases_the_slot(limited: LiveServer) -> None:
    with httpx.Client(base_url=limited.url) as client:
        with client.stream("POST", "/v1/chat/completions", json=chat(max_tokens=500, stream=True)) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            seen = [line for _, line in zip(range(4), lines, strict=False)]
            assert any(line.startswith("data: ") for line in seen)
            # While the stream is open the one slot is taken.
            busy = client.post("/v1/chat/completions", json=chat(max_tokens=1))
            assert busy.status_code == 429
        wait_in_flight_zero(limited)
        assert client.post("/v1/chat/completions", json=chat(max_tokens=1)).status_code == 200


def test_json_disconnect_aborts_backend_and_releases_the_slot(limited: LiveServer) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(limited.url + "/v1/chat/completions", json=chat(max_tokens=500), timeout=0.3)
    wait_in_flight_zero(limited)
    r = httpx.post(limited.url + "/v1/chat/completions", json=chat(max_tokens=1))
    assert r.status_code == 200
    text = httpx.get(limited.url + "/metrics").text
    assert 'aibox_requests_total{endpoint="chat.completions",model="m",status="499"}' in text
