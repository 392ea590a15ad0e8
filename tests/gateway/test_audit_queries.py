"""Query layer: the rollup+edges summary must equal a brute-force aggregate over the raw rows;
prune is batched and day-aligned; the CLI's filters use the indexes."""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import sqlite_utils

from gateway import audit_queries as q
from gateway.audit import AuditRecord, AuditStore
from gateway.audit_schema import connect, utc_day
from gateway.settings import AuditSettings

T0 = 1_794_960_000.0  # 2026-11-18T00:00:00Z, a UTC midnight
DAY = 86400.0


def generated(n: int, seed: int = 7) -> list[AuditRecord]:
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        status = rnd.choice([200, 200, 200, 200, 400, 401, 429, 500])
        out.append(AuditRecord(
            request_id=f"r{i}", ts=T0 + rnd.uniform(0, 6 * DAY), subject=rnd.choice(["alice", "bob", "carol", "dave"]),
            tenant=rnd.choice(["acme", "globex", None]), status=status,
            model_requested=rnd.choice(["gemma", "llama"]), model_served=None if status in (401, 400) else "gemma",
            deployment=None if status in (401, 400) else rnd.choice(["d1", "d2"]),
            prompt_tokens=rnd.randint(0, 50), completion_tokens=rnd.randint(0, 80),
            total_ms=rnd.uniform(1, 500), ttft_ms=None if status >= 400 else rnd.uniform(1, 50),
        ))  # fmt: skip
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[sqlite_utils.Database, list[AuditRecord]]:
    import asyncio

    records = generated(3000)
    path = tmp_path_factory.mktemp("q") / "usage.db"

    async def fill() -> None:
        store = AuditStore(AuditSettings(path=str(path)))
        await store.start()
        await asyncio.gather(*(store.record(r) for r in records))
        await store.close()

    asyncio.run(fill())
    return connect(path), records


def brute(records: list[AuditRecord], since: float | None, until: float | None, by: list[str]) -> dict[tuple, dict[str, Any]]:
    acc: dict[tuple, list[float]] = defaultdict(lambda: [0, 0, 0, 0, 0.0])
    for r in records:
        if (since is not None and r.ts < since) or (until is not None and r.ts >= until):
            continue
        dims = {"tenant": r.tenant, "subject": r.subject, "model": r.model_served or r.model_requested,
                "deployment": r.deployment, "day": utc_day(r.ts), "status": r.status}  # fmt: skip
        a = acc[tuple(dims[d] for d in by)]
        a[0] += 1
        a[1] += r.status >= 400
        a[2] += r.prompt_tokens
        a[3] += r.completion_tokens
        a[4] += r.total_ms
    return {k: {"requests": v[0], "errors": v[1], "prompt_tokens": v[2], "completion_tokens": v[3],
                "avg_total_ms": round(v[4] / v[0], 1)} for k, v in acc.items()}  # fmt: skip


RANGES = [
    (None, None),  # all time: rollup for past days + today's raw rows
    (T0 + 0.5 * DAY, T0 + 4.25 * DAY),  # ragged both ends, whole days between
    (T0 + DAY, T0 + 3 * DAY),  # exactly whole days
    (T0 + 2.2 * DAY, T0 + 2.7 * DAY),  # inside one day
    (T0 + 5.5 * DAY, None),
    (None, T0 + 1.5 * DAY),
]


@pytest.mark.parametrize(("since", "until"), RANGES)
@pytest.mark.parametrize(
    "by", [[], ["tenant"], ["subject", "model"], ["day", "status"], ["deployment"], ["subject"], ["day", "tenant", "subject"]]
)
def test_summary_equals_brute_force(dataset, since, until, by) -> None:  # type: ignore[no-untyped-def]
    db, records = dataset
    got = {tuple(r[d] for d in by): r for r in q.summary(db, since, until, by)}
    want = brute(records, since, until, by)
    if not by and not want:
        want = {(): {"requests": 0, "errors": 0, "prompt_tokens": 0, "completion_tokens": 0, "avg_total_ms": None}}
    assert set(got) == set(want)
    for key, w in want.items():
        g = got[key]
        assert {k: g[k] for k in w} == pytest.approx(w, abs=0.11)
        assert g["total_tokens"] == w["prompt_tokens"] + w["completion_tokens"]


