"""Usage audit store: one SQLite row per request, durable before the response completes.

    store = AuditStore(settings.audit)
    await store.start()                       # open db, migrate, seed quota totals, start writer
    await store.check_quota(principal)        # admission: raises QuotaExhausted (-> 429)
    await store.record(AuditRecord(...))      # before the last byte of the response is sent
    await store.flush()                       # wait until every row so far is in SQLite
    store.health(), store.stats()             # /ready detail, /metrics gauges and counters
    await store.close()                       # flush everything, stop the writer

`record()` appends the row to this process's spool file (gateway/audit_spool.py: one write(2),
the same durability as a WAL commit with synchronous=NORMAL, so `kill -9` of the gateway cannot
lose a row a client saw acknowledged) and hands it to a single writer thread
(gateway/audit_writer.py) that commits everything queued in one transaction (group commit),
off the request path. After a crash the next start replays the spool. With
`synchronous = "full"` there is no spool: `record()` waits for the fsynced group commit.

If the database cannot be written (disk full, locked by another process) the rows stay queued
in memory (bounded by `audit.buffer_rows`; past it they are dropped from memory but stay in the
spool, replayed at the next start) and the writer retries until it recovers. Without a spool
`record()` still returns, after at most `commit_wait_s`, or at once while the store is known to
be failing. That state is loud: error logs, `stats()` counters and `health()["ok"] = False`.
If the spool itself cannot be written, rows take the waiting path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from gateway.audit_checkpoint import WRITER_CHECKPOINT_PAGES, Checkpointer
from gateway.audit_queries import quota_seed_rows
from gateway.audit_quota import QuotaExhausted, QuotaTracker
from gateway.audit_schema import AuditRecord, connect
from gateway.audit_spool import Spool, recover, spool_dir
from gateway.audit_writer import AuditWriter, insert_rows
from gateway.settings import AuditSettings
from policies.auth import Principal

__all__ = ["AuditRecord", "AuditStore", "QuotaExhausted"]

log = logging.getLogger("aibox.audit")


def recover_spools(db: Any, path: str | Path) -> int:
    """Replay the spools a crashed gateway left next to the database at `path` (best effort:
    a database that cannot be written now keeps them for the next try)."""
    try:
        return recover(db.conn, spool_dir(path), insert_rows)
    except Exception as exc:
        log.error("audit: could not replay the spool in %s (%s); it is kept for the next start", spool_dir(path), exc)
        return 0


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
        self._spool: Spool | None = None
        self._num_wait_timeouts = 0
        self._num_dropped_closed = 0
        self._num_spool_failures = 0
        self._last_spool_log = 0.0
        self.num_recovered = 0

    async def start(self) -> None:
        """Open (or create and migrate) the database, seed quota totals, start the writer."""
        db = await asyncio.to_thread(
            connect, self.path, synchronous=self.settings.synchronous, busy_timeout_ms=self._busy_timeout_ms
        )
        self.num_recovered = await asyncio.to_thread(recover_spools, db, self.path)  # before seeding quotas
        # Totals of every tenant and subject, quotas or not (~26 ms at 1M rows): a reload may add quotas.
        self.quotas.seed(await asyncio.to_thread(quota_seed_rows, db, self._clock()))
        # Checkpoints run on their own thread; the writer checkpoints only as a backstop when a
        # sustained burst keeps the WAL from ever being fully copied (see audit_checkpoint.py).
        db.execute(f"PRAGMA wal_autocheckpoint = {WRITER_CHECKPOINT_PAGES}")
        db.execute("PRAGMA journal_size_limit = 67108864")  # shrink the WAL file back after a burst
        self._writer = AuditWriter(
            db, buffer_rows=self.settings.buffer_rows, retention_days=self.settings.retention_days, clock=self._clock
        )
        self._checkpointer = Checkpointer(self.path, busy_timeout_ms=self._busy_timeout_ms)
        self._checkpointer.start()
        if self.settings.synchronous != "full":  # "full" waits for the fsynced commit instead
            spool = Spool(spool_dir(self.path))
            try:
                await asyncio.to_thread(spool.open)
            except OSError as exc:  # unwritable folder, no flock (some network file systems)
                log.error("audit spool %s cannot be opened (%s); requests wait for their commits instead", spool.directory, exc)
            else:
                self._spool = self._writer.spool = spool
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

    async def record(self, row: AuditRecord) -> bool:
        """Store one request's row; True once it is durable (in the spool, or committed),
        False if it is only buffered in memory.

        With the spool this never waits. Without it (synchronous=full, or the spool failing)
        it waits for the group commit (typically well under a millisecond), at most
        `commit_wait_s`; while the store is failing it does not wait at all.
        """
        if not self.settings.store_content and (row.request_content is not None or row.response_content is not None):
            row = msgspec.structs.replace(row, request_content=None, response_content=None)
        self.quotas.add(row.tenant, row.subject, row.ts, row.prompt_tokens + row.completion_tokens)
        writer = self._writer
        if writer is None or not writer.is_alive():
            self._num_dropped_closed += 1
            log.error("audit store is not running: row for request %s dropped", row.request_id)
            return False
        spool = self._spool
        if spool is not None:
            try:
                segment = spool.append(row)
            except (OSError, TypeError, ValueError, OverflowError, msgspec.EncodeError) as exc:  # disk full; not JSON
                self._spool_failed(row, exc)
            else:
                writer.submit(row, None, segment)  # durable already: the commit happens off the request path
                return True
        if writer.failing_since is not None:
            writer.submit(row, None)  # buffered; the writer retries it
            return False
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

    def _spool_failed(self, row: AuditRecord, exc: Exception) -> None:
        self._num_spool_failures += 1
        now = time.monotonic()
        if now - self._last_spool_log >= 10.0:
            self._last_spool_log = now
            log.error("audit spool cannot be written (%s: %s); request %s waits for the database commit instead "
                      "(%d such rows so far)", type(exc).__name__, exc, row.request_id, self._num_spool_failures)  # fmt: skip

    async def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every row recorded so far is committed (or given up); False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self._writer is not None and self._writer.queue_depth:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.002)
        return True

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
            detail = (f"{w.num_dropped} rows dropped from memory after the buffer filled ({w.last_error}); "
                      "spooled ones are replayed at the next start")  # fmt: skip
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
            "spool_failures": self._num_spool_failures,
            "rows_recovered": self.num_recovered,
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
        w.set_stop_deadline(time.monotonic() + self._close_timeout_s)
        w.stop()
        await asyncio.to_thread(w.join, self._close_timeout_s + 5)
        if self._checkpointer is not None:
            await asyncio.to_thread(self._checkpointer.stop)
            self._checkpointer = None
        if w.queue_depth:
            log.error("audit store closed with %d rows not written (%s)", w.queue_depth, w.last_error)
        spool, self._spool = self._spool, None
        if spool is not None:  # removes its files when every row is committed; else keeps them for replay
            spool.close(writer_alive=w.is_alive())
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
