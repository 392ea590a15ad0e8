"""Requests / tokens / concurrency budgets per principal, tenant and (principal, model).

Algorithm: GCRA (the "virtual scheduling" form of a token bucket). Each budget keeps one number,
the theoretical arrival time `tat`. With a limit of L per minute every unit costs T = 60/L
seconds; a cost c is admitted when `max(tat, now) + c*T - now <= 60`, i.e. the bucket holds a
minute's worth and refills continuously: no fixed-window double bursts.

`RateLimiter.acquire` reserves one request, the estimated tokens and a concurrency slot in every
applicable scope atomically (all or nothing); `settle` charges or refunds the difference
between the estimate and real usage and frees the slot (idempotent). Stores: `MemoryStore`
(one process; every operation runs without awaiting, so it is atomic on the event loop) and
`policies.ratelimit_redis.RedisStore` (one Lua script per operation; several processes share
limits exactly).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from gateway.settings import LimitSet, RateLimitSettings, Settings, TierSettings
from policies.auth import Principal
from policies.gcra import PERIOD_S, Outcome, Scope, ScopeState, reserve_all, settle_tat

log = logging.getLogger("aibox.ratelimit")

__all__ = [
    "PERIOD_S",
    "LimitExceeded",
    "LimiterUnavailable",
    "MemoryStore",
    "RateLimiter",
    "Reservation",
    "Scope",
    "StoreUnavailable",
    "build_limiter",
    "format_duration",
    "rate_headers",
]


class LimitExceeded(Exception):
    """A budget is spent (HTTP 429). `headers` carry Retry-After and the x-ratelimit-* set."""

    def __init__(self, message: str, retry_after_s: float, headers: dict[str, str], quota: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s
        self.headers = headers
        self.quota = quota


class LimiterUnavailable(Exception):
    """The shared store is down and `fail_open = false` (HTTP 503)."""

    def __init__(self, message: str = "Rate limiting is temporarily unavailable; please retry shortly.") -> None:
        super().__init__(message)
        self.message = message


class StoreUnavailable(Exception):
    """Raised by a store that cannot reach its backing service."""


class LimitStore(Protocol):
    async def reserve(self, reservation_id: str, scopes: Sequence[Scope], tokens: int, lease_s: float) -> Outcome: ...

    async def settle(self, reservation_id: str, scopes: Sequence[Scope], token_delta: int) -> None: ...

    async def close(self) -> None: ...


@dataclass(slots=True)
class Reservation:
    """What `acquire` took; hand it back to `settle` exactly once (more is harmless)."""

    id: str
    scopes: tuple[Scope, ...]
    tokens: int
    headers: dict[str, str] = field(default_factory=dict)
    degraded: bool = False  # admitted without checking because the store was down (fail_open)
    settled: bool = False


class MemoryStore:
    """Single-process store. No awaits inside an operation, so asyncio cannot interleave them."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._tat: dict[str, float] = {}
        self._leases: dict[str, dict[str, float]] = {}  # scope key -> reservation id -> expiry
        self._lock = threading.Lock()  # also safe if called from several threads
        self._num_ops = 0

    async def reserve(self, reservation_id: str, scopes: Sequence[Scope], tokens: int, lease_s: float) -> Outcome:
        with self._lock:
            now = self.clock()
            self._num_ops += 1
            if self._num_ops % 4096 == 0:
                self._sweep(now)
            in_flight = []
            for s in scopes:
                leases = self._leases.get(s.key)
                if leases:
                    for rid in [r for r, exp in leases.items() if exp <= now]:
                        del leases[rid]  # a lease whose holder vanished without settling
                in_flight.append(len(leases) if leases else 0)
            tats = [(self._tat.get(s.req_key, now), self._tat.get(s.tok_key, now)) for s in scopes]
            outcome = reserve_all(scopes, tats, in_flight, tokens, now)
            if outcome.admitted:
                for s, (req_tat, tok_tat) in zip(scopes, outcome.new_tats, strict=True):
                    if s.rpm:
                        self._tat[s.req_key] = req_tat
                    if s.tpm:
                        self._tat[s.tok_key] = tok_tat
                    if s.max_concurrent:
                        self._leases.setdefault(s.key, {})[reservation_id] = now + lease_s
            return outcome

    async def settle(self, reservation_id: str, scopes: Sequence[Scope], token_delta: int) -> None:
        with self._lock:
            now = self.clock()
            for s in scopes:
                if s.tpm and token_delta:
                    self._tat[s.tok_key] = settle_tat(self._tat.get(s.tok_key, now), now, token_delta, s.tpm)
                if s.max_concurrent:
                    self._leases.get(s.key, {}).pop(reservation_id, None)

    def _sweep(self, now: float) -> None:
        """Forget budgets that are fully refilled and empty lease tables (bounded memory)."""
        for k in [k for k, tat in self._tat.items() if tat <= now]:
            del self._tat[k]
        for k in [k for k, leases in self._leases.items() if not leases]:
            del self._leases[k]

    async def close(self) -> None:
        return None