@pytest.mark.parametrize(
    ("by", "table"),
    [([], "daily_totals"), (["tenant", "status"], "daily_totals"), (["subject"], "daily_subjects"),
     (["day", "tenant", "subject"], "daily_subjects"), (["subject", "status"], "daily_usage"), (["deployment"], "daily_usage")],
)  # fmt: skip
def test_smallest_covering_rollup_is_used(by: list[str], table: str) -> None:
    assert q.rollup_for(by) == table


def test_top_orders_by_tokens(dataset) -> None:  # type: ignore[no-untyped-def]
    db, records = dataset
    rows = q.top(db, "subject", None, None, limit=2)
    totals = defaultdict(int)
    for r in records:
        totals[r.subject] += r.prompt_tokens + r.completion_tokens
    assert [r["subject"] for r in rows] == sorted(totals, key=totals.__getitem__, reverse=True)[:2]


@pytest.mark.parametrize(
    ("filters", "pick"),
    [
        ({"subject": "bob"}, lambda r: r.subject == "bob"),
        ({"tenant": "acme", "status": "4xx"}, lambda r: r.tenant == "acme" and 400 <= r.status < 500),
        ({"model": "llama"}, lambda r: (r.model_served or r.model_requested) == "llama"),
        ({"status": "error", "since": T0 + 3 * DAY}, lambda r: r.status >= 400 and r.ts >= T0 + 3 * DAY),
        ({"status": "ok", "until": T0 + DAY}, lambda r: r.status < 400 and r.ts < T0 + DAY),
        ({"status": "429"}, lambda r: r.status == 429),
    ],
)
def test_requests_filters_newest_first(dataset, filters, pick) -> None:  # type: ignore[no-untyped-def]
    db, records = dataset
    want = sorted((r for r in records if pick(r)), key=lambda r: -r.ts)
    got = q.requests(db, filters, limit=25)
    assert [r["request_id"] for r in got] == [r.request_id for r in want[:25]]
    assert sum(1 for _ in q.export(db, filters)) == len(want)


@pytest.mark.parametrize(
    ("filters", "index"),
    [
        ({}, "idx_requests_ts"),
        ({"tenant": "acme"}, "idx_requests_tenant_ts"),
        ({"subject": "bob"}, "idx_requests_subject_ts"),
        ({"model": "gemma"}, "idx_requests_model_ts"),
        ({"status": "5xx"}, "idx_requests_status_ts"),
        ({"request_id": "r1"}, "idx_requests_request_id"),
    ],
)
def test_request_queries_use_an_index(dataset, filters, index) -> None:  # type: ignore[no-untyped-def]
    db, _ = dataset
    where, params = q._filters(filters)
    plan = " ".join(str(r[-1]) for r in db.execute(f"EXPLAIN QUERY PLAN SELECT * FROM requests{where} ORDER BY ts DESC LIMIT 5", params))
    assert index in plan, plan
    assert "SCAN requests" not in plan.replace(f"SCAN requests USING INDEX {index}", "")


def test_prune_is_batched_and_day_aligned(tmp_path: Path) -> None:
    import asyncio

    records = generated(1000, seed=3)
    path = tmp_path / "p.db"

    async def fill() -> None:
        store = AuditStore(AuditSettings(path=str(path)))
        await store.start()
        await asyncio.gather(*(store.record(r) for r in records))
        await store.close()

    asyncio.run(fill())
    db = connect(path)
    cutoff = T0 + 2.6 * DAY  # rounded down to T0 + 2 days
    deleted = q.prune(db, cutoff, batch_rows=64)
    kept = [r for r in records if r.ts >= T0 + 2 * DAY]
    assert deleted == len(records) - len(kept)
    assert db.execute("SELECT COUNT(*) FROM requests").fetchone()[0] == len(kept)
    assert db.execute("SELECT MIN(day) FROM daily_usage").fetchone()[0] == utc_day(T0 + 2 * DAY)
    assert q.summary(db, None, None, [])[0]["requests"] == len(kept)  # rollup and rows agree
