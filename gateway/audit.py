"""Usage audit store: one SQLite row per request, committed before the response completes.

    store = AuditStore(settings.audit)
    await store.start()                       # open db, migrate, seed quota totals, start writer
    await store.check_quota(principal)        # admission: raises QuotaExhausted (-> 429)
    await store.record(AuditRecord(...))      # before the last byte of the response is sent
    store.health(), store.stats()             # /ready detail, /metrics gauges and counters
    await store.close()                       # flush everything, stop the writer

`record()` hands the row to a single writer thread (gateway/audit_writer.py) that commits
everything queued in one transaction (group commit) and resolves the waiting requests; when
that writer is idle the loop commits the lone row itself (`AuditWriter.commit_inline`). A row
acknowledged to a client is in the WAL, so `kill -9` of the gateway cannot lose it (see
gateway/audit_schema.py for the synchronous=NORMAL reasoning). If the database cannot be
written (disk full, locked by another process) `record()` still returns, after at most
`commit_wait_s`, or at once while the store is known to be failing; the rows stay queued in
memory (bounded by `audit.buffer_rows`) and the writer retries until it recovers. That state
is loud: error logs, `stats()` counters and `health()["ok"] = False`.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from gateway.audit_checkpoint import WRITER_CHECKPOINT_PAGES, Checkpointer
from gateway.audit_queries import quota_seed_rows
from gateway.audit_quota import QuotaExhausted, QuotaTracker
from gateway.audit_schema import AuditRecord, connect
from gateway.audit_writer import AuditWriter
from gateway.settings import AuditSettings
from policies.auth import Principal

__all__ = ["AuditRecord", "AuditStore", "QuotaExhausted"]

log = logging.getLogger("aibox.audit")


def _inline_connection(path: Path) -> sqlite3.Connection:
    """The event loop's own write connection: never waits for a lock, never checkpoints (the
    checkpointer thread does), same durability as the writer's (WAL, synchronous=NORMAL)."""
    conn = sqlite3.connect(str(path), check_same_thread=False, timeout=0)
    conn.execute("PRAGMA busy_timeout = 0")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    conn.execute("PRAGMA journal_size_limit = 67108864")  # as the writer's, should it restart the WAL
    conn.execute("PRAGMA cache_size = -16384")
    return conn


def _expire(fut: asyncio.Future[bool]) -> None:
    if not fut.done():
        fut.set_result(False)


