"""gateway.corked: a response's head goes out with its first body bytes in one write, a head
left alone still goes out at the end of its loop turn, later writes are not held, and closing
or aborting a connection handles a held head. The live part runs uvicorn with the protocol and
counts the writes that reach the real socket transport."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import uvicorn

from gateway.corked import CorkedHttpToolsProtocol, CorkedTransport
from gateway.streaming import JSONResponse, SSEResponse


class Recorder:
    """The bits of asyncio.Transport that CorkedTransport uses, recording each write."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = self.aborted = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 1)}.get(name, default)


async def next_turn() -> None:
    await asyncio.sleep(0)


async def test_head_and_body_in_one_turn_are_one_write() -> None:
    raw = Recorder()
    t = CorkedTransport(raw, asyncio.get_running_loop())  # type: ignore[arg-type]
    t.cork()
    t.write(b"HEAD")
    t.write(b"BODY")
    assert raw.writes == [b"HEADBODY"]  # at once, not at the end of the turn
    t.write(b"MORE")
    assert raw.writes == [b"HEADBODY", b"MORE"]  # after the first, writes go straight through
    await next_turn()
    assert raw.writes == [b"HEADBODY", b"MORE"]  # nothing left to flush


async def test_a_head_alone_goes_out_at_the_end_of_its_turn() -> None:
    raw = Recorder()
    t = CorkedTransport(raw, asyncio.get_running_loop())  # type: ignore[arg-type]
    t.cork()
    t.write(b"HEAD")
    assert raw.writes == []
    await next_turn()
    assert raw.writes == [b"HEAD"]
    t.write(b"BODY")
    assert raw.writes == [b"HEAD", b"BODY"]


async def test_uncorked_writes_go_straight_through() -> None:
    raw = Recorder()
    t = CorkedTransport(raw, asyncio.get_running_loop())  # type: ignore[arg-type]
    t.write(b"a")
    t.write(b"b")
    assert raw.writes == [b"a", b"b"]
    assert t.get_extra_info("peername") == ("127.0.0.1", 1)  # everything else is the real transport's


async def test_close_sends_a_held_head_first_and_abort_drops_it() -> None:
    raw = Recorder()
    t = CorkedTransport(raw, asyncio.get_running_loop())  # type: ignore[arg-type]
    t.cork()
    t.write(b"HEAD")
    t.close()
    assert raw.writes == [b"HEAD"] and raw.closed
    await next_turn()
    assert raw.writes == [b"HEAD"]  # the end-of-turn flush was cancelled

    raw = Recorder()
    t = CorkedTransport(raw, asyncio.get_running_loop())  # type: ignore[arg-type]
    t.cork()
    t.write(b"HEAD")
    t.abort()
    await next_turn()
    assert raw.writes == [] and raw.aborted
    t.write(b"x")  # uncorked after an abort: straight to the (aborted) transport, as without the cork
    assert raw.writes == [b"x"]


async def test_writelines_and_write_eof_keep_the_order() -> None:
    raw = Recorder()
    raw.write_eof = lambda: raw.writes.append(b"<EOF>")  # type: ignore[attr-defined]
    t = CorkedTransport(raw, asyncio.get_running_loop())  # type: ignore[arg-type]
    t.cork()
    t.writelines([b"HE", b"AD"])
    t.writelines([b"BO", b"DY"])
    assert raw.writes == [b"HEADBODY"]
    t.cork()
    t.write(b"HEAD")
    t.write_eof()  # a held head goes first
    assert raw.writes == [b"HEADBODY", b"HEAD", b"<EOF>"]


async def test_a_head_held_past_the_connection_closing_is_dropped() -> None:
    raw = Recorder()
    t = CorkedTransport(raw, asyncio.get_running_loop())  # type: ignore[arg-type]
    t.cork()
    t.write(b"HEAD")
    raw.closed = True  # the peer went away before the turn ended
    await next_turn()
    assert raw.writes == []


# --------------------------------------------------------------------------- live, through uvicorn
WRITES: list[bytes] = []


