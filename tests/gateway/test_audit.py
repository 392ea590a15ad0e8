"""AuditStore against a real SQLite file: rows, group commit, the spool and its replay after a
crash, failure buffering, close, retention."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from gateway.audit import AuditRecord, AuditStore
from gateway.audit_schema import MIGRATIONS, connect
from gateway.settings import AuditSettings

NOW = 1_795_000_000.0  # a fixed "now" (2026-11-18T...Z) for the injected clock


def make_row(i: int = 0, **kw: object) -> AuditRecord:
    fields: dict[str, object] = dict(
        request_id=f"chatcmpl-{i}", ts=NOW + i * 0.001, subject="alice", tenant="acme", status=200,
        model_requested="gemma", model_served="gemma", deployment="fake1", backend_type="fake",
        prompt_tokens=7, completion_tokens=11, total_ms=12.5, ttft_ms=3.0,
    )  # fmt: skip
    fields.update(kw)
    return AuditRecord(**fields)  # type: ignore[arg-type]


def rows(path: Path, sql: str = "SELECT * FROM requests ORDER BY id", params: tuple = ()) -> list[sqlite3.Row]:
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


async def wait_until(predicate, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    """Poll a condition owned by the writer thread (a real thread: there is no clock to inject)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "audit" / "usage.db"  # a folder that does not exist yet: created on start


async def started(db_path: Path, **kw: object) -> AuditStore:
    opts = {k: kw.pop(k) for k in list(kw) if k in ("commit_wait_s", "busy_timeout_ms", "close_timeout_s", "clock")}
    store = AuditStore(AuditSettings(path=str(db_path), **kw), **opts)  # type: ignore[arg-type]
    await store.start()
    return store


async def test_row_round_trips_every_field(db_path: Path) -> None:
    store = await started(db_path)
    row = make_row(
        1, stream=True, status=500, error_type="server_error", error_code="backend_error", finish_reason="length",
        queue_ms=1.5, retries=1, fallbacks=1, user="u-42", client_retry_count=2, tier="gold", endpoint="completions",
        request_content="secret prompt", response_content="secret answer",
    )  # fmt: skip
    assert await store.record(row) is True
    await store.close()
    (got,) = rows(db_path)
    expected = msgspec.structs.asdict(row) | {"request_content": None, "response_content": None, "stream": 1}
    assert {k: got[k] for k in expected} == expected
    assert got["model"] == "gemma"


async def test_content_kept_only_when_configured(db_path: Path) -> None:
    store = await started(db_path, store_content=True)
    await store.record(make_row(request_content="hi", response_content="hello"))
    await store.close()
    (got,) = rows(db_path)
    assert (got["request_content"], got["response_content"]) == ("hi", "hello")


async def test_rejected_request_groups_under_requested_model(db_path: Path) -> None:
    store = await started(db_path)
    await store.record(make_row(model_served=None, deployment=None, status=404, error_code="model_not_found",
                                model_requested="nope", prompt_tokens=0, completion_tokens=0))  # fmt: skip
    await store.close()
    (got,) = rows(db_path)
    assert (got["model"], got["status"], got["deployment"]) == ("nope", 404, None)
    (day,) = rows(db_path, "SELECT * FROM daily_usage")
    assert (day["model"], day["errors"], day["deployment"]) == ("nope", 1, "")


async def test_concurrent_records_share_transactions(db_path: Path) -> None:
    store = await started(db_path)
    results = await asyncio.gather(*(store.record(make_row(i)) for i in range(300)))
    assert await store.flush()
    stats = store.stats()
    await store.close()
    assert all(results)
    assert stats["rows_written"] == 300
    assert stats["batches"] < 300 and stats["max_batch_rows"] > 1  # group commit happened
    assert len(rows(db_path)) == 300
    (day,) = rows(db_path, "SELECT * FROM daily_usage")
    assert (day["requests"], day["prompt_tokens"], day["completion_tokens"]) == (300, 300 * 7, 300 * 11)


