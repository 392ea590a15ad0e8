"""Deny list of revoked token ids (`jti`), kept in a small SQLite file.

`aibox token revoke JTI` writes a row; every running gateway reads the file. Checking a token
must not touch SQLite: `RevocationList.is_revoked` answers from an in-memory set and, at most
every `poll_s`, `stat()`s the file. The set is reloaded when the file's identity (inode, size,
mtime) changed, or while its mtime is recent: two writes inside one coarse mtime tick that leave
the size unchanged would otherwise be missed. A revoke is thus visible within `poll_s` (+ the
reload), well inside the promised second.

The file uses SQLite's rollback journal (not WAL) so that every commit updates the main file's
mtime, which is what the pollers watch.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("aibox.auth.revocation")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS revoked (
    jti TEXT PRIMARY KEY,
    revoked_at REAL NOT NULL,
    reason TEXT
)
"""
# While the file changed less than this long ago, reload on every poll (see module docstring).
_RECENT_WRITE_S = 2.0


class RevocationList:
    """Read side (cached, polled) and write side of the deny list at `path`."""

    def __init__(self, path: str | Path, *, poll_s: float = 0.25, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path)
        self.poll_s = poll_s
        self._clock = clock
        self._revoked: frozenset[str] = frozenset()
        self._signature: tuple[int, int, int] | None = None
        self._next_check = float("-inf")
        self.num_reloads = 0

    # ------------------------------------------------------------------ read side
    def is_revoked(self, jti: str) -> bool:
        """True when `jti` is on the deny list (as of at most `poll_s` ago)."""
        now = self._clock()
        if now >= self._next_check:
            self._next_check = now + self.poll_s
            self._refresh()
        return jti in self._revoked

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._revoked, self._signature = frozenset(), None
            return
        except OSError as exc:  # keep the last known list rather than failing every request
            log.warning("cannot stat revocation list %s: %s", self.path, exc.strerror)
            return
        signature = (st.st_ino, st.st_size, st.st_mtime_ns)
        recently_written = time.time() - st.st_mtime < _RECENT_WRITE_S
        if signature == self._signature and not recently_written:
            return
        try:
            self._revoked = frozenset(self._read_all())
        except sqlite3.Error as exc:
            log.warning("cannot read revocation list %s: %s (keeping %d cached entries)", self.path, exc, len(self._revoked))
            return
        self._signature = signature
        self.num_reloads += 1

    def _read_all(self) -> list[str]:
        con = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=1.0)
        try:
            return [row[0] for row in con.execute("SELECT jti FROM revoked")]
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []
            raise
        finally:
            con.close()

    # ------------------------------------------------------------------ write side
    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(self.path, timeout=5.0)
        con.execute("PRAGMA journal_mode=DELETE")
        con.execute(_SCHEMA)
        return con

    def revoke(self, jti: str, reason: str | None = None) -> bool:
        """Add `jti` to the deny list; False when it was already there."""
        if not jti:
            raise ValueError("jti must be a non-empty string")
        con = self._connect()
        try:
            with con:
                cur = con.execute(
                    "INSERT OR IGNORE INTO revoked (jti, revoked_at, reason) VALUES (?, ?, ?)", (jti, time.time(), reason)
                )
            return cur.rowcount == 1
        finally:
            con.close()

    def entries(self) -> list[tuple[str, float, str | None]]:
        """All revoked ids with their revocation time and reason, oldest first."""
        if not self.path.exists():
            return []
        con = self._connect()
        try:
            return list(con.execute("SELECT jti, revoked_at, reason FROM revoked ORDER BY revoked_at"))
        finally:
            con.close()


def revocation_path(auth_revocation_path: str | None, audit_path: str) -> Path:
    """Where the deny list lives: `auth.revocation_path`, else beside the audit database."""
    if auth_revocation_path:
        return Path(auth_revocation_path)
    return Path(audit_path).resolve().parent / "aibox-revocations.db"
