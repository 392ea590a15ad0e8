"""SIGTERM drain of a real `aibox serve` process: /ready turns 503 at once, new requests are
refused, in-flight streams finish (or, past server.shutdown_timeout_s, end with an error event
and [DONE]), every audit row is written, and the process exits 0."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from tests.ops.helpers import chat, is_openai_error, sse_events

ROOT = Path(__file__).resolve().parents[2]
LONG_SCRIPT = " ".join(f"w{i}" for i in range(500))  # one pass = 25 s at 20 tokens/s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServeProcess:
    def __init__(self, tmp: Path, shutdown_timeout_s: float) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.db = tmp / "usage.db"
        (tmp / "config.toml").write_text(
            f"[server]\nshutdown_timeout_s = {shutdown_timeout_s}\n"
            "[auth]\nenabled = false\n[ratelimit]\nenabled = false\n"
            f'[audit]\npath = "{self.db}"\n'
            f'[backends.f]\ntype = "fake"\ntokens_per_s = 20.0\nscript = "{LONG_SCRIPT}"\n'
            '[[models]]\nname = "m"\ndeployments = [{backend = "f"}]\n'
        )
        cmd = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(tmp / "config.toml"), "--port", str(self.port)]
        self.log = (tmp / "serve.log").open("wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.output()
            try:
                if httpx.get(self.url + "/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError("server did not become ready:\n" + self.output())

    def backend_in_flight(self) -> float:
        return msgspec.json.decode(httpx.get(self.url + "/ready").content)["backends"]["f"]["in_flight"]

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Any]:
    procs: list[ServeProcess] = []

    def start(shutdown_timeout_s: float) -> ServeProcess:
        p = ServeProcess(tmp_path, shutdown_timeout_s)
        procs.append(p)
        p.wait_ready()
        return p

    yield start
    for p in procs:
        p.stop()


def start_streams(server: ServeProcess, n: int, max_tokens: int, others: int = 0) -> tuple[list[threading.Thread], list[Any]]:
    """n streaming requests in threads; returns once the backend serves all of them (+ `others`)."""
    results: list[Any] = [None] * n

    def run(i: int) -> None:
        try:
            r = httpx.post(server.url + "/v1/chat/completions", json=chat(max_tokens=max_tokens, stream=True), timeout=30)
            results[i] = (r.status_code, r.text)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while server.backend_in_flight() < n + others:
        assert time.monotonic() < deadline, "streams did not start"
        time.sleep(0.01)
    return threads, results


def audit_rows(db: Path) -> list[tuple[int, str | None]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT status, error_code FROM requests").fetchall()


@pytest.mark.slow
def test_sigterm_lets_streams_finish_and_exits_0(spawn: Any) -> None:
    server = spawn(shutdown_timeout_s=20)
    threads, results = start_streams(server, 3, max_tokens=30)  # 1.5 s each at 20 tokens/s
    server.proc.send_signal(signal.SIGTERM)
    t_signal = time.monotonic()
    deadline = t_signal + 2
    while (ready := httpx.get(server.url + "/ready")).status_code == 200:  # the signal is handled on the loop
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert time.monotonic() - t_signal < 1.0  # handled on the loop at once (generous for a loaded box)
    assert ready.status_code == 503 and ready.json()["draining"] is True
    refused = httpx.post(server.url + "/v1/chat/completions", json=chat(max_tokens=1), headers={"x-request-id": "late-1"})
    assert refused.status_code == 503 and is_openai_error(refused.json())
    assert refused.headers["x-request-id"] == "late-1" and refused.headers["retry-after"] == "1"
    assert httpx.get(server.url + "/health").status_code == 200
    for t in threads:
        t.join(timeout=30)
    for result in results:
        assert isinstance(result, tuple), result
        status, body = result
        events = sse_events(body)
        assert status == 200 and events[-1] == "[DONE]"
        assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert server.proc.wait(timeout=30) == 0, server.output()
    # The refusal is a rejected request like any other: it has its row too.
    assert sorted(audit_rows(server.db), key=str) == [(200, None)] * 3 + [(503, "server_shutting_down")]


@pytest.mark.slow
def test_streams_past_the_timeout_end_with_an_error_event(spawn: Any) -> None:
    server = spawn(shutdown_timeout_s=0.5)
    blocking: list[Any] = []
    json_call = threading.Thread(target=lambda: blocking.append(httpx.post(server.url + "/v1/chat/completions", json=chat(max_tokens=400), timeout=30)))
    json_call.start()
    threads, results = start_streams(server, 2, max_tokens=400, others=1)  # 20 s each: cut by the drain
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    for t in [*threads, json_call]:
        t.join(timeout=30)
    assert server.proc.wait(timeout=30) == 0, server.output()
    assert time.monotonic() - t0 < 10
    (cut,) = blocking  # the non-streaming request gets a 503 body instead of a response
    assert cut.status_code == 503 and cut.json()["error"]["code"] == "server_shutting_down"
    for result in results:
        assert isinstance(result, tuple), result
        status, body = result
        events = sse_events(body)
        assert status == 200 and events[-1] == "[DONE]"
        assert is_openai_error(events[-2]) and events[-2]["error"]["code"] == "server_shutting_down"
        assert any(e["choices"] and e["choices"][0]["delta"].get("content") for e in events[:-2])
    rows = audit_rows(server.db)
    assert rows == [(503, "server_shutting_down")] * 3  # recorded as shutdown aborts, not client disconnects
