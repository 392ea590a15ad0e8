"""The request as the pipeline reads it: a protocol that Litestar's `Request` meets, and
`ASGIRequest`, the same read straight from the ASGI scope for the endpoints that `gateway.fastpath`
dispatches before Litestar."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from litestar.exceptions.http_exceptions import RequestEntityTooLarge

from gateway.drain import aborted_error
from gateway.errors import ClientClosed


class APIRequest(Protocol):
    scope: Any

    @property
    def headers(self) -> Mapping[str, str]: ...

    async def receive(self) -> Any: ...

    async def body(self) -> bytes: ...


class ASGIRequest:
    """Headers as a dict (ASGI names are lower-case; the first of a repeated header wins, as with
    Litestar's `Headers.get`) and the body, read once, no longer than `max_body_bytes`: a bigger
    one raises Litestar's RequestEntityTooLarge, as `Request.body()` does."""

    __slots__ = ("_body", "_max_body_bytes", "headers", "receive", "scope")

    def __init__(self, scope: Any, receive: Any, max_body_bytes: int) -> None:
        self.scope = scope
        self.receive = receive
        self.headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in reversed(scope["headers"])}
        self._max_body_bytes = max_body_bytes
        self._body: bytes | None = None

    async def body(self) -> bytes:
        if self._body is not None:
            return self._body
        announced = self.headers.get("content-length", "")
        if announced.isascii() and announced.isdigit() and int(announced) > self._max_body_bytes:
            raise RequestEntityTooLarge  # before reading any of it
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self.receive()
            if message["type"] != "http.request":  # http.disconnect: the client left, or a drain aborted us
                raise aborted_error(self.scope) or ClientClosed("The client closed the connection before sending the whole request body.")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._max_body_bytes:
                raise RequestEntityTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        self._body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        return self._body
