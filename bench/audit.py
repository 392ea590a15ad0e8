"""Audit store benchmark: what recording a request costs, and how fast `aibox usage` answers.

    .venv/bin/python bench/audit.py [--rows 1000000] [--db /tmp/aibox-bench-audit.db]

1. record() latency, what a request waits for (the row appended to the spool and queued for the
   writer; with synchronous=full, the fsynced group commit), p50/p99, at concurrency 1 and 64,
   on an empty database and again at --rows rows; and the throughput up to the last row being
   committed to SQLite (rows/s including the writer's commits).
2. Bulk insert throughput: --rows generated rows (30 days, 1000 subjects, 20 tenants) pushed
   through the same writer without waiting, i.e. the most rows per transaction.
3. Timing of the CLI's queries (the functions `aibox usage` calls) at --rows rows, best of 3.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway import audit_queries as q  # noqa: E402
from gateway.audit import AuditRecord, AuditStore  # noqa: E402
from gateway.settings import AuditSettings  # noqa: E402

DAYS = 30


def gen_row(rnd: random.Random, i: int, now: float) -> AuditRecord:
    """A request as a real fleet produces them: each subject belongs to one tenant, each model
    has its own two deployments, most requests succeed. (Fully random combinations would make
    the daily rollup as large as the table, which real traffic never does.)"""
    status = rnd.choices([200, 400, 401, 429, 500], weights=[90, 2, 2, 4, 2])[0]
    subject = rnd.randrange(1000)
    model = rnd.randrange(5)
    return AuditRecord(
        request_id=f"chatcmpl-{rnd.getrandbits(128):032x}", ts=now - rnd.random() * DAYS * 86400,
        subject=f"user-{subject}", tenant=f"tenant-{subject % 20}", tier="default", model_requested=f"model-{model}",
        model_served=None if status == 401 else f"model-{model}",
        deployment=None if status == 401 else f"dep-{model}-{rnd.randrange(2)}",
        backend_type="llamacpp", stream=rnd.random() < 0.5, status=status, finish_reason="stop",
        prompt_tokens=rnd.randrange(10, 2000), completion_tokens=rnd.randrange(0, 500), queue_ms=rnd.random(),
        ttft_ms=rnd.uniform(5, 200), total_ms=rnd.uniform(50, 5000), user=None, client_retry_count=0,
    )  # fmt: skip


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


async def latency(store: AuditStore, concurrency: int, per_worker: int, now: float) -> dict[str, float]:
    rnd = random.Random(10_000 + concurrency)

    async def worker(w: int) -> list[float]:
        out = []
        for i in range(per_worker):
            row = gen_row(rnd, w * per_worker + i, now)
            t = time.perf_counter()
            await store.record(row)
            out.append((time.perf_counter() - t) * 1e3)
        return out

    t0 = time.perf_counter()
    results = await asyncio.gather(*(worker(w) for w in range(concurrency)))
    assert await store.flush(timeout_s=120)  # rows/s counts until they are all in SQLite
    elapsed = time.perf_counter() - t0
    lat = [x for r in results for x in r]
    return {"p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99), "mean_ms": statistics.fmean(lat), "rows_per_s": len(lat) / elapsed}


async def bulk_load(store: AuditStore, num_rows: int, now: float, chunk: int = 100_000) -> float:
    """Rows/s of the writer alone: rows are generated beforehand (untimed), then queued
    without waiters, so each transaction takes up to MAX_BATCH_ROWS rows."""
    rnd = random.Random(1)
    writer = store._writer
    assert writer is not None
    elapsed = 0.0
    for start in range(0, num_rows, chunk):
        rows = [gen_row(rnd, start + i, now) for i in range(min(chunk, num_rows - start))]
        t0 = time.perf_counter()
        for row in rows:
            writer.submit(row, None)  # buffer_rows > chunk: never dropped (not spooled: the writer alone)
        while writer.queue_depth:
            await asyncio.sleep(0.002)
        elapsed += time.perf_counter() - t0
    return num_rows / elapsed


def timed(fn, repeat: int = 3) -> tuple[float, object]:  # type: ignore[no-untyped-def]
    best, result = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3, result


def query_timings(db, now: float) -> list[tuple[str, float, int]]:  # type: ignore[no-untyped-def]
    day, week, month = now - 86400, now - 7 * 86400, now - 30 * 86400
    some_id = db.execute("SELECT request_id FROM requests WHERE id = 12345").fetchone()[0]
    cases = [
        ("usage summary --since 24h", lambda: q.summary(db, day, None, [])),
        ("usage summary --since 24h --by tenant", lambda: q.summary(db, day, None, ["tenant"])),
        ("usage summary --since 7d --by subject,model", lambda: q.summary(db, week, None, ["subject", "model"])),
        ("usage summary --since 30d --by day,status", lambda: q.summary(db, month, None, ["day", "status"])),
        ("usage summary (all time) --by tenant", lambda: q.summary(db, None, None, ["tenant"])),
        ("usage top --by subject --since 30d", lambda: q.top(db, "subject", month, None, 10)),
        ("usage requests --limit 50", lambda: q.requests(db, {}, 50)),
        ("usage requests --subject user-7 --limit 50", lambda: q.requests(db, {"subject": "user-7"}, 50)),
        ("usage requests --id <one id>", lambda: q.requests(db, {"request_id": some_id}, 50)),
        ("usage requests --tenant tenant-3 --status 5xx --limit 50", lambda: q.requests(db, {"tenant": "tenant-3", "status": "5xx"}, 50)),
        ("usage export --since 24h (rows streamed)", lambda: sum(1 for _ in q.export(db, {"since": day}))),
        ("quota seed at startup, tenant + subject quotas", lambda: q.quota_seed_rows(db, now)),
        ("for comparison: raw GROUP BY tenant over all rows", lambda: db.execute("SELECT tenant, COUNT(*), SUM(prompt_tokens) FROM requests GROUP BY tenant").fetchall()),
    ]  # fmt: skip
    out = []
    for name, fn in cases:
        ms, result = timed(fn)
        out.append((name, ms, result if isinstance(result, int) else len(result)))  # type: ignore[arg-type]
    return out


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--db", default=os.path.join(tempfile.gettempdir(), "aibox-bench-audit.db"))
    ap.add_argument("--synchronous", choices=["normal", "full"], default="normal")
    args = ap.parse_args()
    for suffix in ("", "-wal", "-shm"):
        Path(args.db + suffix).unlink(missing_ok=True)
    now = time.time()
    store = AuditStore(AuditSettings(path=args.db, buffer_rows=200_000, synchronous=args.synchronous))
    await store.start()
    load1 = os.getloadavg()[0]
    print(f"python {sys.version.split()[0]}, sqlite {__import__('sqlite3').sqlite_version}, {os.cpu_count()} cpus, "
          f"load average {load1:.1f} at start, db {args.db}, synchronous={args.synchronous}")  # fmt: skip
    print("\n## record() latency, empty database")
    for c, n in ((1, 5000), (64, 100)):
        r = await latency(store, c, n, now)
        print(f"concurrency {c:>2}: p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms  mean {r['mean_ms']:.3f} ms  {r['rows_per_s']:,.0f} rows/s")
    print(f"\n## bulk insert of {args.rows:,} rows (group commit, no waiters)")
    rate = await bulk_load(store, args.rows, now)
    st = store.stats()
    print(f"{rate:,.0f} rows/s; {st['batches']:,} transactions, largest {st['max_batch_rows']:,} rows")
    print(f"\n## record() latency at {args.rows:,} rows")
    for c, n in ((1, 5000), (64, 100)):
        r = await latency(store, c, n, now)
        print(f"concurrency {c:>2}: p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms  mean {r['mean_ms']:.3f} ms  {r['rows_per_s']:,.0f} rows/s")
    await store.close()
    size = sum(Path(args.db + s).stat().st_size for s in ("", "-wal") if Path(args.db + s).exists())
    print(f"\n## queries at {args.rows:,} rows (db {size / 2**20:,.0f} MiB), best of 3")
    from gateway.audit_schema import connect

    db = connect(args.db)
    for name, ms, n in query_timings(db, now):
        print(f"{ms:9.1f} ms  {name}  ({n:,} rows)")
    cutoff = now - 25 * 86400
    t = time.perf_counter()
    deleted = q.prune(db, cutoff)
    print(f"{(time.perf_counter() - t) * 1e3:9.1f} ms  usage prune --older-than 25d  ({deleted:,} rows deleted in batches)")
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end; CPU time of this process {time.process_time():.1f} s")


if __name__ == "__main__":
    asyncio.run(main())
