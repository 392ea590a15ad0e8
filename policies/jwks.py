"""A cached JSON Web Key Set (from a file or a URL) for verifying asymmetric JWTs.

Keys are looked up by `kid`. The set is reloaded when it is older than `refresh_s`, and an
unknown `kid` triggers a reload at most once per `refresh_s` (so a flood of tokens with random
key ids cannot hammer the identity provider). A failed reload keeps the last good set.

Nothing blocks the event loop: `load()` runs once at construction (startup), and every later
reload runs on a refresh thread. A stale set is refreshed in the background while the cached
keys keep serving. A token whose `kid` is unknown while a reload is allowed raises
`RefreshNeeded`: the async caller awaits `refresh()` (the same reload, shared by every request
that asked) and verifies again, so a key rotated in at the identity provider is picked up
without a blocking fetch and without failing the requests that first carry it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt

from gateway.settings import ConfigError

log = logging.getLogger("aibox.auth.jwks")

_MAX_JWKS_BYTES = 1_000_000
REFRESH_WAIT_S = 5.0  # a request with an unknown kid waits at most this long for the reload


def _fetch_url(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=3.0) as resp:  # noqa: S310 (admin-configured URL)
        return resp.read(_MAX_JWKS_BYTES)


class RefreshNeeded(Exception):
    """Unknown `kid` and a reload is allowed or running: await `JwksCache.refresh()`, then retry."""


class JwksCache:
    """kid -> verification key, refreshed lazily and rate-limited."""

    def __init__(
        self,
        *,
        file: str | None = None,
        url: str | None = None,
        refresh_s: float = 300.0,
        fetch: Callable[[str], bytes] = _fetch_url,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not file and not url:
            raise ConfigError("auth: a JWKS needs auth.jwks_file or auth.jwks_url")
        self.file, self.url, self.refresh_s = file, url, refresh_s
        self._fetch, self._clock = fetch, clock
        self._keys: dict[str | None, tuple[str | None, Any]] = {}
        self._loaded_at = float("-inf")
        self.num_loads = 0
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None  # created on the first reload
        self._inflight: Future[None] | None = None
        self._closed = False
        try:
            self.load()
        except (OSError, ValueError, jwt.PyJWTError) as exc:
            raise ConfigError(f"auth: cannot load the JWKS from {self.file or 'auth.jwks_url'}: {exc}") from None

    def load(self) -> None:
        """(Re)read the key set now; raises on failure (callers decide what to keep)."""
        self._loaded_at = self._clock()  # also on failure: that counts against the refresh budget
        raw = Path(self.file).read_bytes() if self.file else self._fetch(self.url or "")
        doc = json.loads(raw)
        keys: dict[str | None, tuple[str | None, Any]] = {}
        for entry in doc.get("keys", []) if isinstance(doc, dict) else []:
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
                continue
            try:
                key = jwt.PyJWK(entry).key
            except jwt.PyJWTError:
                continue  # skip keys we cannot use (unknown kty/crv)
            keys[entry.get("kid")] = (entry.get("alg"), key)
        if not keys:
            raise ValueError("the key set has no usable signing keys")
        self._keys = keys
        self.num_loads += 1

    def _reload_logged(self) -> None:
        try:
            self.load()
        except Exception as exc:  # noqa: BLE001 - any failure (HTTP, JSON, keys) keeps the cached set
            log.warning("JWKS reload failed (keeping %d cached keys): %s: %s", len(self._keys), type(exc).__name__, exc)

    def _start_reload(self) -> Future[None] | None:
        """The running reload, else a new one if the set is older than `refresh_s`, else None."""
        with self._lock:
            if self._closed:
                return None
            if self._inflight is not None and not self._inflight.done():
                return self._inflight
            if self._clock() - self._loaded_at < self.refresh_s:
                return None
            self._loaded_at = self._clock()  # a failed reload also spends the interval's budget
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aibox-jwks")
            self._inflight = self._executor.submit(self._reload_logged)
            return self._inflight

    async def refresh(self, timeout_s: float = REFRESH_WAIT_S) -> None:
        """Wait (at most `timeout_s`) for the running or a newly allowed reload; at once if none."""
        reload = self._start_reload()
        if reload is not None:
            try:  # shielded: one waiter giving up must not cancel the reload the others share
                await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(reload)), timeout_s)
            except TimeoutError:
                log.warning("JWKS reload still running after %.1fs; verifying with the cached keys", timeout_s)

    def key_for(self, kid: str | None, alg: str) -> Any:
        """The key for `kid` usable with `alg`, or None. A lone key serves tokens without kid.

        Never blocks: a stale set is refreshed in the background; an unknown `kid` raises
        RefreshNeeded while a reload is allowed or running."""
        reload = self._start_reload()  # stale set: refresh in the background, serve the cached keys
        found = self._lookup(kid)
        if found is None and kid is not None and reload is not None:
            raise RefreshNeeded(kid)
        if found is None:
            return None
        key_alg, key = found
        if key_alg is not None and key_alg != alg:
            return None  # the key is pinned to another algorithm
        return key

    def close(self) -> None:
        with self._lock:
            self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=False)

    def _lookup(self, kid: str | None) -> tuple[str | None, Any] | None:
        if kid is None:
            return next(iter(self._keys.values())) if len(self._keys) == 1 else None
        return self._keys.get(kid)
