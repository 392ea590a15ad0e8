"""Rate limiter on a real redis-server started by the test (tests/redis_server.py)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from gateway.settings import LimitSet, RateLimitSettings, TierSettings
from policies.auth import Principal
from policies.ratelimit import LimitExceeded, LimiterUnavailable, RateLimiter
from policies.ratelimit_redis import RedisStore
from tests.redis_server import RedisServer

ALICE = Principal("alice", tenant="acme")
ROOT = Path(__file__).resolve().parents[2]


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def make(redis_server: RedisServer) -> AsyncIterator[Callable[..., RateLimiter]]:
    made: list[RateLimiter] = []

    def build(limits: LimitSet, *, clock: Clock | None = None, fail_open: bool = True, retry_s: float = 1.0) -> RateLimiter:
        settings = RateLimitSettings(store="redis", fail_open=fail_open, tiers={"default": TierSettings(principal=limits)})
        lim = RateLimiter(settings, RedisStore(redis_server.url, clock=clock, retry_s=retry_s), lease_s=300)
        made.append(lim)
        return lim

    yield build
    for lim in made:
        await lim.close()


async def burst(lim: RateLimiter, n: int, tokens: int = 0) -> int:
    results = await asyncio.gather(*(lim.acquire(ALICE, "m", tokens) for _ in range(n)), return_exceptions=True)
    unexpected = [r for r in results if isinstance(r, Exception) and not isinstance(r, LimitExceeded)]
    assert not unexpected, unexpected
    return sum(not isinstance(r, Exception) for r in results)


@pytest.mark.parametrize(
    ("limits", "tokens", "expected"),
    [(LimitSet(requests_per_minute=10), 0, 10), (LimitSet(tokens_per_minute=1000), 100, 10), (LimitSet(max_concurrent=7), 0, 7)],
    ids=["rpm", "tpm", "concurrency"],
)
async def test_concurrent_burst_exact(make, limits: LimitSet, tokens: int, expected: int) -> None:
    assert await burst(make(limits), 50, tokens) == expected


async def test_refill_and_reconciliation_with_injected_clock(make) -> None:
    clock = Clock()
    lim = make(LimitSet(requests_per_minute=60, tokens_per_minute=1000), clock=clock)
    first = await lim.acquire(ALICE, "m", 600)
    assert first.headers["x-ratelimit-remaining-tokens"] == "400"
    assert first.headers["x-ratelimit-remaining-requests"] == "59"
    with pytest.raises(LimitExceeded, match="tokens per minute"):
        await lim.acquire(ALICE, "m", 600)
    await lim.settle(first, 100)
    await lim.settle(first, 100)  # idempotent
    second = await lim.acquire(ALICE, "m", 600)
    assert second.headers["x-ratelimit-remaining-tokens"] == "300"
    await lim.settle(second, 900)  # charged beyond the reservation
    with pytest.raises(LimitExceeded) as info:
        await lim.acquire(ALICE, "m", 1)
    assert info.value.retry_after_s == pytest.approx(0.06, abs=1e-4)
    clock.now += 0.06
    await lim.acquire(ALICE, "m", 1)
    assert await burst(lim, 60) == 57  # 60 rpm - 3 taken
    clock.now += 2
    assert await burst(lim, 5) == 2


async def test_refill_with_redis_time(make) -> None:
    """Real time, kept short: 120 rpm refills one request every 0.5 s."""
    lim = make(LimitSet(requests_per_minute=120))
    t0 = time.monotonic()
    n = await burst(lim, 130)
    refilled = int((time.monotonic() - t0) / 0.5)  # a slow machine may see refills during the burst
    assert 120 <= n <= 120 + refilled
    await asyncio.sleep(0.55)
    t1 = time.monotonic()
    m = await burst(lim, 10)
    assert 1 <= m <= 1 + int((time.monotonic() - t1) / 0.5) + 1


async def test_keys_expire(make, redis_server: RedisServer) -> None:
    clock = Clock()
    lim = make(LimitSet(requests_per_minute=60, tokens_per_minute=6000, max_concurrent=4), clock=clock)
    await lim.acquire(ALICE, "m", 100)
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        keys = await client.keys("aibox:rl:*")
        assert len(keys) == 3
        ttls = [await client.pttl(k) for k in keys]
        assert all(0 < t <= 301_000 for t in ttls), ttls
    finally:
        await client.aclose()


@pytest.mark.slow
@pytest.mark.parametrize(("rpm", "max_concurrent", "expected"), [(30, 0, 30), (0, 25, 25)], ids=["rpm", "concurrency"])
def test_two_processes_share_limits_exactly(redis_server: RedisServer, rpm: int, max_concurrent: int, expected: int) -> None:
    start_at = time.time() + 2.0  # both workers import, connect, then fire at the same instant
    cmd = [sys.executable, "-m", "tests.policies.limiter_worker", redis_server.url, repr(start_at), "40", str(rpm), str(max_concurrent)]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=30)
        assert p.returncode == 0, err
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert all(o["degraded"] == 0 for o in outs)
    assert sum(o["admitted"] for o in outs) == expected, outs


async def test_redis_down_fail_open_admits_then_recovers(make, redis_server: RedisServer) -> None:
    lim = make(LimitSet(requests_per_minute=2), retry_s=0.2)
    assert await burst(lim, 5) == 2
    redis_server.stop()
    r = await lim.acquire(ALICE, "m", 0)
    assert r.degraded and r.headers == {}
    assert await burst(lim, 5) == 5  # admitted while the store is down
    assert lim.num_store_errors >= 1 and lim.num_degraded_admissions == 6
    await lim.settle(r, 0)  # settling a degraded reservation is a no-op, not an error
    redis_server.start()  # empty again (no persistence)
    await asyncio.sleep(0.25)  # past the store's open-circuit window
    assert await burst(lim, 5) == 2
    assert (await lim.acquire(Principal("bob"), "m", 0)).degraded is False


async def test_redis_down_fail_closed_raises_unavailable(make, redis_server: RedisServer) -> None:
    lim = make(LimitSet(requests_per_minute=100), fail_open=False, retry_s=0.2)
    held = await lim.acquire(ALICE, "m", 0)
    redis_server.stop()
    t0 = time.monotonic()
    with pytest.raises(LimiterUnavailable) as info:
        await lim.acquire(ALICE, "m", 0)
    assert "unavailable" in info.value.message and "redis" not in info.value.message.lower()
    for _ in range(20):  # open circuit: later calls fail fast, without a connect each
        with pytest.raises(LimiterUnavailable):
            await lim.acquire(ALICE, "m", 0)
    assert time.monotonic() - t0 < 2.0
    await lim.settle(held, 0)  # logged, never raised: the request's answer is already decided
    redis_server.start()
    await asyncio.sleep(0.25)
    await lim.acquire(ALICE, "m", 0)


async def test_settle_completes_when_the_request_task_is_cancelled(make) -> None:
    lim = make(LimitSet(max_concurrent=1))
    r = await lim.acquire(ALICE, "m", 0)

    async def request_task() -> None:
        try:
            await asyncio.sleep(10)
        finally:
            await lim.settle(r, 0)  # what the pipeline does on client disconnect

    task = asyncio.create_task(request_task())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.05)
    await lim.acquire(ALICE, "m", 0)  # the slot was freed
