"""The gateway writes one audit row per request, committed before the response ends.

A real server (fake backend, JWT auth on) is driven over HTTP; after each response the row is
read straight away, with no waiting: if it were not committed before the last byte, it would
not be there."""

from __future__ import annotations

import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import msgspec
import pytest

from tests.live import LiveServer, serve, settings_from

SECRET = "audit-http-test-secret-0123456789abcdef"
SCRIPT = "one two three four five six seven eight nine ten. "


def token(sub: str, tenant: str | None = None) -> dict[str, str]:
    claims: dict[str, Any] = {"sub": sub, "exp": int(time.time()) + 600}
    if tenant:
        claims["tenant"] = tenant
    return {"authorization": "Bearer " + jwt.encode(claims, SECRET, algorithm="HS256")}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, Path]]:
    db = tmp_path_factory.mktemp("audit") / "usage.db"
    doc = {
        "auth": {"enabled": True, "secret_env": "AIBOX_AUDIT_HTTP_SECRET"},
        "ratelimit": {"enabled": False},
        "audit": {"path": str(db), "tenant_quotas": {"tiny": {"tokens_per_day": 5}}},
        "backends": {"f": {"type": "fake", "script": SCRIPT, "context_length": 128}},
        "models": [{"name": "m", "aliases": ["m-alias"], "deployments": [{"backend": "f"}]}],
    }
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIBOX_AUDIT_HTTP_SECRET", SECRET)
        with serve(settings_from(doc)) as s:
            yield s, db


def row(db: Path, request_id: str) -> dict[str, Any]:
    """The request's row, once the writer has committed it (off the request path: milliseconds)."""
    deadline = time.monotonic() + 10
    while True:
        conn = sqlite3.connect(db)
        conn.row_factory = sqlite3.Row
        try:
            found = conn.execute("SELECT * FROM requests WHERE request_id = ?", [request_id]).fetchall()
        finally:
            conn.close()
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert len(found) == 1, f"expected exactly one row for {request_id}, found {len(found)}"
    return dict(found[0])


def post(server: LiveServer, body: dict[str, Any], headers: dict[str, str]) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers, timeout=30)


def sse(response: httpx.Response) -> list[dict[str, Any]]:
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [msgspec.json.decode(e) for e in events[:-1]]


