"""The audit store's single writer thread: group commit, retry while failing, retention.

Requests hand rows to `submit()`; the thread takes everything queued, writes it and its
daily rollups in one transaction, commits, then wakes each waiting request on its event loop.
Under load this is many rows per commit. When the writer is idle, `commit_inline()` lets the
event loop commit a row itself on a second connection instead: a lone request then skips two
thread hand-offs (wake the writer, wake the loop), which cost more than the ~0.1 ms commit.
That connection never waits on a lock (busy_timeout 0): if the writer, a checkpoint backstop,
retention or another process holds the database, the row goes to the writer's queue instead.

When a commit fails with an operational error (disk full, database locked by another
process, I/O error) the batch goes back to the head of the queue and is retried with backoff,
so nothing is lost while memory lasts: the queue is bounded by `buffer_rows`, and rows past
that bound are dropped *and counted* (stats, health, error log). A row that cannot be
encoded at all (a bug upstream) is isolated and dropped with an error log, so it cannot
wedge the queue.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import sqlite_utils
from msgspec.structs import astuple

from gateway.audit_queries import prune
from gateway.audit_schema import INSERT_SQL, ROLLUPS, UPSERT_SQL, utc_day

log = logging.getLogger("aibox.audit")

MAX_BATCH_ROWS = 10_000  # bounds one transaction's duration (and WAL growth) under a burst
LOG_EVERY_S = 10.0  # repeated-failure logs: loud but not one line per request
RETENTION_EVERY_S = 3600.0
RETENTION_BATCH_ROWS = 2000

_FINEST = ROLLUPS["daily_usage"]
_PROJECTIONS = {table: [_FINEST.index(k) for k in keys] for table, keys in ROLLUPS.items()}

# (record, enqueue time, waiter) ; waiter is (loop, future) for a request awaiting the commit
Item = tuple[Any, float, "tuple[asyncio.AbstractEventLoop, asyncio.Future[bool]] | None"]


def _resolve(futures: list[asyncio.Future[bool]], ok: bool) -> None:
    for fut in futures:
        if not fut.done():  # the request may have stopped waiting (timeout, disconnect)
            fut.set_result(ok)


class AuditWriter(threading.Thread):
    """Owns the write connection; everything else talks to it through `submit()`."""

    def __init__(
        self,
        db: sqlite_utils.Database,
        *,
        buffer_rows: int,
        retention_days: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(name="aibox-audit-writer", daemon=True)
        self.db = db
        self._buffer_rows = buffer_rows
        self._retention_days = retention_days
        self._clock = clock
        self._cond = threading.Condition()
        self._queue: deque[Item] = deque()
        self._num_in_flight = 0
        self._stopping = False
        self._next_retention = 0.0  # run retention soon after start
        self._stop_deadline: float | None = None  # while failing at shutdown, retry until then
        # stats (written by the writer thread, read by anyone: ints and floats are atomic enough)
        self.num_rows_written = 0
        self.num_batches = 0
        self.num_failures = 0
        self.num_dropped = 0
        self.num_rejected = 0
        self.num_pruned = 0
        self.max_batch_rows = 0
        self.last_commit_ms = 0.0
        self.failing_since: float | None = None
        self.last_error: str | None = None
        self._last_drop_log = 0.0
        self._last_fail_log = 0.0
        self.inline_conn: sqlite3.Connection | None = None  # set by the store; used from the loop only
        self.num_inline_commits = 0
        # The next commit restarts the WAL (it was fully checkpointed; also true at start) and so
        # fsyncs: that one goes through this thread, never inline on the event loop.
        self.wal_restart_due = True

    # ------------------------------------------------------------------ called from the loop
    def submit(self, record: Any, waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future[bool]] | None) -> bool:
        """Queue a row; False if the buffer is full and the row was dropped (and counted)."""
        with self._cond:
            if len(self._queue) + self._num_in_flight >= self._buffer_rows:
                self.num_dropped += 1
                now = time.monotonic()
                if now - self._last_drop_log >= LOG_EVERY_S:
                    self._last_drop_log = now
                    log.error(
                        "audit buffer full (%d rows): dropping rows; %d dropped so far (last error: %s)",
                        self._buffer_rows, self.num_dropped, self.last_error,
                    )  # fmt: skip
                return False
            self._queue.append((record, time.monotonic(), waiter))
            self._cond.notify()
        return True

    def commit_inline(self, record: Any) -> bool:
        """Commit one row on the calling thread if the writer is idle; False: not written, submit() it.

        Only when nothing is queued or being written (so rows are never reordered behind a
        batch, and under load the group commit keeps its batching) and the store is healthy.
        """
        conn = self.inline_conn
        if conn is None or self.wal_restart_due or self.failing_since is not None or self._stopping:
            return False
        with self._cond:  # the writer pops a batch and marks it in flight under this lock
            if self._queue or self._num_in_flight:
                return False
        start = time.perf_counter()
        try:
            conn.execute("BEGIN IMMEDIATE")  # fails at once (SQLITE_BUSY) if anyone else is writing
            self._insert([(record, 0.0, None)], conn)
            conn.commit()
        except (sqlite3.Error, TypeError, ValueError, OverflowError):
            try:  # busy, full, I/O or a bad row: the writer owns retries, isolation and the logs
                conn.rollback()
            except sqlite3.Error:
                pass
            return False
        with self._cond:
            self.num_rows_written += 1
            self.num_batches += 1
            self.num_inline_commits += 1
            self.max_batch_rows = max(self.max_batch_rows, 1)
            self.last_commit_ms = (time.perf_counter() - start) * 1000
        return True

    def wal_backfilled(self) -> None:
        """The checkpointer copied every WAL frame: send the next commit (a WAL restart) here."""
        self.wal_restart_due = True

    def stop(self) -> None:
        """Ask the thread to drain the queue and exit."""
        with self._cond:
            self._stopping = True
            self._cond.notify()

    @property
    def queue_depth(self) -> int:
        return len(self._queue) + self._num_in_flight

    def oldest_wait_s(self) -> float:
        """Age of the oldest row not yet committed (0 when the queue is empty)."""
        try:
            return max(0.0, time.monotonic() - self._queue[0][1])
        except IndexError:
            return 0.0

    # ------------------------------------------------------------------ the thread
    def run(self) -> None:
        try:
            self._loop()
        except BaseException:  # a bug: say so where operators look; health() turns not ok
            log.critical("audit writer thread crashed; %d rows not written", self.queue_depth, exc_info=True)
            raise

    def _loop(self) -> None:
        backoff = 0.0
        while True:
            with self._cond:
                while not self._queue and not self._stopping and not self._retention_due():
                    self._cond.wait(timeout=self._retention_wait())
                if backoff:
                    self._cond.wait(timeout=backoff)  # failing: pause before the retry (stop() cuts it short once)
                if not self._queue and self._stopping:
                    return
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), MAX_BATCH_ROWS))]
                self._num_in_flight = len(batch)
            if self._retention_due() and not self._stopping and not backoff:
                self._run_retention()
            if batch:
                ok = self._write(batch)
                with self._cond:
                    self._num_in_flight = 0
                    if not ok:
                        self._queue.extendleft(reversed(batch))  # retry first, keep order
                backoff = 0.0 if ok else min(1.0, max(0.05, backoff * 2))
                if not ok and self._stopping and self._stop_deadline_passed():
                    return

    def _write(self, batch: list[Item]) -> bool:
        start = time.perf_counter()
        try:
            self._insert(batch)
            self.db.conn.commit()
        except sqlite3.OperationalError as exc:  # full, locked, I/O: transient, retry
            self._rollback()
            self._failed(exc, len(batch))
            return False
        except (sqlite3.Error, TypeError, ValueError, OverflowError) as exc:
            self._rollback()
            log.error("audit batch could not be encoded (%s); writing its rows one by one", exc)
            return self._write_one_by_one(batch)
        self.last_commit_ms = (time.perf_counter() - start) * 1000
        self.wal_restart_due = False
        self._committed(batch)
        return True

    def _write_one_by_one(self, batch: list[Item]) -> bool:
        """Isolate rows that cannot be stored: each row (and its rollup increments) goes in
        under its own savepoint, inside one transaction for the batch."""
        conn = self.db.conn
        good: list[Item] = []
        bad: list[Item] = []
        try:
            conn.execute("BEGIN")
            for item in batch:
                conn.execute("SAVEPOINT audit_row")
                try:
                    self._insert([item])
                    good.append(item)
                except (sqlite3.IntegrityError, sqlite3.InterfaceError, sqlite3.ProgrammingError, TypeError, ValueError,
                        OverflowError) as exc:  # fmt: skip
                    conn.execute("ROLLBACK TO audit_row")
                    bad.append(item)
                    self.num_rejected += 1
                    log.error("audit row rejected and dropped (request_id=%r): %s", getattr(item[0], "request_id", None), exc)
                conn.execute("RELEASE audit_row")
            conn.commit()
        except sqlite3.Error as exc:  # locked, full, I/O: retry the whole batch later
            self._rollback()
            self._failed(exc, len(batch))
            return False
        self._committed(good)
        self._notify(bad, ok=False)
        return True

    def _insert(self, batch: list[Item], conn: sqlite3.Connection | None = None) -> None:
        """The rows and their rollup increments, inside the current transaction."""
        rows, rollups = self._encode(batch)
        conn = conn or self.db.conn
        conn.executemany(INSERT_SQL, rows)
        for table, values in rollups.items():
            conn.executemany(UPSERT_SQL[table], values)

    @staticmethod
    def _encode(batch: list[Item]) -> tuple[list[tuple[Any, ...]], dict[str, list[tuple[Any, ...]]]]:
        rows = []
        fine: dict[tuple[Any, ...], list[float]] = {}
        days: dict[int, str] = {}  # a batch spans one or two UTC days: format each once
        for record, _, _ in batch:
            model = record.model_served or record.model_requested
            rows.append((*astuple(record), model))
            day_num = int(record.ts // 86400)
            day = days.get(day_num) or days.setdefault(day_num, utc_day(record.ts))
            key = (day, record.tenant or "", record.subject, model or "", record.deployment or "", record.status)
            agg = fine.get(key)
            if agg is None:
                agg = fine[key] = [0, 0, 0, 0, 0.0, 0.0, 0]
            agg[0] += 1
            agg[1] += record.status >= 400
            agg[2] += record.prompt_tokens
            agg[3] += record.completion_tokens
            agg[4] += record.total_ms
            if record.ttft_ms is not None:
                agg[5] += record.ttft_ms
                agg[6] += 1
        rollups = {}
        for table, pick in _PROJECTIONS.items():  # coarser rollups are sums over the finest
            acc: dict[tuple[Any, ...], list[float]] = {}
            for key, agg in fine.items():
                sub = tuple(key[i] for i in pick)
                cur = acc.get(sub)
                if cur is None:
                    acc[sub] = list(agg)
                else:
                    for i, v in enumerate(agg):
                        cur[i] += v
            rollups[table] = [(*k, *v) for k, v in acc.items()]
        return rows, rollups

    def _committed(self, batch: list[Item]) -> None:
        with self._cond:  # commit_inline() updates these from the loop's thread
            self.num_rows_written += len(batch)
            self.num_batches += 1
            self.max_batch_rows = max(self.max_batch_rows, len(batch))
        if self.failing_since is not None:
            log.warning("audit store recovered after %.1fs of failures", time.monotonic() - self.failing_since)
            self.failing_since = None
        self._notify(batch, ok=True)

    def _notify(self, batch: list[Item], *, ok: bool) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[bool]]] = {}
        for _, _, waiter in batch:
            if waiter is not None:
                by_loop.setdefault(waiter[0], []).append(waiter[1])
        for loop, futures in by_loop.items():  # one wake-up per loop per batch, not per row
            try:
                loop.call_soon_threadsafe(_resolve, futures, ok)
            except RuntimeError:
                pass  # that loop has closed; nobody is waiting any more

    def _failed(self, exc: Exception, num_rows: int) -> None:
        self.num_failures += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        now = time.monotonic()
        if self.failing_since is None:
            self.failing_since = now
        if now - self._last_fail_log >= LOG_EVERY_S:
            self._last_fail_log = now
            log.error(
                "audit store cannot commit (%s); %d rows buffered in memory, retrying (failing for %.1fs)",
                self.last_error, self.queue_depth + num_rows, now - self.failing_since,
            )  # fmt: skip

    def _rollback(self) -> None:
        try:
            self.db.conn.rollback()
        except sqlite3.Error:
            pass  # SQLite may already have rolled back (SQLITE_FULL does)

    # ------------------------------------------------------------------ shutdown and retention
    def set_stop_deadline(self, deadline: float) -> None:
        """While failing at shutdown, give up retrying at this monotonic time."""
        self._stop_deadline = deadline

    def _stop_deadline_passed(self) -> bool:
        return self._stop_deadline is not None and time.monotonic() >= self._stop_deadline

    def _retention_due(self) -> bool:
        return self._retention_days > 0 and time.monotonic() >= self._next_retention

    def _retention_wait(self) -> float | None:
        if self._retention_days <= 0:
            return None
        return max(0.0, self._next_retention - time.monotonic())

    def _run_retention(self) -> None:
        cutoff = self._clock() - self._retention_days * 86400
        try:
            # One small batch at a time, interleaved with row batches, keeps request latency
            # flat while a large backlog is deleted.
            num_deleted = prune(self.db, cutoff, batch_rows=RETENTION_BATCH_ROWS, max_batches=1)
        except sqlite3.Error as exc:
            self._rollback()
            log.error("audit retention failed: %s", exc)
            self._next_retention = time.monotonic() + 60.0
            return
        self.num_pruned += num_deleted
        more = num_deleted >= RETENTION_BATCH_ROWS
        self._next_retention = time.monotonic() + (0.05 if more else RETENTION_EVERY_S)
