"""The GCRA arithmetic shared by the stores (the Redis Lua script mirrors it line by line).

A budget of L units per minute stores `tat`, the time at which it would be full again. One unit
costs T = 60/L seconds. A reservation of c units is admitted when
`max(tat, now) + c*T - now <= 60`; then `tat` becomes that sum.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

PERIOD_S = 60.0
# Float slack: L reservations of T = 60/L must add up to "exactly full", not 60.0000000001.
EPSILON_S = 1e-4
CONCURRENCY_RETRY_S = 1.0

Reason = Literal["requests", "tokens", "too_large", "concurrency"]


@dataclass(frozen=True, slots=True)
class Scope:
    """One budget holder (a principal, a tenant, a principal+model) with its limits (0 = none)."""

    kind: Literal["principal", "tenant", "model"]
    key: str
    rpm: int = 0
    tpm: int = 0
    max_concurrent: int = 0

    @property
    def req_key(self) -> str:
        return f"{self.key}:r"

    @property
    def tok_key(self) -> str:
        return f"{self.key}:t"


@dataclass(slots=True)
class ScopeState:
    """A scope's budgets after the operation, for the x-ratelimit-* headers."""

    remaining_requests: int = 0
    reset_requests_s: float = 0.0
    remaining_tokens: int = 0
    reset_tokens_s: float = 0.0


@dataclass(slots=True)
class Outcome:
    admitted: bool
    states: list[ScopeState]
    new_tats: list[tuple[float, float]] = field(default_factory=list)  # per scope, when admitted
    failed_index: int = -1
    reason: Reason | None = None
    retry_after_s: float = 0.0


def remaining(tat: float, now: float, limit: int) -> int:
    """Units still available in a budget whose theoretical arrival time is `tat`."""
    return max(0, math.floor((PERIOD_S - (tat - now)) * limit / PERIOD_S + 1e-6))


def reserve_all(
    scopes: Sequence[Scope], tats: Sequence[tuple[float, float]], in_flight: Sequence[int], tokens: int, now: float
) -> Outcome:
    """Check every scope; admit only if all admit. Pure: the caller writes `new_tats`."""
    failures: list[tuple[float, int, Reason]] = []  # (retry_after, index, reason)
    old: list[tuple[float, float]] = []
    new: list[tuple[float, float]] = []
    for i, s in enumerate(scopes):
        req_tat, tok_tat = max(tats[i][0], now), max(tats[i][1], now)
        new_req, new_tok = req_tat, tok_tat
        if s.rpm:
            new_req = req_tat + PERIOD_S / s.rpm
            if new_req - now > PERIOD_S + EPSILON_S:
                failures.append((new_req - now - PERIOD_S, i, "requests"))
        if s.tpm:
            if tokens > s.tpm:
                failures.append((math.inf, i, "too_large"))  # never fits: report it first
            else:
                new_tok = tok_tat + tokens * PERIOD_S / s.tpm
                if new_tok - now > PERIOD_S + EPSILON_S:
                    failures.append((new_tok - now - PERIOD_S, i, "tokens"))
        if s.max_concurrent and in_flight[i] >= s.max_concurrent:
            failures.append((CONCURRENCY_RETRY_S, i, "concurrency"))
        old.append((req_tat, tok_tat))
        new.append((new_req, new_tok))
    admitted = not failures
    shown = new if admitted else old  # a rejected request takes nothing
    states = [
        ScopeState(
            remaining_requests=remaining(r, now, s.rpm) if s.rpm else 0,
            reset_requests_s=r - now,
            remaining_tokens=remaining(t, now, s.tpm) if s.tpm else 0,
            reset_tokens_s=t - now,
        )
        for s, (r, t) in zip(scopes, shown, strict=True)
    ]
    if admitted:
        return Outcome(True, states, new_tats=new)
    retry, index, reason = max(failures)
    return Outcome(False, states, failed_index=index, reason=reason, retry_after_s=PERIOD_S if math.isinf(retry) else retry)


def settle_tat(tat: float, now: float, token_delta: int, tpm: int) -> float:
    """Charge (delta > 0) or refund (delta < 0) tokens; a refund never fills past full."""
    cost = token_delta * PERIOD_S / tpm
    if token_delta > 0:
        return max(tat, now) + cost
    return max(tat + cost, now)