def _key_part(text: str) -> str:
    # length-prefixed so that "a:b" + "c" and "a" + "b:c" never collide
    return f"{len(text)}.{text}"


class RateLimiter:
    """Plans the scopes for a request and asks the store to reserve them."""

    def __init__(
        self,
        settings: RateLimitSettings,
        store: LimitStore,
        *,
        lease_s: float = 660.0,
        settle_retry_delays_s: Sequence[float] = (1, 2, 4, 8, 15, 30),
    ) -> None:
        self.settings = settings
        self.store = store
        self.lease_s = lease_s  # a concurrency slot is freed after this long even if never settled
        self.settle_retry_delays_s = tuple(settle_retry_delays_s)
        self.num_store_errors = 0
        self.num_degraded_admissions = 0
        self._last_warning = float("-inf")
        self._retries: set[asyncio.Task[None]] = set()
        self._scopes: dict[tuple[str | None, str, str | None, str], tuple[Scope, ...]] = {}  # scopes_for() memo
        self._id_prefix = uuid.uuid4().hex[:16] + "-"  # reservation ids: this limiter's prefix + a counter
        self._ids = itertools.count(1)

    def tier_for(self, principal: Principal) -> TierSettings | None:
        """The principal's tier; unknown or absent -> the default tier; none configured -> None (unlimited)."""
        tiers = self.settings.tiers
        if principal.tier is not None and principal.tier in tiers:
            return tiers[principal.tier]
        return tiers.get(self.settings.default_tier)

    def scopes_for(self, principal: Principal, model: str) -> tuple[Scope, ...]:
        """Every budget this request draws from (limits of 0 everywhere are left out)."""
        memo = (principal.tier, principal.subject, principal.tenant, model)
        scopes = self._scopes.get(memo)
        if scopes is None:
            if len(self._scopes) >= 10_000:  # bounded: many distinct callers just recompute
                self._scopes.clear()
            scopes = self._scopes[memo] = self._plan_scopes(principal, model)
        return scopes

    def _plan_scopes(self, principal: Principal, model: str) -> tuple[Scope, ...]:
        tier = self.tier_for(principal)
        if tier is None:
            return ()
        sub = _key_part(principal.subject)
        candidates: list[tuple[str, str, LimitSet]] = [("principal", f"p:{sub}", tier.principal)]
        if principal.tenant is not None:
            candidates.append(("tenant", f"t:{_key_part(principal.tenant)}", tier.tenant))
        candidates.append(("model", f"m:{sub}:{_key_part(model)}", tier.models.get(model, tier.model)))
        return tuple(
            Scope(kind=kind, key=key, rpm=ls.requests_per_minute, tpm=ls.tokens_per_minute, max_concurrent=ls.max_concurrent)
            for kind, key, ls in candidates
            if ls.requests_per_minute or ls.tokens_per_minute or ls.max_concurrent
        )

    async def acquire(self, principal: Principal, model: str, estimated_tokens: int) -> Reservation:
        """Reserve 1 request + `estimated_tokens` + a slot everywhere, or raise LimitExceeded."""
        tokens = max(0, int(estimated_tokens))
        rid = f"{self._id_prefix}{next(self._ids):x}"  # unique across processes sharing a store
        scopes = self.scopes_for(principal, model)
        if not scopes:
            return Reservation(rid, (), tokens)
        try:
            outcome = await self.store.reserve(rid, scopes, tokens, self.lease_s)
        except StoreUnavailable as exc:
            self.num_store_errors += 1
            self._warn(f"rate limit store unavailable ({exc}); " + ("admitting (fail_open)" if self.settings.fail_open else "rejecting"))
            if not self.settings.fail_open:
                raise LimiterUnavailable() from None
            self.num_degraded_admissions += 1
            return Reservation(rid, (), tokens, degraded=True)
        headers = rate_headers(scopes, outcome.states)
        if not outcome.admitted:
            raise _exceeded(scopes, outcome, tokens, headers)
        return Reservation(rid, scopes, tokens, headers)

    async def settle(self, reservation: Reservation, used_tokens: int) -> None:
        """Reconcile tokens with real usage and free the concurrency slots. Idempotent."""
        if reservation.settled:
            return
        reservation.settled = True
        if not reservation.scopes:
            return
        delta = max(0, int(used_tokens)) - reservation.tokens
        try:
            await self.store.settle(reservation.id, reservation.scopes, delta)
        except StoreUnavailable as exc:
            self.num_store_errors += 1
            self._warn(f"rate limit store unavailable while settling ({exc}); will retry")
            self._retry_later(reservation, delta)

    def _retry_later(self, reservation: Reservation, delta: int) -> None:
        """Settle again in the background so a short outage does not hold slots until lease end."""
        if len(self._retries) >= 10_000:
            return  # a long outage: the leases' expiry frees the slots instead
        task = asyncio.get_running_loop().create_task(self._settle_with_retries(reservation, delta))
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)

    async def _settle_with_retries(self, reservation: Reservation, delta: int) -> None:
        for delay in self.settle_retry_delays_s:
            await asyncio.sleep(delay)
            try:
                await self.store.settle(reservation.id, reservation.scopes, delta)
                return
            except StoreUnavailable:
                self.num_store_errors += 1

    async def close(self) -> None:
        for task in list(self._retries):
            task.cancel()
        await asyncio.gather(*self._retries, return_exceptions=True)
        await self.store.close()

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_warning >= 10.0:  # at most one line per 10 s during an outage
            self._last_warning = now
            log.warning("%s [store errors so far: %d]", message, self.num_store_errors)


