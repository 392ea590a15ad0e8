"""Per-request cost of auth and rate limiting, without HTTP: `python bench/auth_ratelimit.py`.

Measures Authenticator.authenticate (HS256; first verification and cached), and
RateLimiter.acquire + settle over three scopes on the memory store and on a real redis-server
(started here on a free port when /usr/bin/redis-server exists).
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.settings import AuthSettings, LimitSet, RateLimitSettings, TierSettings  # noqa: E402
from policies.auth import Authenticator, Principal  # noqa: E402
from policies.ratelimit import MemoryStore, RateLimiter  # noqa: E402
from policies.revocation import RevocationList  # noqa: E402
from policies.tokens import issue_token  # noqa: E402

BIG = 10**9
TIER = TierSettings(
    principal=LimitSet(requests_per_minute=BIG, tokens_per_minute=BIG, max_concurrent=BIG),
    tenant=LimitSet(requests_per_minute=BIG),
    model=LimitSet(requests_per_minute=BIG),
)


def bench_auth(n: int = 20_000) -> None:
    os.environ["AIBOX_BENCH_SECRET"] = "b" * 48
    settings = AuthSettings(secret_env="AIBOX_BENCH_SECRET")
    with tempfile.TemporaryDirectory() as tmp:
        auth = Authenticator(settings, revocations=RevocationList(Path(tmp) / "revoked.db"))
        tokens = ["Bearer " + issue_token(settings, subject=f"u{i}", scopes=["*"], ttl_s=600) for i in range(2000)]
        t0 = time.perf_counter()
        for t in tokens:
            auth.authenticate(t)
        first = (time.perf_counter() - t0) / len(tokens) * 1e6
        t0 = time.perf_counter()
        for i in range(n):
            auth.authenticate(tokens[i % len(tokens)])
        cached = (time.perf_counter() - t0) / n * 1e6
    print(f"authenticate HS256: {first:.1f} us first use, {cached:.1f} us cached (revocation check included)")


async def bench_limiter(name: str, limiter: RateLimiter, n: int) -> None:
    p = Principal("u", tenant="t")
    for _ in range(50):  # warm up (connections, scripts)
        await limiter.settle(await limiter.acquire(p, "m", 100), 50)
    t0 = time.perf_counter()
    for _ in range(n):
        await limiter.settle(await limiter.acquire(p, "m", 100), 50)
    seq = (time.perf_counter() - t0) / n * 1e6

    async def one() -> None:
        await limiter.settle(await limiter.acquire(p, "m", 100), 50)

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    rate = n / (time.perf_counter() - t0)
    print(f"{name}: acquire+settle over 3 scopes {seq:.1f} us sequential; {rate:.0f}/s with {n} concurrent")
    await limiter.close()


async def main() -> None:
    bench_auth()
    await bench_limiter("memory", RateLimiter(RateLimitSettings(tiers={"default": TIER}), MemoryStore()), 20_000)
    if not Path("/usr/bin/redis-server").exists():
        print("redis: skipped (no /usr/bin/redis-server)")
        return
    from policies.ratelimit_redis import RedisStore
    from tests.redis_server import RedisServer

    with RedisServer() as server:
        settings = RateLimitSettings(store="redis", tiers={"default": TIER})
        await bench_limiter("redis", RateLimiter(settings, RedisStore(server.url)), 2000)


if __name__ == "__main__":
    asyncio.run(main())