async def test_migrations_recorded_and_idempotent(db_path: Path) -> None:
    store = await started(db_path)
    await store.close()
    db = connect(db_path)  # second open applies nothing
    names = [r["name"] for r in db["_migrations"].rows]
    assert names == [fn.__name__ for fn in MIGRATIONS]
    indexes = {idx.name for idx in db["requests"].indexes}
    assert {"idx_requests_ts", "idx_requests_tenant_ts", "idx_requests_subject_ts", "idx_requests_model_ts",
            "idx_requests_status_ts", "idx_requests_request_id"} <= indexes  # fmt: skip
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.parametrize("synchronous", ["normal", "full"])
async def test_locked_database_buffers_rows_then_recovers(db_path: Path, synchronous: str) -> None:
    """With the spool (normal) a row is durable at once and record() never waits; without it
    (full) record() waits for the commit, at most commit_wait_s, and not at all once failing."""
    spooled = synchronous == "normal"
    store = await started(db_path, commit_wait_s=0.3, busy_timeout_ms=50, synchronous=synchronous)
    assert await store.record(make_row(0)) is True
    assert await store.flush()
    locker = sqlite3.connect(db_path, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")  # another process holding the write lock
    started_at = time.monotonic()
    assert await store.record(make_row(1)) is spooled  # served anyway: durable in the spool, or after a bounded wait
    assert time.monotonic() - started_at < (0.1 if spooled else 2.0)
    await wait_until(lambda: store.health()["failing"])
    fast = time.monotonic()
    assert await store.record(make_row(2)) is spooled  # known failing: no wait at all
    assert time.monotonic() - fast < 0.1
    health, stats = store.health(), store.stats()
    assert health["ok"] and "database is locked" in health["detail"] and health["queue_depth"] >= 2
    assert stats["commit_failures"] >= 1 and stats["failing"] == 1
    locker.execute("ROLLBACK")
    locker.close()
    await wait_until(lambda: store.stats()["rows_written"] == 3)
    assert not store.health()["failing"]
    await store.close()
    assert [r["request_id"] for r in rows(db_path)] == ["chatcmpl-0", "chatcmpl-1", "chatcmpl-2"]


async def test_buffer_overflow_drops_and_counts(db_path: Path) -> None:
    store = await started(db_path, commit_wait_s=0.2, busy_timeout_ms=20, buffer_rows=3, close_timeout_s=1.0)
    locker = sqlite3.connect(db_path, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    for i in range(6):
        await store.record(make_row(i))
    assert store.stats()["rows_dropped"] == 3
    assert "dropped" in store.health()["detail"] or store.health()["failing"]
    locker.execute("ROLLBACK")
    locker.close()
    await store.close()  # flushes what was buffered
    assert [r["request_id"] for r in rows(db_path)] == ["chatcmpl-0", "chatcmpl-1", "chatcmpl-2"]


async def test_close_flushes_rows_nobody_waited_for(db_path: Path) -> None:
    store = await started(db_path)
    tasks = [asyncio.ensure_future(store.record(make_row(i))) for i in range(500)]
    await asyncio.sleep(0)  # every task has queued its row; none has been committed yet for sure
    for t in tasks:
        t.cancel()  # the clients went away: their rows must still be written
    await store.close()
    assert len(rows(db_path)) == 500


async def test_unencodable_row_is_isolated(db_path: Path) -> None:
    store = await started(db_path)
    good = [store.record(make_row(i)) for i in range(3)]
    bad = store.record(make_row(99, user={"not": "a string"}))  # type: ignore[arg-type]
    results = await asyncio.gather(*good, bad)
    assert await store.flush()
    stats = store.stats()
    await store.close()
    assert results == [True] * 4 and stats["rows_rejected"] == 1  # spooled, then refused by SQLite alone
    assert sorted(r["request_id"] for r in rows(db_path)) == ["chatcmpl-0", "chatcmpl-1", "chatcmpl-2"]
    for table in ("daily_usage", "daily_totals", "daily_subjects"):  # rollups agree with the rows
        assert rows(db_path, f"SELECT SUM(requests) AS n FROM {table}")[0]["n"] == 3


async def test_automatic_retention_prunes_whole_old_days(db_path: Path) -> None:
    store = await started(db_path, clock=lambda: NOW)
    for i, age_days in enumerate([10, 5, 2.5, 0.1]):
        await store.record(make_row(i, ts=NOW - age_days * 86400))
    await store.close()
    store = await started(db_path, clock=lambda: NOW, retention_days=3)
    await wait_until(lambda: store.stats()["rows_pruned"] == 2)
    await store.close()
    assert [r["request_id"] for r in rows(db_path)] == ["chatcmpl-2", "chatcmpl-3"]
    days = [r["day"] for r in rows(db_path, "SELECT day FROM daily_usage ORDER BY day")]
    assert len(days) == 2  # rollup days follow the rows


async def test_record_after_close_is_counted_not_raised(db_path: Path) -> None:
    store = await started(db_path)
    await store.close()
    assert await store.record(make_row()) is False
    assert store.health()["ok"] is False


async def test_disk_full_buffers_rows_then_recovers(db_path: Path) -> None:
    """SQLITE_FULL for real: cap the database at its current size (PRAGMA max_page_count)."""
    store = await started(db_path, commit_wait_s=0.3)
    assert await store.record(make_row(0)) is True
    conn = store._writer.db.conn  # the writer is idle now; SQLite serializes connection use
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")
    num = 1
    while not store.health()["failing"]:  # rows fill the free space left in existing pages first
        for _ in range(50):
            await store.record(make_row(num, subject=f"user-{num}", tenant=f"t-{num}"))
            num += 1
        await store.flush(timeout_s=1.0)  # the writer commits (or fails) what is queued
        assert num < 5000, "the capped database never filled up"
    for _ in range(5):
        assert await store.record(make_row(num)) is True  # served and durable in the spool, not committed
        num += 1
    health = store.health()
    assert "full" in health["detail"] and health["queue_depth"] >= 5 and store.stats()["commit_failures"] >= 1
    conn.execute("PRAGMA max_page_count = 1073741823")  # space freed
    await wait_until(lambda: store.stats()["rows_written"] == num)
    assert not store.health()["failing"]
    await store.close()
    assert len(rows(db_path)) == num


async def test_new_rollup_migration_backfills_an_existing_store(db_path: Path) -> None:
    store = await started(db_path)
    for i, (tenant, status) in enumerate([("acme", 200), ("acme", 200), ("acme", 500), ("globex", 200)]):
        await store.record(make_row(i, tenant=tenant, status=status, subject=f"s{i}"))
    await store.close()
    # Roll the database back to before m003, as a store written by the previous release.
    import sqlite_utils

    old = sqlite_utils.Database(db_path)
    for table in ("daily_totals", "daily_subjects"):
        old[table].drop()
    old.execute("DELETE FROM _migrations WHERE name IN ('m003_daily_totals', 'm004_daily_subjects')")
    old.conn.commit()
    old.close()
    db = connect(db_path)
    got = {(r["tenant"], r["status"]): (r["requests"], r["prompt_tokens"]) for r in db["daily_totals"].rows}
    assert got == {("acme", 200): (2, 14), ("acme", 500): (1, 7), ("globex", 200): (1, 7)}
    subjects = {(r["tenant"], r["subject"]): r["requests"] for r in db["daily_subjects"].rows}
    assert subjects == {("acme", "s0"): 1, ("acme", "s1"): 1, ("acme", "s2"): 1, ("globex", "s3"): 1}


async def test_checkpoints_run_off_the_commit_path(db_path: Path) -> None:
    from gateway.audit_checkpoint import Checkpointer

    store = await started(db_path)
    await asyncio.gather(*(store.record(make_row(i)) for i in range(50)))
    assert await store.flush()
    assert store._writer.db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 10_000  # a rare backstop only
    checkpointer = Checkpointer(db_path)
    conn = sqlite3.connect(db_path)
    checkpointer.checkpoint(conn)  # what the background thread does every second
    busy, wal_frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    conn.close()
    assert checkpointer.num_checkpoints == 1 and checkpointer.wal_frames > 0
    assert busy == 0 and copied == wal_frames  # everything reached the database file
    await store.close()
    assert not Path(str(db_path) + "-wal").exists() or Path(str(db_path) + "-wal").stat().st_size == 0


def spool_files(db_path: Path) -> list[str]:
    folder = Path(f"{db_path}-spool")
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


_CRASHING_GATEWAY = """
import asyncio, os, sys
from gateway.audit import AuditStore
from gateway.settings import AuditSettings
from tests.gateway.test_audit import make_row

async def main():
    store = AuditStore(AuditSettings(path=sys.argv[1]), busy_timeout_ms=20)
    await store.start()
    for i in map(int, sys.argv[2:]):
        assert await store.record(make_row(i)) is True
    os._exit(9)  # dies like kill -9: no close(), no flush

asyncio.run(main())
"""


def crash_after_recording(db_path: Path, ids: range) -> None:
    """A gateway process records rows while another process holds the database's write lock
    (so none is committed), then dies."""
    locker = sqlite3.connect(db_path, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        proc = subprocess.run([sys.executable, "-c", _CRASHING_GATEWAY, str(db_path), *map(str, ids)],
                              cwd=Path(__file__).resolve().parents[2], capture_output=True, timeout=60)  # fmt: skip
        assert proc.returncode == 9, proc.stderr.decode()
    finally:
        locker.execute("ROLLBACK")
        locker.close()


async def test_clean_close_removes_the_spool(db_path: Path) -> None:
    store = await started(db_path)
    await asyncio.gather(*(store.record(make_row(i)) for i in range(20)))
    assert len(spool_files(db_path)) == 2  # this process's lock and its segment
    await store.close()
    assert spool_files(db_path) == [] and len(rows(db_path)) == 20


async def test_segments_are_deleted_once_committed(db_path: Path) -> None:
    from gateway import audit_spool

    store = await started(db_path)
    store._spool._segment_bytes = 2000  # about five rows per segment
    for i in range(40):
        await store.record(make_row(i))
    assert await store.flush()
    await wait_until(lambda: len(spool_files(db_path)) == 2)  # the lock and the active segment only
    assert store._spool.pending == 0 and audit_spool.SEGMENT_BYTES > 2000
    await store.close()
    assert len(rows(db_path)) == 40


async def test_rows_spooled_before_a_crash_are_replayed_at_the_next_start(db_path: Path) -> None:
    store = await started(db_path)
    assert await store.record(make_row(0)) is True
    await store.close()
    crash_after_recording(db_path, range(1, 6))  # acknowledged rows, durable in the spool only
    assert [r["request_id"] for r in rows(db_path)] == ["chatcmpl-0"]
    again = await started(db_path)
    assert again.stats()["rows_recovered"] == 5
    assert again.quotas is not None  # seeded after the replay (see test_audit_quota for totals)
    await again.close()
    assert [r["request_id"] for r in rows(db_path)] == [f"chatcmpl-{i}" for i in range(6)]
    (day,) = rows(db_path, "SELECT * FROM daily_usage")
    assert day["requests"] == 6  # rollups replayed with the rows
    assert spool_files(db_path) == []


async def test_replay_skips_rows_already_committed_and_a_torn_line(db_path: Path) -> None:
    """A crash can land after a commit and before its segment was deleted, and inside a write()."""
    from gateway.audit_spool import Spool, spool_dir

    store = await started(db_path)
    for i in range(3):
        await store.record(make_row(i))
    await store.close()  # rows 0-2 committed
    orphan = Spool(spool_dir(db_path))
    orphan.open()
    for i in range(5):  # 0-2 again (committed before the "crash"), 3-4 new
        orphan.append(make_row(i))
    os.write(orphan._fd, b'{"request_id":"chatcmpl-torn","ts":')
    os.close(orphan._fd)
    os.close(orphan._lock_fd)
    again = await started(db_path)
    assert again.stats()["rows_recovered"] == 2
    await again.close()
    assert sorted(r["request_id"] for r in rows(db_path)) == [f"chatcmpl-{i}" for i in range(5)]
    assert rows(db_path, "SELECT SUM(requests) AS n FROM daily_usage")[0]["n"] == 5
    assert spool_files(db_path) == []


async def test_a_live_gateways_spool_is_left_alone(db_path: Path) -> None:
    """Two gateways on one database: starting the second must not replay the first's rows."""
    first = await started(db_path, busy_timeout_ms=20)
    locker = sqlite3.connect(db_path, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    await first.record(make_row(0))  # spooled, not committed
    locker.execute("ROLLBACK")
    locker.close()
    second = AuditStore(AuditSettings(path=str(db_path)))
    from gateway.audit import recover_spools
    from gateway.audit_schema import connect as open_db

    assert recover_spools(open_db(db_path), db_path) == 0  # the first's lock is held
    await first.flush()
    await first.close()
    await second.start()
    assert second.stats()["rows_recovered"] == 0
    await second.close()
    assert [r["request_id"] for r in rows(db_path)] == ["chatcmpl-0"]


async def test_the_usage_cli_replays_an_orphaned_spool(db_path: Path, tmp_path: Path) -> None:
    store = await started(db_path)
    await store.record(make_row(0))
    await store.close()
    crash_after_recording(db_path, range(1, 2))
    from gateway.cli import main

    assert main(["usage", "requests", "--db", str(db_path), "--format", "json"]) == 0
    assert [r["request_id"] for r in rows(db_path)] == ["chatcmpl-0", "chatcmpl-1"]
    assert spool_files(db_path) == []


async def test_a_spool_that_cannot_be_written_falls_back_to_waiting(db_path: Path) -> None:
    store = await started(db_path)
    os.close(store._spool._fd)  # every write now fails (EBADF), as a full disk would
    store._spool._fd = os.open(os.devnull, os.O_RDONLY)
    assert await store.record(make_row(0)) is True  # committed instead, waited for
    stats = store.stats()
    assert stats["spool_failures"] == 1 and stats["rows_written"] == 1
    await store.close()
    assert len(rows(db_path)) == 1


async def test_synchronous_full_waits_for_the_commit_and_has_no_spool(db_path: Path) -> None:
    store = await started(db_path, synchronous="full")
    assert await store.record(make_row(0)) is True
    stats = store.stats()  # committed before record() returned: nothing to flush
    assert stats["rows_written"] == 1 and spool_files(db_path) == []
    await store.close()


def test_a_failed_append_does_not_spoil_the_next_row(tmp_path: Path) -> None:
    """Disk full mid-write leaves part of a line; it is cut off again, so the next row reads back."""
    from gateway.audit_spool import Spool, _read

    spool = Spool(tmp_path / "spool")
    spool.open()
    spool.append(make_row(0))
    real_write = os.write
    calls = 0

    def half_then_full(fd: int, data: Any) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            return real_write(fd, bytes(data[:10]))
        raise OSError(28, "No space left on device")

    os_write, os.write = os.write, half_then_full  # type: ignore[assignment]
    try:
        with pytest.raises(OSError):
            spool.append(make_row(1))
    finally:
        os.write = os_write  # type: ignore[assignment]
    spool.append(make_row(2))
    (segment,) = sorted((tmp_path / "spool").glob("*.jsonl"))
    assert [r.request_id for r in _read(segment)] == ["chatcmpl-0", "chatcmpl-2"]


def test_a_failed_rotation_keeps_the_open_segment(tmp_path: Path) -> None:
    from gateway.audit_spool import Spool

    spool = Spool(tmp_path / "spool", segment_bytes=1)
    spool.open()
    spool.append(make_row(0))
    fd = spool._fd
    real_open = os.open

    def refuse(path: Any, *a: Any, **kw: Any) -> int:
        if str(path).endswith(".jsonl"):
            raise OSError(24, "Too many open files")
        return real_open(path, *a, **kw)

    os.open = refuse  # type: ignore[assignment]
    try:
        with pytest.raises(OSError):
            spool.append(make_row(1))  # the rotation cannot open the next segment
    finally:
        os.open = real_open  # type: ignore[assignment]
    assert spool._fd == fd and os.fstat(fd)  # still ours, still open
    spool.append(make_row(2))  # rotates now


async def test_rows_dropped_from_a_full_buffer_stay_in_the_spool(db_path: Path) -> None:
    """The database fails long enough to fill the memory buffer: the rows past it are not in
    memory but are in the spool, so the next start stores them."""
    store = await started(db_path, busy_timeout_ms=20, buffer_rows=3, close_timeout_s=0.5)
    locker = sqlite3.connect(db_path, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    for i in range(6):
        assert await store.record(make_row(i)) is True
    assert store.stats()["rows_dropped"] == 3
    await store.close()  # cannot commit anything: the spool is kept
    locker.execute("ROLLBACK")
    locker.close()
    assert rows(db_path) == [] and spool_files(db_path)
    again = await started(db_path)
    assert again.stats()["rows_recovered"] == 6
    await again.close()
    assert len(rows(db_path)) == 6 and spool_files(db_path) == []


async def test_a_spool_that_cannot_be_opened_means_waiting_for_commits(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    Path(f"{db_path}-spool").write_text("a file where the folder should be")
    store = await started(db_path)
    assert store._spool is None
    assert await store.record(make_row(0)) is True  # committed, waited for
    assert store.stats()["rows_written"] == 1
    await store.close()


def test_a_row_json_cannot_carry_is_replayed_with_zeros(tmp_path: Path) -> None:
    from gateway.audit_spool import Spool, _read

    spool = Spool(tmp_path / "spool")
    spool.open()
    spool.append(make_row(0, total_ms=float("nan")))  # JSON writes NaN as null
    (segment,) = sorted((tmp_path / "spool").glob("*.jsonl"))
    (record,) = _read(segment)
    assert record.request_id == "chatcmpl-0" and record.total_ms == 0


def test_a_row_without_a_time_is_skipped_at_replay(tmp_path: Path) -> None:
    from gateway.audit_spool import Spool, _read

    spool = Spool(tmp_path / "spool")
    spool.open()
    spool.append(make_row(0, ts=float("nan")))
    spool.append(make_row(1))
    (segment,) = sorted((tmp_path / "spool").glob("*.jsonl"))
    assert [r.request_id for r in _read(segment)] == ["chatcmpl-1"]


def test_a_spool_that_cannot_be_locked_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fcntl

    from gateway.audit_spool import Spool

    def no_locks(fd: int, op: int) -> None:
        raise OSError(37, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    spool = Spool(tmp_path / "spool")
    with pytest.raises(OSError):
        spool.open()
    assert list((tmp_path / "spool").iterdir()) == [] and spool._lock_fd == -1