class AuditStore:
    """The gateway's handle on the audit database; see the module docstring."""

    def __init__(
        self,
        settings: AuditSettings,
        *,
        clock: Callable[[], float] = time.time,
        commit_wait_s: float = 2.0,
        busy_timeout_ms: int = 5000,
        close_timeout_s: float = 10.0,
    ) -> None:
        self.settings = settings
        self.path = Path(settings.path)
        self._clock = clock
        self._commit_wait_s = commit_wait_s
        self._busy_timeout_ms = busy_timeout_ms
        self._close_timeout_s = close_timeout_s
        self.quotas = QuotaTracker(settings.tenant_quotas, settings.subject_quotas, clock)
        self._writer: AuditWriter | None = None
        self._checkpointer: Checkpointer | None = None
        self._num_wait_timeouts = 0
        self._num_dropped_closed = 0

    async def start(self) -> None:
        """Open (or create and migrate) the database, seed quota totals, start the writer."""
        db = await asyncio.to_thread(
            connect, self.path, synchronous=self.settings.synchronous, busy_timeout_ms=self._busy_timeout_ms
        )
        # Totals of every tenant and subject, quotas or not (~26 ms at 1M rows): a reload may add quotas.
        self.quotas.seed(await asyncio.to_thread(quota_seed_rows, db, self._clock()))
        # Checkpoints run on their own thread; the writer checkpoints only as a backstop when a
        # sustained burst keeps the WAL from ever being fully copied (see audit_checkpoint.py).
        db.execute(f"PRAGMA wal_autocheckpoint = {WRITER_CHECKPOINT_PAGES}")
        db.execute("PRAGMA journal_size_limit = 67108864")  # shrink the WAL file back after a burst
        self._writer = AuditWriter(
            db, buffer_rows=self.settings.buffer_rows, retention_days=self.settings.retention_days, clock=self._clock
        )
        self._checkpointer = Checkpointer(
            self.path, busy_timeout_ms=self._busy_timeout_ms, on_backfilled=self._writer.wal_backfilled
        )
        self._checkpointer.start()
        if self.settings.synchronous != "full":  # an inline fsync would stall the event loop
            self._writer.inline_conn = _inline_connection(self.path)
        self._writer.start()
        log.info("audit store at %s (synchronous=%s)", self.path, self.settings.synchronous)

    def update_quotas(self, settings: AuditSettings) -> None:
        """Apply the quota tables of a reloaded config (the totals carry on)."""
        self.settings = msgspec.structs.replace(
            self.settings, tenant_quotas=settings.tenant_quotas, subject_quotas=settings.subject_quotas
        )
        self.quotas.set_quotas(settings.tenant_quotas, settings.subject_quotas)

    async def check_quota(self, principal: Principal) -> None:
        """Raise QuotaExhausted if the principal's tenant or subject is out of tokens."""
        self.quotas.check(principal.tenant, principal.subject)

    async def record(self, row: AuditRecord, *, alone: bool = False) -> bool:
        """Store one request's row; return True once committed, False if it is only buffered.

        Waits for the group commit (typically well under a millisecond), at most
        `commit_wait_s`; while the store is failing it does not wait at all. `alone`: the
        caller knows no other request is in flight, so the row may be committed right here on
        the loop when the writer is idle (a lone request's ~0.1 ms commit then delays nobody;
        concurrent requests keep the group commit, which is cheaper per row).
        """
        if not self.settings.store_content and (row.request_content is not None or row.response_content is not None):
            row = msgspec.structs.replace(row, request_content=None, response_content=None)
        self.quotas.add(row.tenant, row.subject, row.ts, row.prompt_tokens + row.completion_tokens)
        writer = self._writer
        if writer is None or not writer.is_alive():
            self._num_dropped_closed += 1
            log.error("audit store is not running: row for request %s dropped", row.request_id)
            return False
        if writer.failing_since is not None:
            writer.submit(row, None)  # buffered; the writer retries it
            return False
        if alone and writer.commit_inline(row):  # no thread hand-offs
            return True
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        if not writer.submit(row, (loop, fut)):
            return False
        # A timer rather than asyncio.wait_for: no extra task on the hot path.
        timer = loop.call_later(self._commit_wait_s, _expire, fut)
        try:
            committed = await fut
        finally:
            timer.cancel()
        if not committed:
            self._num_wait_timeouts += 1
        return committed

    def health(self) -> dict[str, Any]:
        """Readiness detail for /ready.

        `ok` is False only when the writer has stopped: while commits fail the gateway keeps
        serving (rows are buffered), so `failing` and `detail` say so loudly instead of
        taking the instance out of rotation.
        """
        w = self._writer
        if w is None:
            return {"ok": False, "detail": "audit store not started"}
        failing_for = None if w.failing_since is None else round(time.monotonic() - w.failing_since, 1)
        ok = w.is_alive()
        detail = "ok"
        if not w.is_alive():
            detail = "audit writer stopped"
        elif failing_for is not None:
            detail = f"cannot commit for {failing_for}s ({w.last_error}); {w.queue_depth} rows buffered"
        elif w.num_dropped:
            detail = f"{w.num_dropped} rows dropped after the buffer filled ({w.last_error})"
        return {
            "ok": ok,
            "failing": failing_for is not None,
            "detail": detail,
            "queue_depth": w.queue_depth,
            "failing_for_s": failing_for,
            "rows_dropped": w.num_dropped,
            "last_error": w.last_error,
        }

    def stats(self) -> dict[str, float | int]:
        """Counters and gauges for /metrics (all numbers)."""
        w = self._writer
        if w is None:
            return {}
        return {
            "rows_written": w.num_rows_written,
            "batches": w.num_batches,
            "inline_commits": w.num_inline_commits,
            "commit_failures": w.num_failures,
            "rows_dropped": w.num_dropped + self._num_dropped_closed,
            "rows_rejected": w.num_rejected,
            "rows_pruned": w.num_pruned,
            "commit_wait_timeouts": self._num_wait_timeouts,
            "queue_depth": w.queue_depth,
            "writer_lag_s": w.oldest_wait_s(),
            "last_commit_ms": w.last_commit_ms,
            "max_batch_rows": w.max_batch_rows,
            "failing": int(w.failing_since is not None),
            "wal_checkpoints": self._checkpointer.num_checkpoints if self._checkpointer else 0,
            "wal_frames": self._checkpointer.wal_frames if self._checkpointer else 0,
        }

    async def close(self) -> None:
        """Flush every queued row (retrying up to close_timeout_s if failing) and stop."""
        w, self._writer = self._writer, None
        if w is None:
            return
        inline, w.inline_conn = w.inline_conn, None
        if inline is not None:
            inline.close()
        w.set_stop_deadline(time.monotonic() + self._close_timeout_s)
        w.stop()
        await asyncio.to_thread(w.join, self._close_timeout_s + 5)
        if self._checkpointer is not None:
            await asyncio.to_thread(self._checkpointer.stop)
            self._checkpointer = None
        if w.queue_depth:
            log.error("audit store closed with %d rows not written (%s)", w.queue_depth, w.last_error)
        await asyncio.to_thread(self._close_db, w)

    @staticmethod
    def _close_db(w: AuditWriter) -> None:
        if w.is_alive():
            return  # still blocked in SQLite; the daemon thread dies with the process
        try:
            w.db.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            w.db.conn.close()
        except Exception as exc:  # closing is best effort; the WAL is replayed on next open
            log.warning("audit store close: %s", exc)
