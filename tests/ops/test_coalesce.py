"""gateway.coalesce at the ASGI level: bursts become one write, waits flush at once, order and
bytes are preserved, a slow client applies backpressure, the head is held for the first events."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from gateway.coalesce import CoalescingSend

SSE_START = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}


def event(i: int) -> bytes:
    return b"data: {\"i\": %d}\n\n" % i


def streaming_app(start: dict[str, Any], gaps_s: list[float]) -> Any:
    """Sends len(gaps_s) events, sleeping gaps_s[i] before event i (0: no await at all)."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send(start)
        for i, gap in enumerate(gaps_s):
            if gap:
                await asyncio.sleep(gap)
            await send({"type": "http.response.body", "body": event(i), "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    return app


async def run(app: Any, send_delay_s: float = 0.0) -> list[tuple[float, dict[str, Any]]]:
    """(time, message) for every message the server would write."""
    sent: list[tuple[float, dict[str, Any]]] = []

    async def send(message: dict[str, Any]) -> None:
        if send_delay_s:
            await asyncio.sleep(send_delay_s)
        sent.append((time.monotonic(), message))

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    coalescing = CoalescingSend(send)
    try:
        await app({"type": "http", "path": "/v1/chat/completions"}, receive, coalescing)
    finally:
        await coalescing.aclose()
    return sent


def body_of(sent: list[tuple[float, dict[str, Any]]]) -> bytes:
    return b"".join(m.get("body", b"") for _, m in sent if m["type"] == "http.response.body")


async def test_a_burst_of_events_is_one_write_with_the_same_bytes() -> None:
    sent = await run(streaming_app(SSE_START, [0.0] * 10))
    bodies = [m for _, m in sent if m["type"] == "http.response.body"]
    assert len(bodies) == 1 and bodies[0]["more_body"] is False  # 10 events + [DONE] in the last message
    assert body_of(sent) == b"".join(event(i) for i in range(10)) + b"data: [DONE]\n\n"


async def test_an_event_before_a_wait_is_written_before_the_wait() -> None:
    t0 = time.monotonic()
    sent = await run(streaming_app(SSE_START, [0.0, 0.2, 0.0, 0.2]))
    writes = [(t - t0, m["body"]) for t, m in sent if m["type"] == "http.response.body"]
    assert writes[0][1] == event(0) and writes[0][0] < 0.1  # not held back while the producer waits
    assert writes[1][1] == event(1) + event(2) and 0.2 <= writes[1][0] < 0.3
    assert body_of(sent).endswith(event(3) + b"data: [DONE]\n\n")


async def test_a_slow_client_holds_the_producer_back() -> None:
    """A producer that never waits is still bounded: past 64 KiB buffered it writes and waits."""
    big = b"x" * 40_000

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send(SSE_START)
        for _ in range(12):
            await send({"type": "http.response.body", "body": big, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    t0 = time.monotonic()
    sent = await run(app, send_delay_s=0.05)
    writes = [m for _, m in sent if m["type"] == "http.response.body"]
    assert body_of(sent) == big * 12
    assert max(len(m["body"]) for m in writes) <= 2 * len(big)  # never more than 64 KiB + one event
    assert len(writes) >= 6 and time.monotonic() - t0 >= 0.3  # the producer waited on each slow write


async def test_the_head_goes_out_with_the_first_events_or_alone_when_none_are_ready() -> None:
    sent = await run(streaming_app(SSE_START, [0.0, 0.0]))
    assert [m["type"] for _, m in sent] == ["http.response.start", "http.response.body"]  # sent together, in order

    t0 = time.monotonic()
    sent = await run(streaming_app(SSE_START, [0.2, 0.0]))  # nothing to send for a while: the head is not held
    (t_start, start), (t_first, first), *_ = sent
    assert start["type"] == "http.response.start" and t_start - t0 < 0.1
    assert first["body"] == event(0) + event(1) + b"data: [DONE]\n\n" and t_first - t0 >= 0.2
