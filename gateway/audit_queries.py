"""Read-side queries over the audit store, shared by `aibox usage` and the store itself.

Summaries over a time range read whole UTC days from the smallest rollup that has the
requested dimensions (`daily_totals`, `daily_subjects`, else `daily_usage`) and only the
partial first/last day from `requests` (through the ts index), so `--since 30d` costs about
as much as `--since 24h` even at 10 million rows. Each result is a list of plain dicts with
stable keys: the CLI renders them as a table, JSON or CSV.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import sqlite_utils

from gateway.audit_schema import COLUMNS, ROLLUP_PREFERENCE, ROLLUPS, utc_day

DIMENSIONS = ("tenant", "subject", "model", "deployment", "day", "status")
METRICS = ("requests", "errors", "prompt_tokens", "completion_tokens", "total_tokens", "avg_total_ms", "avg_ttft_ms")
REQUEST_KEYS = ("time", *COLUMNS)  # `time` is ts as ISO 8601 UTC, for humans and spreadsheets

_RAW_DIM = {
    "tenant": "COALESCE(tenant, '')",
    "subject": "subject",
    "model": "COALESCE(model, '')",
    "deployment": "COALESCE(deployment, '')",
    "day": "strftime('%Y-%m-%d', ts, 'unixepoch')",
    "status": "status",
}
_RAW_SUMS = (
    "COUNT(*), SUM(status >= 400), SUM(prompt_tokens), SUM(completion_tokens), SUM(total_ms), "
    "SUM(COALESCE(ttft_ms, 0)), COUNT(ttft_ms)"
)
_ROLLUP_SUMS = "SUM(requests), SUM(errors), SUM(prompt_tokens), SUM(completion_tokens), SUM(total_ms), SUM(ttft_ms), SUM(num_ttft)"


def _day_floor(ts: float) -> float:
    return (ts // 86400) * 86400.0


def rollup_for(by: list[str]) -> str:
    """The smallest rollup table that has every grouping dimension."""
    for table in ROLLUP_PREFERENCE:
        if set(by) <= set(ROLLUPS[table]):
            return table
    raise ValueError(f"no rollup covers {by}")


def summary(db: sqlite_utils.Database, since: float | None, until: float | None, by: list[str]) -> list[dict[str, Any]]:
    """Requests, errors, tokens and mean latencies in [since, until), grouped by `by`."""
    for dim in by:
        if dim not in DIMENSIONS:
            raise ValueError(f"cannot group by {dim!r} (choose from {', '.join(DIMENSIONS)})")
    # Whole days [first_day, last_day) come from the rollup; the ragged edges from raw rows.
    first_day = None if since is None else _day_floor(since) + (86400.0 if since % 86400 else 0.0)
    last_day = _day_floor(until if until is not None else time.time())
    totals: dict[tuple[Any, ...], list[float]] = {}
    if first_day is None or first_day < last_day:
        where, params = ["day < ?"], [utc_day(last_day)]
        if first_day is not None:
            where.append("day >= ?")
            params.append(utc_day(first_day))
        _accumulate(db, totals, by, list(by), rollup_for(by), _ROLLUP_SUMS, where, params)
        edges = ([(since, first_day)] if since is not None else []) + [(last_day, until)]
    else:
        edges = [(since, until)]
    for lo, hi in edges:
        if lo is not None and hi is not None and lo >= hi:
            continue
        where, params = [], []
        if lo is not None:
            where.append("ts >= ?")
            params.append(lo)
        if hi is not None:
            where.append("ts < ?")
            params.append(hi)
        _accumulate(db, totals, by, [_RAW_DIM[d] for d in by], "requests", _RAW_SUMS, where, params)
    if not by and not totals:
        totals[()] = [0] * 7
    out = []
    for key in sorted(totals, key=lambda k: tuple("" if v is None else str(v).zfill(3) if isinstance(v, int) else v for v in k)):
        n, errors, prompt, completion, total_ms, ttft_ms, num_ttft = totals[key]
        row: dict[str, Any] = {dim: (value if value != "" else None) for dim, value in zip(by, key)}
        row.update(
            requests=int(n),
            errors=int(errors),
            prompt_tokens=int(prompt),
            completion_tokens=int(completion),
            total_tokens=int(prompt + completion),
            avg_total_ms=round(total_ms / n, 1) if n else None,
            avg_ttft_ms=round(ttft_ms / num_ttft, 1) if num_ttft else None,
        )
        out.append(row)
    return out


def _accumulate(
    db: sqlite_utils.Database,
    totals: dict[tuple[Any, ...], list[float]],
    by: list[str],
    dim_sql: list[str],
    table: str,
    sums: str,
    where: list[str],
    params: list[Any],
) -> None:
    select = ", ".join([*(f"{sql} AS {name}" for sql, name in zip(dim_sql, by)), sums])
    sql = f"SELECT {select} FROM {table}"
    if where:
        sql += " WHERE " + " AND ".join(where)
    if by:
        sql += " GROUP BY " + ", ".join(by)
    for row in db.execute(sql, params):
        key, values = tuple(row[: len(by)]), row[len(by) :]
        if values[0] in (None, 0):
            continue  # an aggregate over no rows
        acc = totals.setdefault(key, [0] * 7)
        for i, v in enumerate(values):
            acc[i] += v or 0


def top(db: sqlite_utils.Database, by: str, since: float | None, until: float | None, limit: int) -> list[dict[str, Any]]:
    """The heaviest users (or tenants, models) by total tokens, then requests."""
    rows = summary(db, since, until, [by])
    rows.sort(key=lambda r: (-r["total_tokens"], -r["requests"]))
    return rows[:limit]


def status_filter(value: str) -> tuple[str, list[Any]]:
    """SQL for `--status`: an exact code (429), a class (4xx, 5xx), `error` (>= 400) or `ok`."""
    v = value.strip().lower()
    if v.isdigit():
        return "status = ?", [int(v)]
    if len(v) == 3 and v[0] in "12345" and v[1:] == "xx":
        lo = int(v[0]) * 100
        return "status >= ? AND status < ?", [lo, lo + 100]
    if v in ("error", "errors"):
        return "status >= ?", [400]
    if v == "ok":
        return "status < ?", [400]
    raise ValueError(f"invalid --status {value!r}: use a code (429), a class (4xx), 'error' or 'ok'")


def _filters(filters: dict[str, Any]) -> tuple[str, list[Any]]:
    where, params = [], []
    for col in ("request_id", "subject", "tenant", "model"):
        if filters.get(col) is not None:
            where.append(f"{col} = ?")
            params.append(filters[col])
    if filters.get("status") is not None:
        clause, values = status_filter(str(filters["status"]))
        where.append(clause)
        params.extend(values)
    if filters.get("since") is not None:
        where.append("ts >= ?")
        params.append(filters["since"])
    if filters.get("until") is not None:
        where.append("ts < ?")
        params.append(filters["until"])
    return (" WHERE " + " AND ".join(where)) if where else "", params


def _request_dict(row: tuple[Any, ...]) -> dict[str, Any]:
    out = dict(zip(COLUMNS, row))
    out["stream"] = bool(out["stream"])
    out["time"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(out["ts"])) + f".{int(out['ts'] % 1 * 1000):03d}Z"
    return {k: out[k] for k in REQUEST_KEYS}


def requests(db: sqlite_utils.Database, filters: dict[str, Any], limit: int) -> list[dict[str, Any]]:
    """The latest `limit` requests matching the filters, newest first."""
    where, params = _filters(filters)
    cols = ", ".join(f"[{c}]" for c in COLUMNS)
    sql = f"SELECT {cols} FROM requests{where} ORDER BY ts DESC LIMIT ?"
    return [_request_dict(row) for row in db.execute(sql, [*params, limit])]


def export(db: sqlite_utils.Database, filters: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every matching request in time order, streamed from a cursor (constant memory)."""
    where, params = _filters(filters)
    cols = ", ".join(f"[{c}]" for c in COLUMNS)
    cursor = db.conn.execute(f"SELECT {cols} FROM requests{where} ORDER BY ts", params)
    for row in cursor:
        yield _request_dict(row)


