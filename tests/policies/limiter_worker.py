"""A stand-in "gateway process" for the shared-Redis test: `python -m tests.policies.limiter_worker
URL START_AT N RPM` waits until the wall-clock START_AT, fires N concurrent acquires for one
principal against Redis and prints how many were admitted, as JSON."""

from __future__ import annotations

import asyncio
import json
import sys
import time

from gateway.settings import LimitSet, RateLimitSettings, TierSettings
from policies.auth import Principal
from policies.ratelimit import LimitExceeded, RateLimiter
from policies.ratelimit_redis import RedisStore


async def run(url: str, start_at: float, n: int, rpm: int, max_concurrent: int) -> dict[str, int]:
    tier = TierSettings(principal=LimitSet(requests_per_minute=rpm), tenant=LimitSet(max_concurrent=max_concurrent))
    limiter = RateLimiter(RateLimitSettings(store="redis", tiers={"default": tier}), RedisStore(url))
    await limiter.store.reserve("warmup", (), 0, 1.0)  # connect and load the scripts before the start line
    await asyncio.sleep(max(0.0, start_at - time.time()))
    results = await asyncio.gather(
        *(limiter.acquire(Principal("shared", tenant="t"), "m", 0) for _ in range(n)), return_exceptions=True
    )
    await limiter.close()
    errors = [r for r in results if isinstance(r, Exception) and not isinstance(r, LimitExceeded)]
    if errors:
        raise errors[0]
    return {"admitted": sum(not isinstance(r, Exception) for r in results), "degraded": limiter.num_degraded_admissions}


if __name__ == "__main__":
    url, start_at, n, rpm, conc = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    print(json.dumps(asyncio.run(run(url, start_at, n, rpm, conc))))