def test_non_stream_row(server: tuple[LiveServer, Path]) -> None:
    s, db = server
    body = {"model": "m-alias", "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 3, "user": "end-user-7"}
    r = post(s, body, {**token("alice", "acme"), "x-stainless-retry-count": "2"})
    assert r.status_code == 200
    data = r.json()
    got = row(db, data["id"])
    assert {k: got[k] for k in ("subject", "tenant", "endpoint", "model_requested", "model_served", "deployment",
                                "backend_type", "stream", "status", "finish_reason", "user", "client_retry_count")} == {
        "subject": "alice", "tenant": "acme", "endpoint": "chat.completions", "model_requested": "m-alias",
        "model_served": "m", "deployment": "f", "backend_type": "fake", "stream": 0, "status": 200,
        "finish_reason": "length", "user": "end-user-7", "client_retry_count": 2,
    }  # fmt: skip
    assert (got["prompt_tokens"], got["completion_tokens"]) == (data["usage"]["prompt_tokens"], 3)
    assert got["total_ms"] > 0 and got["ttft_ms"] is not None and got["request_content"] is None


@pytest.mark.parametrize("include_usage", [True, False])
def test_stream_row_counts_streamed_tokens(server: tuple[LiveServer, Path], include_usage: bool) -> None:
    s, db = server
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    r = post(s, body, token("bob", "acme"))
    chunks = sse(r)
    got = row(db, chunks[0]["id"])
    assert (got["stream"], got["status"], got["finish_reason"], got["completion_tokens"]) == (1, 200, "length", 4)
    assert got["prompt_tokens"] > 0
    if include_usage:
        assert chunks[-1]["usage"]["completion_tokens"] == 4
        assert got["prompt_tokens"] == chunks[-1]["usage"]["prompt_tokens"]


def test_backend_error_rows(server: tuple[LiveServer, Path]) -> None:
    s, db = server
    r = post(s, {"model": "m", "messages": [{"role": "user", "content": "[[fail]]"}]}, token("carol", "acme"))
    assert r.status_code >= 500
    got = row(db, r.headers["x-request-id"])
    assert (got["status"], got["error_type"], got["completion_tokens"]) == (r.status_code, r.json()["error"]["type"], 0)

    body = {"model": "m", "messages": [{"role": "user", "content": "[[fail-after:2]]"}], "stream": True}
    r = post(s, body, token("carol", "acme"))
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")  # the failure came mid-stream
    got = row(db, r.headers["x-request-id"])
    assert got["status"] >= 500 and got["completion_tokens"] == 2 and got["stream"] == 1


@pytest.mark.parametrize(
    ("headers", "model", "status", "code", "subject", "recorded_model"),
    [
        # 401s are rejected before the body is read, so the requested model is unknown
        ({}, "m", 401, "invalid_api_key", "anonymous", None),
        ({"authorization": "Bearer not-a-jwt"}, "m", 401, "invalid_api_key", "anonymous", None),
        (None, "nope", 404, "model_not_found", "dave", "nope"),
    ],
)
def test_rejected_requests_are_recorded(server, headers, model, status, code, subject, recorded_model) -> None:  # type: ignore[no-untyped-def]
    s, db = server
    r = post(s, {"model": model, "messages": [{"role": "user", "content": "hi"}]}, token("dave") if headers is None else headers)
    assert r.status_code == status
    got = row(db, r.headers["x-request-id"])
    assert (got["status"], got["error_code"], got["subject"], got["model_requested"]) == (status, code, subject, recorded_model)
    assert got["prompt_tokens"] == 0 and got["completion_tokens"] == 0


def test_quota_exhausted_is_429_and_recorded(server: tuple[LiveServer, Path]) -> None:
    s, db = server
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    assert post(s, body, token("erin", "tiny")).status_code == 200  # 5+ tokens: the day's quota is gone
    r = post(s, body, token("erin", "tiny"))
    assert r.status_code == 429
    err = r.json()["error"]
    assert err["code"] == "insufficient_quota" and "resets at" in err["message"] and "T00:00:00Z" in err["message"]
    assert 0 < int(r.headers["retry-after"]) <= 86400
    got = row(db, r.headers["x-request-id"])
    assert (got["status"], got["error_code"], got["tenant"]) == (429, "insufficient_quota", "tiny")
    assert post(s, body, token("frank", "acme")).status_code == 200  # other tenants unaffected


def test_ready_reports_audit(server: tuple[LiveServer, Path]) -> None:
    s, _ = server
    detail = httpx.get(s.url + "/ready").json()
    assert detail["audit"]["ok"] is True and detail["audit"]["failing"] is False


async def test_row_is_durable_before_the_response_completes(server: tuple[LiveServer, Path]) -> None:
    """Another process holds the write lock: the response is not held up by the database, and
    its row is already in the spool when the client has the response (the kill -9 guarantee
    rests on this ordering); it reaches the database once the lock goes."""
    s, db = server
    locker = sqlite3.connect(db, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        r = httpx.post(s.url + "/v1/chat/completions", json=body, headers=token("gina", "acme"), timeout=5)
        spooled = b"".join(p.read_bytes() for p in Path(f"{db}-spool").glob("*.jsonl"))
        assert r.status_code == 200 and f'"request_id":"{r.json()["id"]}"'.encode() in spooled
        assert not sqlite3.connect(db).execute("SELECT 1 FROM requests WHERE request_id = ?", [r.json()["id"]]).fetchall()
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert row(db, r.json()["id"])["subject"] == "gina"


def test_a_client_gone_before_its_body_arrived_is_recorded_as_499(server: tuple[LiveServer, Path]) -> None:
    s, db = server
    host, port = s.url.removeprefix("http://").split(":")
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        f"content-length: 1000\r\nauthorization: {token('gone-mid-body')['authorization']}\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(head.encode() + b'{"model": "m", "messa')  # then leave, 980 bytes short
    deadline = time.monotonic() + 10
    while True:
        with sqlite3.connect(db) as conn:
            rows = conn.execute("SELECT status, error_code FROM requests WHERE subject = 'gone-mid-body'").fetchall()
        if rows or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert rows == [(499, "client_closed")]
