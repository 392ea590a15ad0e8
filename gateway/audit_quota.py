"""Token quotas per tenant and per subject, per UTC day and per UTC month.

Enforcement reads running totals kept in memory: seeded once from the `daily_usage` rollup
when the store starts, then bumped by every recorded request. So a quota check is a dict
lookup, not a query. A quota key "*" is the default for every tenant (or subject) without an
entry of its own; a limit of 0 means unlimited.
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone

from gateway.settings import QuotaSettings


class QuotaExhausted(Exception):
    """A tenant or subject has used its token quota; `reset_at` is when it frees up (unix s)."""

    def __init__(self, message: str, reset_at: float) -> None:
        super().__init__(message)
        self.message = message
        self.reset_at = reset_at


def _day(ts: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


def next_day_start(ts: float) -> float:
    """Unix time of the next UTC midnight after `ts`."""
    return (int(ts) // 86400 + 1) * 86400.0


def next_month_start(ts: float) -> float:
    """Unix time of 00:00 UTC on the first day of the month after `ts`."""
    t = time.gmtime(ts)
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return float(calendar.timegm((year, month, 1, 0, 0, 0)))


def iso(ts: float) -> str:
    """'2026-11-25T00:00:00Z' for messages and CLI output."""
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(slots=True)
class _Usage:
    day: str = ""
    day_tokens: int = 0
    month: str = ""
    month_tokens: int = 0

    def add(self, day: str, tokens: int) -> None:
        # Rows can arrive slightly out of order (ts is the request's start); a row from a
        # past period never counts against the current one.
        if day > self.day:
            self.day, self.day_tokens = day, 0
        if day == self.day:
            self.day_tokens += tokens
        month = day[:7]
        if month > self.month:
            self.month, self.month_tokens = month, 0
        if month == self.month:
            self.month_tokens += tokens


@dataclass(frozen=True, slots=True)
class QuotaStatus:
    """Where one tenant or subject stands; limits of 0 mean unlimited."""

    kind: str  # "tenant" | "subject"
    key: str
    day_limit: int
    day_used: int
    day_resets_at: float
    month_limit: int
    month_used: int
    month_resets_at: float

    @property
    def day_remaining(self) -> int | None:
        return max(0, self.day_limit - self.day_used) if self.day_limit else None

    @property
    def month_remaining(self) -> int | None:
        return max(0, self.month_limit - self.month_used) if self.month_limit else None


class QuotaTracker:
    """Running token totals per tenant and subject, and the quota decision over them."""

    def __init__(
        self,
        tenant_quotas: dict[str, QuotaSettings],
        subject_quotas: dict[str, QuotaSettings],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._quotas = {"tenant": tenant_quotas, "subject": subject_quotas}
        self._usage: dict[tuple[str, str], _Usage] = {}
        self._clock = clock

    def set_quotas(self, tenant_quotas: dict[str, QuotaSettings], subject_quotas: dict[str, QuotaSettings]) -> None:
        """New limits (config reload); the running totals stay."""
        self._quotas = {"tenant": tenant_quotas, "subject": subject_quotas}

    @property
    def enabled(self) -> bool:
        return any(self._quotas.values())

    @property
    def kinds(self) -> tuple[str, ...]:
        """"tenant" and/or "subject": the kinds that have quotas (only those need totals)."""
        return tuple(kind for kind, quotas in self._quotas.items() if quotas)

    def limits(self, kind: str, key: str) -> QuotaSettings | None:
        """The quota for a tenant/subject: its own entry, else the "*" default, else None."""
        quotas = self._quotas[kind]
        return quotas.get(key) or quotas.get("*")

    def seed(self, rows: Iterable[tuple[str, str, str, int, int]]) -> None:
        """Load (kind, key, today, tokens today, tokens this month) totals (from the rollup)."""
        for kind, key, day, day_tokens, month_tokens in rows:
            self._usage[(kind, key)] = _Usage(day=day, day_tokens=day_tokens, month=day[:7], month_tokens=month_tokens)

    def add(self, tenant: str | None, subject: str, ts: float, tokens: int) -> None:
        """Count a request's tokens (called when it is recorded)."""
        if tokens <= 0:
            return
        day = _day(ts)
        if tenant:
            self._usage.setdefault(("tenant", tenant), _Usage()).add(day, tokens)
        self._usage.setdefault(("subject", subject), _Usage()).add(day, tokens)

    def status(self, kind: str, key: str, now: float | None = None) -> QuotaStatus:
        """Usage against the limits of one tenant/subject at `now`."""
        now = self._clock() if now is None else now
        day = _day(now)
        usage = self._usage.get((kind, key), _Usage())
        limits = self.limits(kind, key) or QuotaSettings()
        return QuotaStatus(
            kind=kind,
            key=key,
            day_limit=limits.tokens_per_day,
            day_used=usage.day_tokens if usage.day == day else 0,
            day_resets_at=next_day_start(now),
            month_limit=limits.tokens_per_month,
            month_used=usage.month_tokens if usage.month == day[:7] else 0,
            month_resets_at=next_month_start(now),
        )

    def check(self, tenant: str | None, subject: str) -> None:
        """Raise QuotaExhausted if the tenant's or the subject's quota is used up."""
        if not self.enabled:
            return
        for kind, key in (("tenant", tenant), ("subject", subject)):
            if not key or self.limits(kind, key) is None:
                continue
            st = self.status(kind, key)
            # Month first: when both are exhausted, the later reset is the honest answer.
            if st.month_limit and st.month_used >= st.month_limit:
                raise QuotaExhausted(
                    f"The {kind} '{key}' has used its monthly quota of {st.month_limit} tokens; "
                    f"it resets at {iso(st.month_resets_at)}.",
                    st.month_resets_at,
                )
            if st.day_limit and st.day_used >= st.day_limit:
                raise QuotaExhausted(
                    f"The {kind} '{key}' has used its daily quota of {st.day_limit} tokens; "
                    f"it resets at {iso(st.day_resets_at)}.",
                    st.day_resets_at,
                )

    def keys(self, kind: str) -> list[str]:
        """Keys with a quota of their own or with usage this month (for `aibox usage quota`)."""
        seen = {k for k in self._quotas[kind] if k != "*"}
        seen.update(key for (k, key) in self._usage if k == kind and self.limits(kind, key) is not None)
        return sorted(seen)
