"""A real, throwaway redis-server for tests: free 127.0.0.1 port, temp dir, no persistence.

    with RedisServer() as server:      # or the `redis_server` fixture from tests/conftest.py
        url = server.url
        server.stop()                  # simulate an outage
        server.start()                 # same port again

A missing binary skips the test with the reason, except under CI=true where it fails (CI
installs Debian's redis-server; a silent skip there would hide lost coverage).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

DEFAULT_BINARY = "/usr/bin/redis-server"  # Debian's; AIBOX_TEST_REDIS_SERVER overrides


def require_redis_binary() -> str:
    """Path of redis-server, or skip (fail under CI=true) with the reason."""
    wanted = os.environ.get("AIBOX_TEST_REDIS_SERVER", DEFAULT_BINARY)
    path = wanted if os.path.exists(wanted) else shutil.which("redis-server")
    if path:
        return path
    reason = f"redis-server not found at {wanted} or on PATH (apt-get install redis-server)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """Owns one redis-server process; `stop()`/`start()` keep the port so clients can reconnect."""

    def __init__(self, binary: str | None = None) -> None:
        self.binary = binary or require_redis_binary()
        self.port = _free_port()
        self._dir = tempfile.TemporaryDirectory(prefix="aibox-redis-")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout_s: float = 10.0) -> None:
        """Start (or restart) the server and wait until it answers PING."""
        if self.running:
            return
        log = Path(self._dir.name) / "redis.log"
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self._dir.name,
                "--save", "", "--appendonly", "no", "--daemonize", "no", "--protected-mode", "yes",
                "--logfile", str(log)]  # fmt: skip
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise RuntimeError(f"redis-server exited with {self._proc.returncode}: {tail}")
            if self._ping():
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout_s}s")

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL); data is lost, as there is no persistence."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
        self._proc = None

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
