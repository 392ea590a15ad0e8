"""A cached JSON Web Key Set (from a file or a URL) for verifying asymmetric JWTs.

Keys are looked up by `kid`. The set is reloaded when it is older than `refresh_s`, and an
unknown `kid` triggers a reload at most once per `refresh_s` (so a flood of tokens with random
key ids cannot hammer the identity provider). A failed reload keeps the last good set.

The URL fetch is synchronous with a short timeout and happens at most once per `refresh_s`;
`load()` is called at construction so the first request never waits on the network.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt

from gateway.settings import ConfigError

log = logging.getLogger("aibox.auth.jwks")

_MAX_JWKS_BYTES = 1_000_000


def _fetch_url(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=3.0) as resp:  # noqa: S310 (admin-configured URL)
        return resp.read(_MAX_JWKS_BYTES)


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

    def _maybe_reload(self) -> None:
        if self._clock() - self._loaded_at < self.refresh_s:
            return
        try:
            self.load()
        except (OSError, ValueError, jwt.PyJWTError) as exc:
            log.warning("JWKS reload failed (keeping %d cached keys): %s", len(self._keys), exc)

    def key_for(self, kid: str | None, alg: str) -> Any:
        """The key for `kid` usable with `alg`, or None. A lone key serves tokens without kid."""
        self._maybe_reload()  # stale set: refresh (rate-limited)
        found = self._lookup(kid)
        if found is None and kid is not None:
            self._maybe_reload()  # unknown kid: at most one refresh per interval
            found = self._lookup(kid)
        if found is None:
            return None
        key_alg, key = found
        if key_alg is not None and key_alg != alg:
            return None  # the key is pinned to another algorithm
        return key

    def _lookup(self, kid: str | None) -> tuple[str | None, Any] | None:
        if kid is None:
            return next(iter(self._keys.values())) if len(self._keys) == 1 else None
        return self._keys.get(kid)
