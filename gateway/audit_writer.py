"""The audit store's single writer thread: group commit, retry while failing, retention.

Requests hand rows to `submit()`; the thread takes everything queued, writes it and its
daily rollups in one transaction, commits, then wakes each waiting request on its event loop
(with synchronous=full; otherwise nobody waits: the row is already durable in the spool, see
gateway/audit_spool.py, and the writer tells the spool when its rows are committed). Under
load this is many rows per commit.

When a commit fails with an operational error (disk full, database locked by another
process, I/O error) the batch goes back to the head of the queue and is retried with backoff,
so nothing is lost while memory lasts: the queue is bounded by `buffer_rows`, and rows past
that bound are dropped *and counted* (stats, health, error log). A row that cannot be
encoded at all (a bug upstream) is isolated and dropped with an error log, so it cannot
wedge the queue.
"""

from __future__ import annotations

import asyncio
import functools
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
from gateway.audit_spool import Segment, Spool

log = logging.getLogger("aibox.audit")

MAX_BATCH_ROWS = 10_000  # bounds one transaction's duration (and WAL growth) under a burst
# Spooled rows are durable already and nobody waits for their commit, so the writer lets them
# gather for this long: one transaction per ~50 ms instead of one per row keeps the thread (and
# its GIL hand-offs with the event loop) off the request path. Rows become visible to queries
# that much later. A row someone waits for (synchronous=full) is committed at once.
SPOOLED_COMMIT_DELAY_S = 0.05
LOG_EVERY_S = 10.0  # repeated-failure logs: loud but not one line per request
RETENTION_EVERY_S = 3600.0
RETENTION_BATCH_ROWS = 2000

_FINEST = ROLLUPS["daily_usage"]
_PROJECTIONS = {table: [_FINEST.index(k) for k in keys] for table, keys in ROLLUPS.items()}

# (record, enqueue time, waiter, spool segment); waiter is (loop, future) for a request awaiting
# the commit, segment the spool file holding the row (None when the row is not spooled)
Waiter = tuple[asyncio.AbstractEventLoop, "asyncio.Future[bool]"]
Item = tuple[Any, float, "Waiter | None", "Segment | None"]


def _resolve(futures: list[asyncio.Future[bool]], ok: bool) -> None:
    for fut in futures:
        if not fut.done():  # the request may have stopped waiting (timeout, disconnect)
            fut.set_result(ok)


def insert_rows(conn: sqlite3.Connection, records: list[Any]) -> None:
    """The rows and their rollup increments, inside the current transaction."""
    rows, rollups = _encode(records)
    _execute_rows(conn, INSERT_SQL, rows)
    for table, values in rollups.items():
        _execute_rows(conn, UPSERT_SQL[table], values)


# Rows go in as multi-row VALUES statements, up to 32 rows each (32 x 28 columns stays under the
# 999 variables of old SQLite builds), not one executemany step per row: the sqlite3 module
# releases the GIL around every step, and while the event loop is busy each release is a
# thread hand-off. At c=32 per-row steps cost ~150 us of CPU per request in hand-offs.
_CHUNK_ROWS = (32, 8, 2, 1)


@functools.lru_cache(maxsize=64)
def _multi_row_sql(sql: str, num_rows: int) -> str:
    start = sql.index("VALUES (") + len("VALUES ")
    end = sql.index(")", start) + 1
    group = sql[start:end]
    return sql[:start] + ", ".join([group] * num_rows) + sql[end:]


def _execute_rows(conn: sqlite3.Connection, sql: str, rows: list[tuple[Any, ...]]) -> None:
    i, n = 0, len(rows)
    for size in _CHUNK_ROWS:
        while n - i >= size:
            chunk = rows[i : i + size]
            conn.execute(_multi_row_sql(sql, size), [v for row in chunk for v in row])
            i += size


def _encode(records: list[Any]) -> tuple[list[tuple[Any, ...]], dict[str, list[tuple[Any, ...]]]]:
    rows = []
    fine: dict[tuple[Any, ...], list[float]] = {}
    days: dict[int, str] = {}  # a batch spans one or two UTC days: format each once
    for record in records:
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
        self._num_waiters = 0  # queued rows whose request waits for the commit
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
        self.spool: Spool | None = None  # set by the store before start(); told when spooled rows are committed

    # ------------------------------------------------------------------ called from the loop
    def submit(self, record: Any, waiter: Waiter | None, segment: Segment | None = None) -> bool:
        """Queue a row; False if the buffer is full and the row was dropped (and counted)."""
        with self._cond:
            if len(self._queue) + self._num_in_flight >= self._buffer_rows:
                self.num_dropped += 1  # from memory: a spooled row stays in its segment, replayed at the next start
                now = time.monotonic()
                if now - self._last_drop_log >= LOG_EVERY_S:
                    self._last_drop_log = now
                    log.error(
                        "audit buffer full (%d rows): dropping rows from memory (spooled ones are replayed at the "
                        "next start); %d so far (last error: %s)",
                        self._buffer_rows, self.num_dropped, self.last_error,
                    )  # fmt: skip
                return False
            if waiter is not None:
                self._num_waiters += 1
                self._cond.notify()
            elif not self._queue:  # the first row wakes the writer; it then lets more gather
                self._cond.notify()
            self._queue.append((record, time.monotonic(), waiter, segment))
        return True

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
                elif self._queue and not self._num_waiters and not self._stopping:
                    gather_until = self._queue[0][1] + SPOOLED_COMMIT_DELAY_S
                    while not self._num_waiters and not self._stopping and len(self._queue) < MAX_BATCH_ROWS:
                        remaining = gather_until - time.monotonic()
                        if remaining <= 0:
                            break
                        self._cond.wait(timeout=remaining)
                if not self._queue and self._stopping:
                    return
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), MAX_BATCH_ROWS))]
                self._num_waiters -= sum(1 for item in batch if item[2] is not None)
                self._num_in_flight = len(batch)
            if self._retention_due() and not self._stopping and not backoff:
                self._run_retention()
            if batch:
                ok = self._write(batch)
                with self._cond:
                    self._num_in_flight = 0
                    if not ok:
                        self._queue.extendleft(reversed(batch))  # retry first, keep order
                        self._num_waiters += sum(1 for item in batch if item[2] is not None)
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
        self._done(bad, ok=False)
        return True

    def _insert(self, batch: list[Item]) -> None:
        insert_rows(self.db.conn, [item[0] for item in batch])

    def _committed(self, batch: list[Item]) -> None:
        self.num_rows_written += len(batch)
        self.num_batches += 1
        self.max_batch_rows = max(self.max_batch_rows, len(batch))
        if self.failing_since is not None:
            log.warning("audit store recovered after %.1fs of failures", time.monotonic() - self.failing_since)
            self.failing_since = None
        self._done(batch, ok=True)

    def _done(self, batch: list[Item], *, ok: bool) -> None:
        """These rows are done with (committed, or rejected): wake whoever waits for them, and
        let their spool lines go."""
        by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[bool]]] = {}
        by_segment: dict[Segment, int] = {}
        for _, _, waiter, segment in batch:
            if waiter is not None:
                by_loop.setdefault(waiter[0], []).append(waiter[1])
            if segment is not None:
                by_segment[segment] = by_segment.get(segment, 0) + 1
        if self.spool is not None:
            for segment, num in by_segment.items():
                self.spool.done(segment, num)
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
