"""ClientWatch and SSEResponse against scripted ASGI receive/send: the client leaving cancels the
work and the body's cleanup runs; finishing first, or someone else's cancel, behaves as usual;
metrics and the access line come once per request, after the last byte when it was sent."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.corked import CLIENT_KEY, ClientHub
from gateway.streaming import ClientWatch, JSONResponse, SSEResponse


class Client:
    """An ASGI receive that blocks until `leave()`, and a send that records messages. `scope`
    carries a ClientHub that `leave()` fires too when `hub` (gateway.corked's way of telling)."""

    def __init__(self, hub: bool = False) -> None:
        self.left = asyncio.Event()
        self.sent: list[dict[str, Any]] = []
        self.hub = ClientHub()
        self.scope: dict[str, Any] = {CLIENT_KEY: self.hub} if hub else {}

    async def receive(self) -> dict[str, Any]:
        await self.left.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    def leave(self) -> None:
        self.left.set()
        self.hub.fire()


@pytest.mark.parametrize("hub", [False, True], ids=["receive", "hub"])
async def test_client_leaving_cancels_the_block(hub: bool) -> None:
    client = Client(hub)
    reached_end = False
    async with ClientWatch(client.scope, client.receive) as watch:
        asyncio.get_running_loop().call_later(0.05, client.leave)
        await asyncio.sleep(10)
        reached_end = True
    assert watch.client_gone and not reached_end
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]  # nothing left pending
    await asyncio.sleep(0)  # and the task is not cancelled later


@pytest.mark.parametrize("hub", [False, True], ids=["receive", "hub"])
async def test_finishing_first_is_not_a_disconnect(hub: bool) -> None:
    client = Client(hub)
    async with ClientWatch(client.scope, client.receive) as watch:
        await asyncio.sleep(0.01)
    client.leave()  # e.g. uvicorn reporting "disconnect" once the response is complete
    await asyncio.sleep(0.05)
    assert not watch.client_gone


@pytest.mark.parametrize("hub", [False, True], ids=["receive", "hub"])
async def test_a_disconnect_while_held_does_not_cancel(hub: bool) -> None:
    client = Client(hub)
    held = True
    async with ClientWatch(client.scope, client.receive, hold=lambda: held) as watch:
        client.leave()
        await asyncio.sleep(0.05)  # finishing up: not cut off
    assert watch.client_gone and not watch.cancelled


@pytest.mark.parametrize("hub", [False, True], ids=["receive", "hub"])
async def test_someone_elses_cancel_propagates(hub: bool) -> None:
    client = Client(hub)

    async def work() -> None:
        async with ClientWatch(client.scope, client.receive):
            await asyncio.sleep(10)

    task = asyncio.ensure_future(work())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.parametrize("hub", [False, True], ids=["receive", "hub"])
async def test_sse_response_streams_then_cleans_up_when_the_client_leaves(hub: bool) -> None:
    client = Client(hub)
    cleaned_up = asyncio.Event()

    async def events() -> AsyncIterator[bytes]:
        try:
            for i in range(1000):
                yield b"data: %d\n\n" % i
                if i == 2:
                    client.leave()
                await asyncio.sleep(0.01)
        finally:
            cleaned_up.set()

    await SSEResponse(events(), {"x-request-id": "r1"})(client.scope, client.receive, client.send)
    assert cleaned_up.is_set()
    start, *bodies = client.sent
    assert start["status"] == 200 and (b"x-request-id", b"r1") in start["headers"]
    assert (b"content-type", b"text/event-stream; charset=utf-8") in start["headers"]
    assert 2 <= len(bodies) < 10 and all(m["more_body"] for m in bodies)  # cut off (at once with the hub), no final message


async def test_sse_response_complete() -> None:
    client = Client()

    async def events() -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"
        yield b"data: [DONE]\n\n"

    await SSEResponse(events())({}, client.receive, client.send)
    # events ready together go out in one write (gateway.coalesce), the last one closing the body
    assert [m.get("body") for m in client.sent[1:]] == [b"data: 1\n\ndata: [DONE]\n\n"]
    assert client.sent[-1]["more_body"] is False


async def test_json_response() -> None:
    client = Client()
    await JSONResponse(b'{"a":1}', 201, {"X-Request-Id": "r2"})({}, client.receive, client.send)
    start, body = client.sent
    assert start["status"] == 201
    assert start["headers"] == [(b"content-type", b"application/json"), (b"content-length", b"7"), (b"x-request-id", b"r2")]
    assert body == {"type": "http.response.body", "body": b'{"a":1}', "more_body": False}


class SlowAudit:
    """An audit store whose commit takes a while, and that tells when a commit begins."""

    def __init__(self) -> None:
        self.rows: list[Any] = []
        self.committing = asyncio.Event()

    async def record(self, row: Any) -> bool:
        self.rows.append(row)
        self.committing.set()
        await asyncio.sleep(0.1)
        return True