_KIND_WORDS = {"principal": "per user", "tenant": "per organization", "model": "per user and model"}


def _exceeded(scopes: Sequence[Scope], outcome: Outcome, tokens: int, headers: dict[str, str]) -> LimitExceeded:
    scope = scopes[outcome.failed_index]
    where = _KIND_WORDS[scope.kind]
    retry = max(outcome.retry_after_s, 0.001)
    if outcome.reason == "concurrency":
        message = f"Too many concurrent requests ({where}): limit {scope.max_concurrent}. Retry when one finishes."
    elif outcome.reason == "too_large":
        message = (
            f"Request too large for tokens per minute ({where}): limit {scope.tpm}, requested {tokens}."
            " Reduce the prompt or max_tokens."
        )
    else:
        what, limit = ("requests", scope.rpm) if outcome.reason == "requests" else ("tokens", scope.tpm)
        message = f"Rate limit reached for {what} per minute ({where}): limit {limit}. Please try again in {format_duration(retry)}."
    headers = dict(headers)
    headers["retry-after"] = str(max(1, math.ceil(retry)))
    headers["retry-after-ms"] = str(max(1, math.ceil(retry * 1000)))
    return LimitExceeded(message, retry, headers, quota=False)


def rate_headers(scopes: Sequence[Scope], states: Sequence[ScopeState]) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers for the tightest requests and tokens budgets."""
    headers: dict[str, str] = {}
    pairs = list(zip(scopes, states, strict=True))
    req = [(st.remaining_requests, -st.reset_requests_s, s.rpm, st.reset_requests_s) for s, st in pairs if s.rpm]
    tok = [(st.remaining_tokens, -st.reset_tokens_s, s.tpm, st.reset_tokens_s) for s, st in pairs if s.tpm]
    for suffix, rows in (("requests", req), ("tokens", tok)):
        if rows:
            remaining, _, limit, reset = min(rows)
            headers[f"x-ratelimit-limit-{suffix}"] = str(limit)
            headers[f"x-ratelimit-remaining-{suffix}"] = str(max(0, remaining))
            headers[f"x-ratelimit-reset-{suffix}"] = format_duration(reset)
    return headers


def format_duration(seconds: float) -> str:
    """Go-style durations as OpenAI sends them: '20ms', '1s', '1.5s', '6m0s', '1h0m0s'."""
    ms = max(0, math.ceil(seconds * 1000 - 1e-6))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def _tier_has_limits(tier: TierSettings) -> bool:
    sets = [tier.principal, tier.tenant, tier.model, *tier.models.values()]
    return any(ls.requests_per_minute or ls.tokens_per_minute or ls.max_concurrent for ls in sets)


def build_limiter(settings: Settings, *, clock: Callable[[], float] | None = None) -> RateLimiter | None:
    """The limiter `[ratelimit]` asks for; None when disabled or no tier sets any limit.
    Redis is imported only if used."""
    rl = settings.ratelimit
    if not rl.enabled or not any(_tier_has_limits(t) for t in rl.tiers.values()):
        return None
    lease_s = settings.server.request_timeout_s + 60.0
    if rl.store == "redis":
        from policies.ratelimit_redis import RedisStore, redis_url

        return RateLimiter(rl, RedisStore(redis_url(rl), clock=clock), lease_s=lease_s)
    return RateLimiter(rl, MemoryStore(clock or time.monotonic), lease_s=lease_s)
