"""gateway.fastpath and gateway.asgi_request: the completion endpoints are served before
Litestar's router with the same results as through it, and the request is read as Litestar
would (first header wins, body cap by Content-Length and by bytes, a client leaving mid-body)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import msgspec
import pytest
from litestar.exceptions.http_exceptions import RequestEntityTooLarge

from gateway.asgi_request import ASGIRequest
from gateway.drain import ABORTED_SCOPE_KEY
from gateway.errors import ClientClosed, Unavailable
from tests.gateway.test_api import fake_settings
from tests.live import LiveServer, serve, settings_from


def receiving(*messages: dict[str, Any]) -> Any:
    queue = list(messages)
    seen: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        seen.append(queue.pop(0))
        return seen[-1]

    receive.seen = seen  # type: ignore[attr-defined]
    return receive


def scope(*headers: tuple[bytes, bytes]) -> dict[str, Any]:
    return {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": list(headers)}


async def test_headers_first_of_a_repeat_wins() -> None:
    r = ASGIRequest(scope((b"x-request-id", b"a"), (b"x-request-id", b"b"), (b"authorization", b"Bearer t")), None, 10)
    assert r.headers.get("x-request-id") == "a" and r.headers.get("authorization") == "Bearer t"
    assert r.headers.get("nope") is None


async def test_a_body_in_pieces_is_read_once() -> None:
    receive = receiving(
        {"type": "http.request", "body": b'{"a":', "more_body": True},
        {"type": "http.request", "body": b"1}", "more_body": False},
    )
    r = ASGIRequest(scope(), receive, 100)
    assert await r.body() == b'{"a":1}'
    assert await r.body() == b'{"a":1}'  # cached: the pipeline may read it again (audit.store_content)
    assert len(receive.seen) == 2


async def test_a_body_over_the_cap_is_refused() -> None:
    receive = receiving()
    with pytest.raises(RequestEntityTooLarge):  # announced: refused before reading any of it
        await ASGIRequest(scope((b"content-length", b"11")), receive, 10).body()
    assert receive.seen == []
    receive = receiving(  # chunked, no length: cut off once the bytes pass the cap
        {"type": "http.request", "body": b"x" * 6, "more_body": True},
        {"type": "http.request", "body": b"x" * 6, "more_body": True},
        {"type": "http.request", "body": b"x", "more_body": False},
    )
    with pytest.raises(RequestEntityTooLarge):
        await ASGIRequest(scope(), receive, 10).body()
    assert len(receive.seen) == 2


async def test_a_client_leaving_mid_body_is_client_closed() -> None:
    receive = receiving({"type": "http.request", "body": b"{", "more_body": True}, {"type": "http.disconnect"})
    with pytest.raises(ClientClosed) as exc:
        await ASGIRequest(scope(), receive, 100).body()
    assert exc.value.status_code == 499


async def test_a_drain_abort_mid_body_is_shutting_down() -> None:
    receive = receiving({"type": "http.disconnect"})
    aborted = scope() | {ABORTED_SCOPE_KEY: True}  # as gateway.drain marks the request it aborts
    with pytest.raises(Unavailable) as exc:
        await ASGIRequest(aborted, receive, 100).body()
    assert (exc.value.status_code, exc.value.code) == (503, "server_shutting_down")


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with serve(settings_from(fake_settings())) as s:
        yield s


def outcome(r: httpx.Response) -> tuple[int, Any]:
    """Status and body with the per-request parts (ids, timestamps) taken out."""
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        body: Any = [e if e == "[DONE]" else msgspec.json.decode(e) for e in events]
        for e in body:
            if isinstance(e, dict):
                e.pop("id", None), e.pop("created", None)
    else:
        body = r.json()
        if isinstance(body, dict):
            body.pop("id", None), body.pop("created", None)
    return r.status_code, body


@pytest.mark.parametrize(
    ("model", "text", "extra"),
    [
        ("m", "hi", {"max_tokens": 4}),
        ("m", "hi", {"max_tokens": 4, "stream": True}),
        ("m", "x" * 5000, {}),  # 413
        ("nope", "hi", {}),  # 404
        ("m", "hi", {"max_tokens": "many"}),  # 400
    ],
)
@pytest.mark.parametrize("endpoint", ["/v1/chat/completions", "/v1/completions"])
def test_the_fast_path_answers_as_litestar_does(server: LiveServer, model: str, text: str, extra: dict[str, Any], endpoint: str) -> None:
    """The exact path takes the fast path; with a trailing slash Litestar's router serves it."""
    prompt = {"messages": [{"role": "user", "content": text}]} if endpoint.endswith("chat/completions") else {"prompt": text}
    body = {"model": model, **prompt, **extra}
    fast = httpx.post(server.url + endpoint, json=body, timeout=30)
    routed = httpx.post(server.url + endpoint + "/", json=body, timeout=30)
    assert outcome(fast) == outcome(routed)
    assert fast.headers.keys() == routed.headers.keys()
    assert "x-request-id" in fast.headers


def test_a_bug_outside_the_pipeline_is_an_openai_shaped_500(server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway import pipeline

    async def broken(*args: Any) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(pipeline, "handle", broken)
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "m", "messages": []}, timeout=30)
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "server_error" and "bug" not in r.text


def test_a_non_ascii_digit_in_a_number_header_is_ignored(server: LiveServer) -> None:
    """'²'.isdigit() is True but int('²') raises: neither header may turn into a 500."""
    body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}'
    r = httpx.post(server.url + "/v1/chat/completions", content=body, headers={"x-stainless-retry-count": b"\xb2", "content-type": "application/json"}, timeout=30)
    assert r.status_code == 200, r.text