async def _stream_setup(max_tokens: int = 3, **fake: Any) -> tuple[Any, Any, Any, Any]:
    from gateway import convert
    from gateway.app import build_services
    from gateway.context import Call
    from gateway.generation import open_with_failover
    from gateway.responders import stream
    from gateway.streaming import ResponseShape
    from tests.live import settings_from

    doc = {
        "auth": {"enabled": False}, "ratelimit": {"enabled": False}, "audit": {"enabled": False},
        "backends": {"f": {"type": "fake", **fake}}, "models": [{"name": "m", "deployments": [{"backend": "f"}]}],
    }  # fmt: skip
    services = await build_services(settings_from(doc))
    await services.backends["f"].start()
    services.audit = SlowAudit()
    raw = b'{"model":"m","stream":true,"max_tokens":%d,"messages":[{"role":"user","content":"hi"}]}' % max_tokens
    body = convert.decode_body(raw, "chat.completions", services.settings.server)
    call = Call(request_id="chatcmpl-1", endpoint="chat.completions", ts=0.0, t0=0.0, stream=True)
    subs = convert.chat_requests(body, call.request_id, "m", services.settings.server)  # type: ignore[arg-type]
    attempts = services.router.plan("m", call.principal)
    loop = asyncio.get_running_loop()
    opened = await open_with_failover(services, call, attempts, subs, loop.time() + 30)
    shape = ResponseShape("chat.completions", call.request_id, 0, "m", False)
    return services, call, stream(services, call, shape, subs, loop.time() + 30, opened=opened), (subs, opened)


async def test_a_disconnect_during_the_final_commit_writes_one_row_and_ends_the_attempt_once() -> None:
    services, call, gen, _ = await _stream_setup()
    client = Client()

    async def leave_when_committing() -> None:
        await services.audit.committing.wait()
        client.leave()  # the client goes away while the row of a complete stream is being committed

    from gateway.context import report_after_response

    services.metrics = Reports(client)
    call.report_later = True
    leaver = asyncio.ensure_future(leave_when_committing())
    response = SSEResponse(gen, hold=lambda: call.finished)  # as pipeline.handle builds it
    response.after = report_after_response(services, call)
    await response({}, client.receive, client.send)
    await leaver
    await asyncio.gather(*list(services.background))
    assert [(r.request_id, r.status) for r in services.audit.rows] == [("chatcmpl-1", 200)]
    assert services.metrics.seen == [(200, False)]  # reported once, with the row's status (no final message: the client left)
    assert services.router.state()["f"]["in_flight"] == 0
    assert services.in_flight == 0


async def test_a_failing_first_write_still_records_one_row_and_ends_the_attempt() -> None:
    """The head is held until the first events (CoalescingSend), so the iterator always runs:
    a send that fails at the first write leaves nothing opened or unrecorded."""
    services, call, gen, _ = await _stream_setup()
    assert services.router.state()["f"]["in_flight"] == 1  # opened

    async def broken_send(message: dict[str, Any]) -> None:
        raise OSError("connection reset")

    response = SSEResponse(gen, hold=lambda: call.finished)
    with pytest.raises(OSError):
        await response({}, Client().receive, broken_send)
    await asyncio.gather(*list(services.background))
    assert len(services.audit.rows) == 1  # recorded once
    assert services.router.state()["f"]["in_flight"] == 0  # the opened attempt was ended


async def test_a_broken_receive_counts_as_the_client_leaving() -> None:
    async def broken_receive() -> dict[str, Any]:
        await asyncio.sleep(0.02)
        raise RuntimeError("transport gone")

    async with ClientWatch({}, broken_receive) as watch:
        await asyncio.sleep(10)
    assert watch.client_gone


class Reports:
    """Stands in for Metrics: what observe() saw, and how much the client had been sent then."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.seen: list[tuple[int, bool]] = []  # (status, the final message was already sent)

    def observe(self, call: Any) -> None:
        done = any(m.get("more_body") is False for m in self.client.sent)
        self.seen.append((call.status, done))


async def test_a_complete_stream_reports_once_after_its_last_byte() -> None:
    from gateway.context import report_after_response

    services, call, gen, _ = await _stream_setup()
    client = Client()
    services.metrics = Reports(client)
    call.report_later = True  # as pipeline.handle does
    response = SSEResponse(gen)
    response.after = report_after_response(services, call)
    await response({}, client.receive, client.send)
    assert services.metrics.seen == [(200, True)]


async def test_a_stream_cut_off_reports_once_when_its_cleanup_is_done() -> None:
    from gateway.context import report_after_response

    services, call, gen, _ = await _stream_setup(max_tokens=500, tokens_per_s=200.0)
    client = Client()
    services.metrics = Reports(client)
    call.report_later = True
    response = SSEResponse(gen)
    response.after = report_after_response(services, call)
    send = client.send

    async def send_then_leave(message: dict[str, Any]) -> None:
        await send(message)
        if len(client.sent) == 2:  # the response start and the first write of events
            client.leave()
            await asyncio.sleep(0.01)  # the watcher sees it while this body send is in progress

    await response({}, client.receive, send_then_leave)
    assert services.metrics.seen == []  # the background cleanup has not finished yet
    await asyncio.gather(*list(services.background))
    assert services.metrics.seen == [(499, False)] and [r.status for r in services.audit.rows] == [499]


async def test_a_json_response_runs_after_once_sent_even_if_sending_fails() -> None:
    client = Client()
    calls: list[int] = []
    response = JSONResponse(b"{}")
    response.after = lambda: calls.append(len(client.sent))
    await response({}, client.receive, client.send)

    async def broken_send(message: dict[str, Any]) -> None:
        raise OSError("connection reset")

    failing = JSONResponse(b"{}")
    failing.after = lambda: calls.append(-1)
    with pytest.raises(OSError):
        await failing({}, client.receive, broken_send)
    assert calls == [2, -1]
