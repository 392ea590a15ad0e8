"""A small HTTP/1.1 keep-alive client for streaming from OpenAI-compatible upstreams.

asyncio Protocol + httptools (llhttp, the C parser uvicorn uses): status, headers, chunked or
content-length bodies and keep-alive are parsed in C; body bytes go straight to the consumer.
It does only what the upstream backend needs: one base URL (http or https), POST/GET, a bounded
pool of keep-alive connections, connect and pool timeouts. Read deadlines are the caller's.
Why not httpx: see `backends/openai_upstream.py` (per-event CPU and tail latency under concurrency).

Errors: ConnectFailed (refused/unreachable/TLS), ConnectTimeout, PoolTimeout, ConnectionLost
(the peer closed or sent garbage mid-response). All derive from TransportError.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httptools

_MAX_BUFFERED = 64  # body pieces held before we stop reading the socket (backpressure)


class TransportError(Exception):
    pass


class ConnectFailed(TransportError):
    pass


class ConnectTimeout(TransportError):
    pass


class PoolTimeout(TransportError):
    pass


class ConnectionLost(TransportError):
    pass


class _Connection(asyncio.Protocol):
    """One TCP connection; parses one response at a time with a parser that lives as long as it."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.idle_since = time.monotonic()
        self._reset()
        self.closed = False

    def _reset(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.pieces: deque[bytes] = deque()
        self.complete = False
        self.keep_alive = False
        self.error: TransportError | None = None
        self.got_bytes = False
        self.headers_done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiter: asyncio.Future[None] | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionLost(f"malformed response from upstream: {exc}"))
            if self.transport is not None:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        delimited = "content-length" in self.headers or "chunked" in self.headers.get("transfer-encoding", "")
        got_headers = self.headers_done.done() and not self.headers_done.cancelled() and self.headers_done.exception() is None
        if got_headers and not delimited:
            self.complete = True  # an HTTP/1.0-style body ends when the connection does
            self._wake()
        elif not self.complete:
            self._fail(ConnectionLost("upstream closed the connection mid-response"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if not self.headers_done.done():
            self.headers_done.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.pieces.append(bytes(body))
        if len(self.pieces) >= _MAX_BUFFERED and self.transport is not None:
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()
        self._wake()

    def _fail(self, error: TransportError) -> None:
        self.error = self.error or error
        if not self.headers_done.done():
            self.headers_done.set_exception(error)
            self.headers_done.exception()  # retrieved: nobody may be awaiting it yet
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next_piece(self) -> bytes | None:
        """The next body bytes, or None at the end of the response."""
        while True:
            if self.pieces:
                piece = self.pieces.popleft()
                if len(self.pieces) < _MAX_BUFFERED // 2 and self.transport is not None and not self.closed:
                    self.transport.resume_reading()
                return piece
            if self.complete:
                return None
            if self.error is not None:
                raise self.error
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter

    def take_buffered(self) -> bytes:
        """Every body byte received so far and not yet read, at once (b"" if none)."""
        if not self.pieces:
            return b""
        data = b"".join(self.pieces)
        self.pieces.clear()
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()
        return data

    def reusable(self, keepalive_expiry_s: float) -> bool:
        return (
            not self.closed
            and self.transport is not None
            and not self.transport.is_closing()
            and time.monotonic() - self.idle_since < keepalive_expiry_s
        )

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Response:
    """A response whose headers have arrived; the body is read with `aiter_bytes`/`aread`."""

    def __init__(self, pool: ConnectionPool, conn: _Connection) -> None:
        self._pool = pool
        self._conn: _Connection | None = conn
        self.status_code = conn.status
        self.headers = conn.headers

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        conn = self._conn
        assert conn is not None, "response already closed"
        while (piece := await conn.next_piece()) is not None:
            yield piece

    async def aread(self) -> bytes:
        return b"".join([p async for p in self.aiter_bytes()])

    def read_buffered(self) -> bytes:
        """The body bytes already received and not yet read (b"" if none); never waits."""
        conn = self._conn
        return conn.take_buffered() if conn is not None else b""

    def ready(self) -> bool:
        """True when the next read returns without waiting: body bytes are buffered, or the
        response has ended (or failed). A caller can skip arming a timeout for that read."""
        conn = self._conn
        return conn is not None and (bool(conn.pieces) or conn.complete or conn.error is not None)

    async def aclose(self) -> None:
        """Give the connection back (body fully read) or close it (aborts the upstream work)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool._release(conn)


class ConnectionPool:
    """Keep-alive connections to one origin, at most `max_connections` at a time."""

    def __init__(
        self,
        base_url: str,
        *,
        max_connections: int,
        connect_timeout_s: float,
        headers: dict[str, str] | None = None,
        keepalive_expiry_s: float = 30.0,
    ) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"base_url must be an http(s) URL, got {base_url!r}")
        self.host = url.hostname
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.base_path = url.path.rstrip("/")
        self._ssl = ssl.create_default_context() if url.scheme == "https" else None
        host_header = url.netloc.rpartition("@")[2]  # keeps [v6] brackets and an explicit port
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self._fixed_headers = f"host: {host_header}\r\n{extra}".encode("latin-1")
        self._connect_timeout_s = connect_timeout_s
        self._keepalive_expiry_s = keepalive_expiry_s
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: deque[_Connection] = deque()
        self._closed = False

    async def request(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> Response:
        """Send a request and wait for the response headers (bounded by the caller's deadline)."""
        if self._closed:
            raise ConnectFailed("connection pool is closed")
        if self._slots.locked():  # every connection busy: wait, bounded
            try:
                async with asyncio.timeout(self._connect_timeout_s):
                    await self._slots.acquire()
            except TimeoutError:
                raise PoolTimeout("no free upstream connection") from None
        else:
            await self._slots.acquire()  # free: returns at once (no timer to arm and cancel)
        try:
            head = self._head(method, path, body, headers)
            for _ in range(2):  # a reused connection may have died in the pool: retry once, fresh
                conn, reused = await self._checkout()
                assert conn.transport is not None
                conn.transport.write(head + body)
                try:
                    await conn.headers_done
                except ConnectionLost:
                    conn.close()
                    if reused and not conn.got_bytes:
                        continue
                    raise
                except BaseException:  # cancelled (the caller's deadline): the connection is unusable
                    conn.close()
                    raise
                return Response(self, conn)
            raise ConnectionLost("upstream closed the connection")  # pragma: no cover - loop returns or raises
        except BaseException:
            self._slots.release()
            raise

    def _head(self, method: str, path: str, body: bytes, headers: dict[str, str] | None) -> bytes:
        target = f"{self.base_path}/{path.lstrip('/')}"
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        return f"{method} {target} HTTP/1.1\r\n".encode() + self._fixed_headers + f"{extra}content-length: {len(body)}\r\n\r\n".encode("latin-1")

    async def _checkout(self) -> tuple[_Connection, bool]:
        while self._idle:
            conn = self._idle.pop()  # most recently used: warmest, least likely to have expired
            if conn.reusable(self._keepalive_expiry_s):
                conn._reset()
                return conn, True
            conn.close()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                _, conn = await loop.create_connection(_Connection, self.host, self.port, ssl=self._ssl)
        except TimeoutError:
            raise ConnectTimeout("timed out connecting to upstream") from None
        except (OSError, ssl.SSLError) as exc:
            raise ConnectFailed(f"cannot connect to upstream: {exc.strerror or exc}") from None
        return conn, False

    def _release(self, conn: _Connection) -> None:
        if conn.complete and conn.keep_alive and not conn.closed and not self._closed:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.close()
        self._slots.release()

    async def aclose(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop().close()
