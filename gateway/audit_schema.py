"""Audit database: connection settings, the migrations list, and the hot-path SQL.

Schema changes are an ordered list of functions (like simonw/llm's `migrations.py`): each
runs once and its name is recorded in `_migrations`. Never edit a migration that has shipped;
append a new one. Migrations are idempotent (IF NOT EXISTS) because the gateway and an
`aibox usage` command may open a fresh database at the same moment.

AuditRecord (re-exported by gateway.audit) is the row the pipeline fills.

Tables:
    requests      one row per request (rejected ones included); the source of truth
    daily_usage   rollup per (UTC day, tenant, subject, model, deployment, status)
    daily_totals  rollup per (UTC day, tenant, model, status): the same sums, far fewer rows
Both rollups are maintained by the writer in the same transaction as the rows, so summaries
and quota seeding over whole days never scan `requests`.

Durability: WAL with synchronous=NORMAL. A commit appends the transaction to the WAL with
write(2) before COMMIT returns, so the data is in the OS page cache and survives the *process*
being killed (kill -9, OOM killer); only an OS crash or power loss before the next checkpoint's
fsync can lose the last transactions. `audit.synchronous = "full"` fsyncs every commit
(group commit amortises it) for hosts where that matters.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import sqlite_utils


class AuditRecord(msgspec.Struct, kw_only=True):
    """One request as the audit store keeps it (rejected requests included)."""

    request_id: str  # the `id` returned to the client
    ts: float  # unix time the request arrived
    subject: str
    status: int  # HTTP status sent
    tenant: str | None = None
    tier: str | None = None
    endpoint: str = "chat.completions"  # or "completions"
    model_requested: str | None = None
    model_served: str | None = None
    deployment: str | None = None  # backend name from [backends.NAME]
    backend_type: str | None = None
    stream: bool = False
    error_type: str | None = None
    error_code: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_ms: float | None = None
    ttft_ms: float | None = None
    total_ms: float = 0.0
    retries: int = 0
    fallbacks: int = 0
    user: str | None = None  # the client's `user` field
    client_retry_count: int | None = None  # x-stainless-retry-count
    request_content: str | None = None  # kept only when audit.store_content = true
    response_content: str | None = None


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = []


def migration(fn: Callable[[sqlite_utils.Database], None]) -> Callable[[sqlite_utils.Database], None]:
    """Register `fn` as the next migration (order of definition is the order of application)."""
    MIGRATIONS.append(fn)
    return fn


@migration
def m001_requests(db: sqlite_utils.Database) -> None:
    db["requests"].create(
        {
            "id": int,
            "request_id": str,
            "ts": float,
            "subject": str,
            "tenant": str,
            "tier": str,
            "endpoint": str,
            "model": str,  # model_served, else model_requested: what summaries group by
            "model_requested": str,
            "model_served": str,
            "deployment": str,
            "backend_type": str,
            "stream": int,
            "status": int,
            "error_type": str,
            "error_code": str,
            "finish_reason": str,
            "prompt_tokens": int,
            "completion_tokens": int,
            "queue_ms": float,
            "ttft_ms": float,
            "total_ms": float,
            "retries": int,
            "fallbacks": int,
            "user": str,
            "client_retry_count": int,
            "request_content": str,
            "response_content": str,
        },
        pk="id",
        not_null=["request_id", "ts", "subject", "status"],
        if_not_exists=True,
    )
    # One index per filter the CLI offers, each ending in ts so "latest N" and ranges use it.
    table = db["requests"]
    table.create_index(["ts"], index_name="idx_requests_ts", if_not_exists=True)
    table.create_index(["tenant", "ts"], index_name="idx_requests_tenant_ts", if_not_exists=True)
    table.create_index(["subject", "ts"], index_name="idx_requests_subject_ts", if_not_exists=True)
    table.create_index(["model", "ts"], index_name="idx_requests_model_ts", if_not_exists=True)
    table.create_index(["status", "ts"], index_name="idx_requests_status_ts", if_not_exists=True)
    table.create_index(["request_id"], index_name="idx_requests_request_id", if_not_exists=True)


# Rollup tables and their keys, finest first. Each holds the same sums (ROLLUP_METRICS) per key.
ROLLUPS: dict[str, tuple[str, ...]] = {
    "daily_usage": ("day", "tenant", "subject", "model", "deployment", "status"),
    "daily_totals": ("day", "tenant", "model", "status"),  # small: per-subject detail left out
    "daily_subjects": ("day", "tenant", "subject"),  # one row per subject-day: top users, quotas
}
# Queries use the first rollup in this order that has every dimension they group by
# (smallest in practice first: tenants x models x statuses < subjects < everything).
ROLLUP_PREFERENCE = ("daily_totals", "daily_subjects", "daily_usage")
ROLLUP_METRICS = ("requests", "errors", "prompt_tokens", "completion_tokens", "total_ms", "ttft_ms", "num_ttft")
_METRIC_TYPES = {"total_ms": float, "ttft_ms": float}


def _create_rollup(db: sqlite_utils.Database, table: str) -> None:
    keys = ROLLUPS[table]
    # Keys are '' rather than NULL: SQLite treats NULLs as distinct in a primary key, which
    # would defeat the upsert.
    columns = {k: (int if k == "status" else str) for k in keys} | {m: _METRIC_TYPES.get(m, int) for m in ROLLUP_METRICS}
    db[table].create(columns, pk=keys, not_null=list(keys), if_not_exists=True)


@migration
def m002_daily_usage(db: sqlite_utils.Database) -> None:
    _create_rollup(db, "daily_usage")


def _backfill_rollup(db: sqlite_utils.Database, table: str) -> None:
    _create_rollup(db, table)
    keys = ", ".join(ROLLUPS[table])
    sums = ", ".join(f"SUM({m})" for m in ROLLUP_METRICS)
    db.execute(f"INSERT OR IGNORE INTO {table} SELECT {keys}, {sums} FROM daily_usage GROUP BY {keys}")
    db.conn.commit()


@migration
def m003_daily_totals(db: sqlite_utils.Database) -> None:
    # `summary --by day,status` or `--by tenant` over a month read this table: at 1M rows it
    # is ~100x smaller than daily_usage (which keeps every subject x deployment).
    _backfill_rollup(db, "daily_totals")


@migration
def m004_daily_subjects(db: sqlite_utils.Database) -> None:
    # `top --by subject` and subject quota totals: one row per subject-day.
    _backfill_rollup(db, "daily_subjects")


def apply_migrations(db: sqlite_utils.Database) -> list[str]:
    """Apply pending migrations in order; return the names applied now."""
    if "_migrations" not in db.table_names():
        db["_migrations"].create({"name": str, "applied_at": float}, pk="name", if_not_exists=True)
    done = {row["name"] for row in db["_migrations"].rows}
    applied = []
    for fn in MIGRATIONS:
        if fn.__name__ in done:
            continue
        fn(db)
        db["_migrations"].insert({"name": fn.__name__, "applied_at": time.time()}, replace=True)
        applied.append(fn.__name__)
    return applied


def connect(path: str | Path, *, synchronous: str = "normal", busy_timeout_ms: int = 5000) -> sqlite_utils.Database:
    """Open (creating if needed) the audit database with WAL and apply migrations.

    The connection may be handed to the writer thread (check_same_thread=False); it is used by
    one thread at a time.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Default (deferred) isolation: the writer's first INSERT opens the transaction and one
    # commit() closes it, so a batch of rows and its rollup land together (group commit).
    conn = sqlite3.connect(str(path), check_same_thread=False, timeout=busy_timeout_ms / 1000)
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {'FULL' if synchronous == 'full' else 'NORMAL'}")
    # 64 MiB page cache (default 2 MiB): the request_id/subject/tenant indexes take inserts at
    # random positions, and at millions of rows their upper levels must stay in memory.
    conn.execute("PRAGMA cache_size = -65536")
    db = sqlite_utils.Database(conn)
    apply_migrations(db)
    return db