class Counting:
    """Wraps uvloop's transport: every write that reaches the socket is recorded."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport

    def write(self, data: bytes) -> None:
        WRITES.append(data)
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CountingProtocol(CorkedHttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(Counting(transport))  # type: ignore[arg-type]


async def app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    if scope["path"] == "/json":
        await JSONResponse(b'{"ok":true}', 200, {"x-n": "1"})(scope, receive, send)
    elif scope["path"] == "/sse":

        async def events() -> AsyncIterator[bytes]:
            for i in range(5):
                yield b"data: %d\n\n" % i
            yield b"data: [DONE]\n\n"

        await SSEResponse(events())(scope, receive, send)
    elif scope["path"] == "/slow-sse":

        async def slow() -> AsyncIterator[bytes]:
            for i in range(3):
                await asyncio.sleep(0.05)
                yield b"data: %d\n\n" % i

        await SSEResponse(slow())(scope, receive, send)


@contextlib.contextmanager
def serving() -> Iterator[int]:
    config = uvicorn.Config(app, host="127.0.0.1", port=0, http=CountingProtocol, lifespan="off", log_config=None, access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)


def test_responses_through_uvicorn_are_one_write_each() -> None:
    WRITES.clear()
    with serving() as port, httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
        for _ in range(3):  # keep-alive: the cork is set again for each request
            r = client.get("/json")
            assert r.status_code == 200 and r.json() == {"ok": True} and r.headers["x-n"] == "1"
        r = client.get("/sse")
        assert r.text == "".join(f"data: {i}\n\n" for i in range(5)) + "data: [DONE]\n\n"
        assert r.headers["content-type"].startswith("text/event-stream")
        num_fast = len(WRITES)
        with client.stream("GET", "/slow-sse") as s:
            first = time.monotonic()
            lines = [(time.monotonic() - first, line) for line in s.iter_lines() if line]
    assert num_fast == 4  # head + body together: one write per response, SSE burst included
    assert [w.startswith(b"HTTP/1.1 200") for w in WRITES[:4]] == [True] * 4
    assert [line for _, line in lines] == ["data: 0", "data: 1", "data: 2"]
    assert lines[-1][0] >= 0.08  # events of a slow stream are not held back for each other


def test_a_malformed_request_still_gets_its_400_and_a_close() -> None:
    WRITES.clear()
    with serving() as port, socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"NOT HTTP\r\n\r\n")
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    assert data.startswith(b"HTTP/1.1 400")


def test_pipelined_requests_get_their_responses_in_order() -> None:
    with serving() as port, socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        req = b"GET /json HTTP/1.1\r\nhost: x\r\n\r\n"
        sock.sendall(req * 3)
        data = b""
        while data.count(b'{"ok":true}') < 3:
            chunk = sock.recv(4096)
            assert chunk, "connection closed early"
            data += chunk
    assert data.count(b"HTTP/1.1 200 OK") == 3


def test_a_client_leaving_after_a_big_body_is_noticed() -> None:
    """uvicorn stops reading while a big body is buffered; once the body is complete the protocol
    reads on, so the peer's FIN reaches connection_lost and the hub aborts the backend work."""
    import json

    from tests.gateway.test_api import fake_settings
    from tests.live import serve, settings_from

    doc = fake_settings(max_body_bytes=4_000_000)
    doc["backends"]["f"].update(first_token_delay_s=3.0, context_length=10_000_000)
    with serve(settings_from(doc)) as live:
        services = live.app.state.services
        body = json.dumps({"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "a " * 100_000}]}).encode()
        head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body)
        with socket.create_connection(("127.0.0.1", live.port), timeout=5) as sock:
            sock.sendall(head + body[:500])
            time.sleep(0.3)  # the app is waiting in receive() when the big rest arrives
            sock.sendall(body[500:-100_000])
            time.sleep(0.3)
            sock.sendall(body[-100_000:])  # more than 64 KiB in one go: uvicorn pauses reading
            time.sleep(0.5)  # read, decoded, routed: generating (3 s to the first token)
            assert services.in_flight == 1 and services.router.state()["f"]["in_flight"] == 1
        left = time.monotonic()
        while services.in_flight and time.monotonic() - left < 5:
            time.sleep(0.02)
        assert services.in_flight == 0 and time.monotonic() - left < 1.5  # aborted, not run to the end
