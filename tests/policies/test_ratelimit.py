"""Rate limiter with the memory store and an injected clock."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from gateway.settings import LimitSet, RateLimitSettings, Settings, TierSettings
from policies.auth import Principal
from policies.gcra import Outcome, Scope
from policies.ratelimit import LimitExceeded, MemoryStore, RateLimiter, StoreUnavailable, build_limiter, format_duration

ALICE = Principal("alice", tenant="acme")
BOB = Principal("bob", tenant="acme")


class Clock:
    def __init__(self) -> None:
        self.now = 10_000.0

    def __call__(self) -> float:
        return self.now


def limiter(clock: Clock, **tiers: TierSettings) -> RateLimiter:
    settings = RateLimitSettings(tiers=tiers or {"default": TierSettings()})
    return RateLimiter(settings, MemoryStore(clock), lease_s=300)


def tier(principal=LimitSet(), tenant=LimitSet(), model=LimitSet(), **models: LimitSet) -> TierSettings:  # type: ignore[no-untyped-def]
    return TierSettings(principal=principal, tenant=tenant, model=model, models=models)


async def burst(lim: RateLimiter, n: int, principal: Principal = ALICE, model: str = "m", tokens: int = 0) -> list:
    """n concurrent acquires; returns Reservations and LimitExceeded errors."""
    return await asyncio.gather(*(lim.acquire(principal, model, tokens) for _ in range(n)), return_exceptions=True)


def admitted(results: list) -> int:
    for r in results:
        assert not isinstance(r, Exception) or isinstance(r, LimitExceeded), r
    return sum(not isinstance(r, Exception) for r in results)


@pytest.mark.parametrize(
    ("limits", "tokens", "expected"),
    [
        (LimitSet(requests_per_minute=10), 0, 10),
        (LimitSet(tokens_per_minute=1000), 100, 10),
        (LimitSet(max_concurrent=7), 0, 7),
        (LimitSet(requests_per_minute=20, tokens_per_minute=1000, max_concurrent=30), 200, 5),
    ],
    ids=["rpm", "tpm", "concurrency", "tightest-wins"],
)
async def test_concurrent_burst_of_50_admits_exactly_the_limit(limits: LimitSet, tokens: int, expected: int) -> None:
    lim = limiter(Clock(), default=tier(principal=limits))
    assert admitted(await burst(lim, 50, tokens=tokens)) == expected


async def test_refill_over_injected_time() -> None:
    clock = Clock()
    lim = limiter(clock, default=tier(principal=LimitSet(requests_per_minute=60)))  # one per second
    assert admitted(await burst(lim, 61)) == 60
    with pytest.raises(LimitExceeded) as info:
        await lim.acquire(ALICE, "m", 0)
    assert info.value.retry_after_s == pytest.approx(1.0)
    assert info.value.headers["retry-after"] == "1" and info.value.headers["retry-after-ms"] == "1000"
    assert not info.value.quota and "requests per minute" in info.value.message
    clock.now += 0.5
    assert admitted(await burst(lim, 1)) == 0  # half a unit is not a unit
    clock.now += 0.5
    assert admitted(await burst(lim, 2)) == 1
    clock.now += 30
    assert admitted(await burst(lim, 40)) == 30
    clock.now += 3600  # a long idle period refills to the burst size, not beyond
    assert admitted(await burst(lim, 100)) == 60


async def test_token_reservation_and_reconciliation() -> None:
    clock = Clock()
    lim = limiter(clock, default=tier(principal=LimitSet(tokens_per_minute=1000)))
    first = await lim.acquire(ALICE, "m", 600)
    assert first.headers["x-ratelimit-remaining-tokens"] == "400"
    with pytest.raises(LimitExceeded, match="tokens per minute"):
        await lim.acquire(ALICE, "m", 600)
    await lim.settle(first, 100)  # used far less than reserved: 500 come back
    await lim.settle(first, 100)  # idempotent: no second refund
    second = await lim.acquire(ALICE, "m", 600)
    assert second.headers["x-ratelimit-remaining-tokens"] == "300"
    await lim.settle(second, 900)  # used more than reserved: the excess is charged
    with pytest.raises(LimitExceeded) as info:
        await lim.acquire(ALICE, "m", 1)
    # 100 + 900 used of 1000: full; one token refills in 60/1000 s
    assert info.value.retry_after_s == pytest.approx(0.06)
    assert info.value.headers["retry-after"] == "1" and info.value.headers["retry-after-ms"] == "60"


async def test_request_larger_than_the_budget_is_refused_clearly() -> None:
    lim = limiter(Clock(), default=tier(principal=LimitSet(tokens_per_minute=1000)))
    with pytest.raises(LimitExceeded, match="Request too large.*requested 5000"):
        await lim.acquire(ALICE, "m", 5000)


async def test_concurrency_slot_is_freed_by_settle() -> None:
    lim = limiter(Clock(), default=tier(principal=LimitSet(max_concurrent=2)))
    a, b = await lim.acquire(ALICE, "m", 0), await lim.acquire(ALICE, "m", 0)
    with pytest.raises(LimitExceeded, match="concurrent"):
        await lim.acquire(ALICE, "m", 0)
    await lim.settle(a, 0)
    c = await lim.acquire(ALICE, "m", 0)
    assert c is not None and b is not None


async def test_unsettled_lease_expires() -> None:
    clock = Clock()
    lim = limiter(clock, default=tier(principal=LimitSet(max_concurrent=1)))
    await lim.acquire(ALICE, "m", 0)  # the caller "crashes" and never settles
    with pytest.raises(LimitExceeded):
        await lim.acquire(ALICE, "m", 0)
    clock.now += 301
    await lim.acquire(ALICE, "m", 0)


async def test_all_or_nothing_across_scopes() -> None:
    """A request the model scope rejects takes nothing from the principal or tenant scopes."""
    lim = limiter(
        Clock(),
        default=tier(
            principal=LimitSet(requests_per_minute=100),
            tenant=LimitSet(requests_per_minute=1000),
            model=LimitSet(requests_per_minute=1000),
            small=LimitSet(requests_per_minute=2),
        ),
    )
    assert admitted(await burst(lim, 10, model="small")) == 2
    other = await lim.acquire(ALICE, "large", 0)
    assert other.headers["x-ratelimit-remaining-requests"] == "97"  # principal: 100 - 2 - this one


async def test_tenant_scope_is_shared_and_model_scope_is_per_subject() -> None:
    lim = limiter(Clock(), default=tier(tenant=LimitSet(requests_per_minute=5), model=LimitSet(requests_per_minute=3)))
    assert admitted(await burst(lim, 5, principal=ALICE)) == 3  # alice's model budget
    assert admitted(await burst(lim, 5, principal=BOB)) == 2  # the tenant's remaining 2
    assert admitted(await burst(lim, 5, principal=Principal("carol", tenant="other"))) == 3


async def test_tiers_and_default_tier() -> None:
    gold, default = tier(principal=LimitSet(requests_per_minute=5)), tier(principal=LimitSet(requests_per_minute=2))
    lim = limiter(Clock(), gold=gold, default=default)
    assert admitted(await burst(lim, 10, principal=Principal("g", tier="gold"))) == 5
    assert admitted(await burst(lim, 10, principal=Principal("u", tier="unknown"))) == 2  # unknown -> default
    assert admitted(await burst(lim, 10, principal=Principal("n"))) == 2
    no_default = RateLimiter(RateLimitSettings(tiers={"gold": gold}), MemoryStore(Clock()))
    assert admitted(await burst(no_default, 10, principal=Principal("n"))) == 10  # no tier: unlimited
    r = await no_default.acquire(Principal("n"), "m", 0)
    assert r.headers == {} and r.scopes == ()


async def test_headers_report_the_tightest_scope() -> None:
    lim = limiter(
        Clock(),
        default=tier(principal=LimitSet(requests_per_minute=600, tokens_per_minute=10_000), model=LimitSet(requests_per_minute=6)),
    )
    r = await lim.acquire(ALICE, "m", 2500)
    assert r.headers == {
        "x-ratelimit-limit-requests": "6",
        "x-ratelimit-remaining-requests": "5",
        "x-ratelimit-reset-requests": "10s",
        "x-ratelimit-limit-tokens": "10000",
        "x-ratelimit-remaining-tokens": "7500",
        "x-ratelimit-reset-tokens": "15s",
    }


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (0.02, "20ms"), (0.0201, "21ms"), (1, "1s"), (1.5, "1.5s"), (59.999, "59.999s"), (360, "6m0s"), (90.25, "1m30.25s"), (3600, "1h0m0s")],
)
def test_format_duration_matches_openai(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_build_limiter_none_without_any_limit() -> None:
    assert build_limiter(Settings()) is None
    assert build_limiter(Settings(ratelimit=RateLimitSettings(enabled=False, tiers={"default": tier(principal=LimitSet(max_concurrent=1))}))) is None
    lim = build_limiter(Settings(ratelimit=RateLimitSettings(tiers={"default": tier(principal=LimitSet(max_concurrent=1))})))
    assert isinstance(lim, RateLimiter) and isinstance(lim.store, MemoryStore)


async def test_subject_names_with_separators_do_not_collide() -> None:
    lim = limiter(Clock(), default=tier(model=LimitSet(requests_per_minute=1)))
    await lim.acquire(Principal("a:b"), "c", 0)
    await lim.acquire(Principal("a"), "b:c", 0)  # would share a key with naive "a:b:c" joining


class FlakyStore(MemoryStore):
    """A memory store whose backing service can be switched off, like a Redis outage."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.down = False

    async def reserve(self, reservation_id: str, scopes: Sequence[Scope], tokens: int, lease_s: float) -> Outcome:
        if self.down:
            raise StoreUnavailable("down")
        return await super().reserve(reservation_id, scopes, tokens, lease_s)

    async def settle(self, reservation_id: str, scopes: Sequence[Scope], token_delta: int) -> None:
        if self.down:
            raise StoreUnavailable("down")
        await super().settle(reservation_id, scopes, token_delta)


async def test_settle_during_a_short_outage_is_retried() -> None:
    store = FlakyStore(Clock())
    settings = RateLimitSettings(tiers={"default": tier(principal=LimitSet(max_concurrent=1))})
    lim = RateLimiter(settings, store, lease_s=300, settle_retry_delays_s=(0.01, 0.01, 0.05))
    held = await lim.acquire(ALICE, "m", 0)
    store.down = True
    await lim.settle(held, 0)  # fails now; never raises
    await asyncio.sleep(0.015)  # first retry fails too
    store.down = False
    await asyncio.sleep(0.1)
    await lim.acquire(ALICE, "m", 0)  # the slot was freed by a retry, long before the lease ends
    assert lim.num_store_errors >= 2
    await lim.close()
