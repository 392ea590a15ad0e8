"""Serve an app for real (uvicorn on 127.0.0.1, free port) in a background thread."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import msgspec
import uvicorn

from gateway.app import create_app
from gateway.corked import CorkedHttpToolsProtocol
from gateway.settings import Settings, parse


def settings_from(doc: dict[str, Any]) -> Settings:
    """Settings from a TOML-shaped dict, validated exactly as a config file would be."""
    return parse(doc)


class LiveServer:
    def __init__(self, app: Any, http: Any = CorkedHttpToolsProtocol) -> None:
        """`http`: the protocol `aibox serve` runs, unless a test asks for uvicorn's own
        ("httptools", as under `uvicorn --workers`)."""
        self.app = app
        config = uvicorn.Config(app, host="127.0.0.1", port=0, http=http, log_config=None, access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, wait_ready: bool = True, timeout_s: float = 120.0) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("server failed to start")
            time.sleep(0.01)
        if wait_ready:
            self.wait_ready(deadline - time.monotonic())
        return self

    def wait_ready(self, timeout_s: float = 120.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            r = httpx.get(self.url + "/ready")
            detail = msgspec.json.decode(r.content)
            if r.status_code == 200:
                return detail
            if detail.get("load_errors") or time.monotonic() > deadline:
                raise RuntimeError(f"server not ready: {detail}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@contextlib.contextmanager
def serve(settings: Settings, http: Any = CorkedHttpToolsProtocol, **kw: Any) -> Iterator[LiveServer]:
    server = LiveServer(create_app(settings, **kw), http=http).start()
    try:
        yield server
    finally:
        server.stop()
