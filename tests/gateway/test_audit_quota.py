"""Token quotas: enforced from running totals, reset at UTC day/month boundaries (injected clock),
seeded from the database when the store restarts."""

from __future__ import annotations

import calendar
from pathlib import Path

import pytest

from gateway.audit import AuditRecord, AuditStore, QuotaExhausted
from gateway.audit_quota import QuotaTracker, next_day_start, next_month_start
from gateway.settings import AuditSettings, QuotaSettings
from policies.auth import Principal


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def utc(y: int, mo: int, d: int, h: int = 0, mi: int = 0) -> float:
    return float(calendar.timegm((y, mo, d, h, mi, 0)))


ALICE = Principal(subject="alice", tenant="acme")
BOB = Principal(subject="bob", tenant="acme")
CAROL = Principal(subject="carol", tenant="globex")


def row(p: Principal, ts: float, tokens: int, i: int = 0) -> AuditRecord:
    return AuditRecord(request_id=f"r{i}-{ts}", ts=ts, subject=p.subject, tenant=p.tenant, status=200,
                       prompt_tokens=tokens // 2, completion_tokens=tokens - tokens // 2)  # fmt: skip


@pytest.mark.parametrize(
    ("now", "day_reset", "month_reset"),
    [
        (utc(2026, 11, 24, 23, 59), utc(2026, 11, 25), utc(2026, 12, 1)),
        (utc(2026, 12, 31, 12), utc(2027, 1, 1), utc(2027, 1, 1)),
        (utc(2028, 2, 28, 1), utc(2028, 2, 29), utc(2028, 3, 1)),
    ],
)
def test_reset_times(now: float, day_reset: float, month_reset: float) -> None:
    assert (next_day_start(now), next_month_start(now)) == (day_reset, month_reset)


def test_daily_tenant_quota_exhausts_and_resets_at_utc_midnight() -> None:
    clock = Clock(utc(2026, 11, 24, 22))
    tracker = QuotaTracker({"acme": QuotaSettings(tokens_per_day=1000)}, {}, clock)
    tracker.add("acme", "alice", clock.t, 600)
    tracker.check("acme", "alice")  # 600 < 1000
    tracker.add("acme", "bob", clock.t, 400)  # the tenant's budget is shared by its subjects
    with pytest.raises(QuotaExhausted) as exc:
        tracker.check("acme", "bob")
    assert exc.value.reset_at == utc(2026, 11, 25)
    assert "tenant 'acme'" in exc.value.message and "daily quota of 1000 tokens" in exc.value.message
    assert "resets at 2026-11-25T00:00:00Z" in exc.value.message
    tracker.check("globex", "carol")  # other tenants are untouched
    clock.t = utc(2026, 11, 25, 0, 1)
    tracker.check("acme", "bob")  # a new UTC day
    assert tracker.status("tenant", "acme").day_used == 0


def test_monthly_quota_wins_over_daily_and_resets_next_month() -> None:
    clock = Clock(utc(2026, 11, 20))
    tracker = QuotaTracker({"acme": QuotaSettings(tokens_per_day=500, tokens_per_month=1200)}, {}, clock)
    for day in (20, 21, 22):
        clock.t = utc(2026, 11, day, 12)
        tracker.add("acme", "alice", clock.t, 400)
    with pytest.raises(QuotaExhausted) as exc:
        tracker.check("acme", "alice")
    assert exc.value.reset_at == utc(2026, 12, 1) and "monthly quota" in exc.value.message
    clock.t = utc(2026, 12, 1, 0, 0)
    tracker.check("acme", "alice")


def test_subject_quota_and_star_default() -> None:
    clock = Clock(utc(2026, 11, 24, 10))
    subjects = {"*": QuotaSettings(tokens_per_day=100), "bob": QuotaSettings(tokens_per_day=1000)}
    tracker = QuotaTracker({}, subjects, clock)
    tracker.add("acme", "alice", clock.t, 100)
    tracker.add("acme", "bob", clock.t, 100)
    with pytest.raises(QuotaExhausted, match="subject 'alice'"):
        tracker.check("acme", "alice")
    tracker.check("acme", "bob")  # bob's own entry overrides the default
    assert tracker.status("subject", "alice").day_remaining == 0
    assert tracker.status("subject", "bob").day_remaining == 900
    assert tracker.keys("subject") == ["alice", "bob"]


def test_rows_from_an_earlier_day_do_not_count_today() -> None:
    clock = Clock(utc(2026, 11, 24, 0, 0))
    tracker = QuotaTracker({"acme": QuotaSettings(tokens_per_day=100)}, {}, clock)
    tracker.add("acme", "alice", clock.t, 50)
    tracker.add("acme", "alice", utc(2026, 11, 23, 23, 59), 500)  # a long request that began yesterday
    tracker.check("acme", "alice")
    assert tracker.status("tenant", "acme").day_used == 50
    assert tracker.status("tenant", "acme").month_used == 550


async def test_store_enforces_quota_and_reseeds_after_restart(tmp_path: Path) -> None:
    clock = Clock(utc(2026, 11, 24, 12))
    settings = AuditSettings(path=str(tmp_path / "u.db"), tenant_quotas={"acme": QuotaSettings(tokens_per_day=1000, tokens_per_month=5000)})
    store = AuditStore(settings, clock=clock)
    await store.start()
    await store.record(row(ALICE, utc(2026, 11, 3), 3000, 1))  # earlier this month
    await store.record(row(ALICE, clock.t, 600, 2))
    await store.check_quota(BOB)
    await store.record(row(BOB, clock.t, 400, 3))
    with pytest.raises(QuotaExhausted):
        await store.check_quota(ALICE)
    await store.check_quota(CAROL)
    await store.close()

    restarted = AuditStore(settings, clock=clock)  # totals come back from the daily rollup
    await restarted.start()
    with pytest.raises(QuotaExhausted) as exc:
        await restarted.check_quota(BOB)
    assert exc.value.reset_at == utc(2026, 11, 25)
    st = restarted.quotas.status("tenant", "acme")
    assert (st.day_used, st.month_used, st.month_remaining) == (1000, 4000, 1000)
    clock.t = utc(2026, 11, 25, 0, 0)
    await restarted.check_quota(BOB)  # next UTC day: the daily budget is back
    await restarted.close()
