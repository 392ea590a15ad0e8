"""Shared pieces of bench/load.py and bench/overhead.py: run `aibox serve` as a subprocess on
127.0.0.1, mint an API key, and a fast HTTP client to drive it.

The client is `backends.upstream_http.ConnectionPool` (asyncio + httptools, the C parser uvicorn
uses; keep-alive, chunked and content-length bodies): ~10x less CPU per request than httpx, so on
this 2-core machine the client does not become the bottleneck. `--client httpx` in both benches
cross-checks with httpx. Client CPU time is reported so the claim can be checked.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import jwt

ROOT = Path(__file__).resolve().parents[1]
SECRET_ENV = "AIBOX_BENCH_JWT_SECRET"
SECRET = "bench-secret-0123456789-0123456789-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def api_key(sub: str = "bench", tier: str | None = None) -> str:
    claims: dict[str, Any] = {"sub": sub, "exp": int(time.time()) + 3600}
    if tier:
        claims["tier"] = tier
    return jwt.encode(claims, SECRET, algorithm="HS256")


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    return str(v)


def write_config(folder: Path, tables: dict[str, dict[str, Any]], models: list[dict[str, Any]]) -> Path:
    """`tables`: dotted table name -> keys (values may be inline tables); `models`: [[models]]."""
    lines = []
    for name, keys in tables.items():
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in keys.items())
    for m in models:
        lines.append("[[models]]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in m.items())
    path = folder / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


class Aibox:
    """`python -m gateway.cli serve` in a subprocess; stderr goes to a log file."""

    def __init__(
        self, config: Path, port: int | None = None, env: dict[str, str] | None = None, root: Path = ROOT
    ) -> None:
        """`root`: the checkout whose code serves (bench/ab.py compares two)."""
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = config.parent / "serve.log"
        self._log = self.log_path.open("wb")
        cmd = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config), "--port", str(self.port)]
        full_env = {**os.environ, SECRET_ENV: SECRET, **(env or {})}
        self.proc = subprocess.Popen(cmd, cwd=root, stdout=self._log, stderr=subprocess.STDOUT, env=full_env)

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("aibox exited:\n" + self.log_path.read_text(errors="replace")[-3000:])
            try:
                if httpx.get(self.url + "/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError("aibox not ready in time")

    def cpu_s(self) -> float:
        """User+system CPU seconds used by the server process so far (Linux /proc)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM (graceful drain) and the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def temp_dir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


def machine() -> str:
    load = os.getloadavg()
    return f"{os.cpu_count()} CPUs, load average {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}, Python {sys.version.split()[0]}"