def quota_seed_rows(db: sqlite_utils.Database, now: float, kinds: tuple[str, ...] = ("tenant", "subject")) -> list[tuple[str, str, str, int, int]]:
    """(kind, key, day, tokens today, tokens this month) per tenant and/or subject, from the rollups.

    Aggregated in SQL so startup reads one row per tenant/subject, not one per rollup row.
    """
    today = utc_day(now)
    out: list[tuple[str, str, str, int, int]] = []
    for kind in kinds:
        table = rollup_for([kind])
        sql = (
            f"SELECT {kind}, SUM(CASE WHEN day = ? THEN prompt_tokens + completion_tokens ELSE 0 END), "
            f"SUM(prompt_tokens + completion_tokens) FROM {table} WHERE day >= ? AND {kind} != '' GROUP BY {kind}"
        )
        out.extend((kind, key, today, int(d or 0), int(m or 0)) for key, d, m in db.execute(sql, [today, today[:7] + "-01"]))
    return out


def prune(
    db: sqlite_utils.Database,
    older_than: float,
    *,
    batch_rows: int = 2_000,  # ~0.1 s of write lock per batch at 1M rows: a live writer barely waits
    max_batches: int | None = None,
    should_yield: Callable[[], bool] | None = None,
) -> int:
    """Delete requests (and rollup days) before the UTC midnight at or before `older_than`.

    Rounding down to a whole day keeps the rollup and the rows consistent. Deletes go in
    batches picked through the ts index, one short transaction each, so a live writer is never
    locked out for long. Returns the number of request rows deleted.
    """
    cutoff = _day_floor(older_than)
    conn = db.conn
    num_deleted = 0
    num_batches = 0
    while True:
        cur = conn.execute(
            "DELETE FROM requests WHERE id IN (SELECT id FROM requests WHERE ts < ? LIMIT ?)", [cutoff, batch_rows]
        )
        conn.commit()
        num_deleted += cur.rowcount
        num_batches += 1
        if cur.rowcount < batch_rows:
            break
        if (max_batches is not None and num_batches >= max_batches) or (should_yield and should_yield()):
            return num_deleted
    for table in ROLLUPS:
        conn.execute(f"DELETE FROM {table} WHERE day < ?", [utc_day(cutoff)])
    conn.commit()
    return num_deleted