COLUMNS = (
    "request_id", "ts", "subject", "tenant", "tier", "endpoint", "model", "model_requested",
    "model_served", "deployment", "backend_type", "stream", "status", "error_type", "error_code",
    "finish_reason", "prompt_tokens", "completion_tokens", "queue_ms", "ttft_ms", "total_ms",
    "retries", "fallbacks", "user", "client_retry_count", "request_content", "response_content",
)  # fmt: skip

# The writer uses this statement (as multi-row VALUES, audit_writer._execute_rows) over msgspec's astuple() of each
# record (field order) plus the derived `model`; sqlite-utils' insert_all would re-derive the
# column list from dicts for every batch, which costs more than the insert itself.
INSERT_COLUMNS = (*AuditRecord.__struct_fields__, "model")
assert set(INSERT_COLUMNS) == set(COLUMNS), "AuditRecord and the requests table disagree"
INSERT_SQL = f"INSERT INTO requests ({', '.join(f'[{c}]' for c in INSERT_COLUMNS)}) VALUES ({', '.join('?' * len(INSERT_COLUMNS))})"



def _upsert_sql(table: str) -> str:
    keys = ROLLUPS[table]
    cols = (*keys, *ROLLUP_METRICS)
    updates = ",\n    ".join(f"{m} = {m} + excluded.{m}" for m in ROLLUP_METRICS)
    return (
        f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})\n"
        f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET\n    {updates}"
    )


UPSERT_SQL = {table: _upsert_sql(table) for table in ROLLUPS}


def utc_day(ts: float) -> str:
    """'YYYY-MM-DD' of a unix time, in UTC (quota days and rollups are UTC)."""
    return time.strftime("%Y-%m-%d", time.gmtime(ts))
