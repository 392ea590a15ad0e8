"""kill -9 under load loses no request a client saw complete.

`aibox serve` runs as a real subprocess (fake backend); concurrent clients stream and not,
remembering every response id they received in full (JSON body, or a stream up to [DONE]).
The server is SIGKILLed mid-load. Rows acknowledged but not yet committed are in the spool;
`aibox usage` (like the next `aibox serve`) replays it. Then every remembered id must be in the
database exactly once, with its rollup, and the database must pass `PRAGMA integrity_check`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
NUM_CLIENTS = 32
MIN_ACKED = 300  # kill once this many responses completed (bounded load)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(tmp_path: Path, port: int) -> subprocess.Popen[bytes]:
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        '[auth]\nenabled = false\n[ratelimit]\nenabled = false\n[audit]\npath = "usage.db"\n'
        '[backends.f]\ntype = "fake"\nscript = "a b c d e f g h i j k l m n o p "\n'
        '[[models]]\nname = "m"\ndeployments = [{backend = "f"}]\n'
    )
    cmd = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(cfg), "--port", str(port)]
    with (tmp_path / "server.log").open("wb") as log:  # a file, not a pipe: a full pipe stalls the server
        return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


async def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient() as client:
        while True:
            assert proc.poll() is None, "server exited before it was ready (see server.log)"
            try:
                if (await client.get(url + "/ready")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server not ready in time"
            await asyncio.sleep(0.05)


class Load:
    """Shared by the clients: the ids acknowledged so far, and the kill switch."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.acked: list[str] = []
        self.num_acked_at_kill: int | None = None

    def ack(self, request_id: str) -> None:
        self.acked.append(request_id)
        if self.num_acked_at_kill is None and len(self.acked) >= MIN_ACKED:
            # Kill from inside the client that just got a response, with other responses
            # in flight: the narrowest window between "client saw it" and "process gone".
            os.kill(self.pid, signal.SIGKILL)
            self.num_acked_at_kill = len(self.acked)


async def client_loop(url: str, worker: int, load: Load) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": f"w{worker}"}], "max_tokens": 6}
    async with httpx.AsyncClient(timeout=10) as client:
        i = 0
        while True:
            i += 1
            stream = (worker + i) % 2 == 0
            try:
                if stream:
                    async with client.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}) as r:
                        first_id, done = None, False
                        async for line in r.aiter_lines():
                            if line == "data: [DONE]":
                                done = True
                            elif line.startswith("data: ") and first_id is None:
                                first_id = json.loads(line[6:])["id"]
                        if done and first_id:
                            load.ack(first_id)
                else:
                    r = await client.post(url + "/v1/chat/completions", json=body)
                    if r.status_code == 200:
                        load.ack(r.json()["id"])  # the whole body arrived
            except (httpx.HTTPError, json.JSONDecodeError):
                return  # the server is gone


@pytest.mark.slow
async def test_sigkill_under_load_loses_no_acknowledged_row(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(tmp_path, port)
    try:
        await wait_ready(url, proc)
        load = Load(proc.pid)
        tasks = [asyncio.create_task(client_loop(url, w, load)) for w in range(NUM_CLIENTS)]
        done, pending = await asyncio.wait(tasks, timeout=60)
        for t in pending:
            t.cancel()
        assert not pending, f"load did not reach {MIN_ACKED} responses in time ({len(load.acked)})"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    acked = load.acked
    replay = subprocess.run([sys.executable, "-m", "gateway.cli", "usage", "summary", "--db", str(tmp_path / "usage.db")],
                            cwd=ROOT, capture_output=True, timeout=60)  # fmt: skip
    assert replay.returncode == 0, replay.stderr.decode()
    assert not list((tmp_path / "usage.db-spool").glob("*")), "the spool was not replayed"

    conn = sqlite3.connect(tmp_path / "usage.db")
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        ids = [r[0] for r in conn.execute("SELECT request_id FROM requests")]
        stored = set(ids)
        assert len(ids) == len(stored), "a row was replayed twice"
        num_rollup = conn.execute("SELECT SUM(requests) FROM daily_usage").fetchone()[0]
    finally:
        conn.close()
    missing = [rid for rid in acked if rid not in stored]
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged responses missing, e.g. {missing[:3]}"
    assert num_rollup == len(stored)  # rows and rollup committed together
