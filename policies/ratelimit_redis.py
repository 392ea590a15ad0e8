"""Redis store for `policies.ratelimit`: limits shared exactly by several gateway processes.

Each operation is one Lua script that reads and writes every scope of the request atomically
(Redis runs scripts one at a time), mirroring `policies.gcra` line by line. Time comes from
Redis `TIME` so processes with skewed clocks agree; tests may pass a clock instead. Every key
expires when its budget is full again (or the concurrency lease ends), so idle principals cost
nothing. Keys of one request live in different hash slots: this needs a single Redis (or a
primary with replicas), not Redis Cluster.

When Redis cannot be reached the store raises `StoreUnavailable` and stays "open-circuit" for
`retry_s`, so an outage costs one failed connect per second, not one per request.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Sequence

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.settings import ConfigError, RateLimitSettings
from policies.gcra import Outcome, Scope, ScopeState, remaining
from policies.ratelimit import StoreUnavailable

_COMMON = """
local PERIOD = 60.0
local now
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
else
  now = tonumber(ARGV[1])
end
local function f6(x) return string.format('%.6f', x) end
local function ttl_ms(until_t) return math.ceil((until_t - now) * 1000) + 1000 end
"""

# KEYS: per scope (requests tat, tokens tat, concurrency zset)
# ARGV: now|'', tokens, reservation id, lease_s, then per scope rpm, tpm, max_concurrent
_RESERVE = _COMMON + """
local EPS = 0.0001
local tokens, rid, lease = tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local n = #KEYS / 3
local lim, old, new = {}, {}, {}
local fail_retry, fail_index, fail_reason = -1, -1, ''
local function fail(retry, i, reason)
  if retry >= fail_retry then fail_retry, fail_index, fail_reason = retry, i - 1, reason end
end
for i = 1, n do
  local rpm, tpm, maxc = tonumber(ARGV[3 * i + 2]), tonumber(ARGV[3 * i + 3]), tonumber(ARGV[3 * i + 4])
  lim[i] = {rpm, tpm, maxc}
  local rt = math.max(tonumber(redis.call('GET', KEYS[3 * i - 2])) or now, now)
  local tt = math.max(tonumber(redis.call('GET', KEYS[3 * i - 1])) or now, now)
  local nr, nt = rt, tt
  if rpm > 0 then
    nr = rt + PERIOD / rpm
    if nr - now > PERIOD + EPS then fail(nr - now - PERIOD, i, 'requests') end
  end
  if tpm > 0 then
    if tokens > tpm then
      fail(math.huge, i, 'too_large')
    else
      nt = tt + tokens * PERIOD / tpm
      if nt - now > PERIOD + EPS then fail(nt - now - PERIOD, i, 'tokens') end
    end
  end
  if maxc > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[3 * i], '-inf', f6(now))  -- leases whose holder vanished
    if redis.call('ZCARD', KEYS[3 * i]) >= maxc then fail(1.0, i, 'concurrency') end
  end
  old[i], new[i] = {rt, tt}, {nr, nt}
end
local admitted = fail_index < 0
local out = {admitted and 1 or 0, fail_index, fail_reason, f6(fail_retry == math.huge and PERIOD or fail_retry)}
for i = 1, n do
  local rpm, tpm, maxc = lim[i][1], lim[i][2], lim[i][3]
  local shown = admitted and new[i] or old[i]
  if admitted then
    if rpm > 0 then redis.call('SET', KEYS[3 * i - 2], f6(new[i][1]), 'PX', ttl_ms(new[i][1])) end
    if tpm > 0 then redis.call('SET', KEYS[3 * i - 1], f6(new[i][2]), 'PX', ttl_ms(new[i][2])) end
    if maxc > 0 then
      redis.call('ZADD', KEYS[3 * i], f6(now + lease), rid)
      redis.call('PEXPIRE', KEYS[3 * i], ttl_ms(now + lease))
    end
  end
  table.insert(out, f6(shown[1] - now))
  table.insert(out, f6(shown[2] - now))
end
return out
"""

# KEYS as above; ARGV: now|'', reservation id, token delta, then per scope tpm, max_concurrent
_SETTLE = _COMMON + """
local rid, delta = ARGV[2], tonumber(ARGV[3])
for i = 1, #KEYS / 3 do
  local tpm, maxc = tonumber(ARGV[2 * i + 2]), tonumber(ARGV[2 * i + 3])
  if tpm > 0 and delta ~= 0 then
    local tat = tonumber(redis.call('GET', KEYS[3 * i - 1])) or now
    local cost = delta * PERIOD / tpm
    if delta > 0 then tat = math.max(tat, now) + cost else tat = math.max(tat + cost, now) end
    if tat > now then
      redis.call('SET', KEYS[3 * i - 1], f6(tat), 'PX', ttl_ms(tat))
    else
      redis.call('DEL', KEYS[3 * i - 1])
    end
  end
  if maxc > 0 then redis.call('ZREM', KEYS[3 * i], rid) end
end
return 1
"""


def redis_url(settings: RateLimitSettings) -> str:
    """The Redis URL from `ratelimit.redis_url_env`, else `ratelimit.redis_url`."""
    url = os.environ.get(settings.redis_url_env) or settings.redis_url
    if not url:
        raise ConfigError(f"ratelimit.store = 'redis' needs the environment variable {settings.redis_url_env} or ratelimit.redis_url")
    return url


class RedisStore:
    """`LimitStore` on one Redis server."""

    def __init__(
        self,
        url: str,
        *,
        clock: Callable[[], float] | None = None,
        prefix: str = "aibox:rl:",
        timeout_s: float = 1.0,
        retry_s: float = 1.0,
        max_connections: int = 64,
    ) -> None:
        self.clock = clock  # None: Redis TIME, one clock for every process
        self.prefix = prefix
        self.retry_s = retry_s
        # A blocking pool: a burst of requests queues for a connection instead of failing with
        # MaxConnectionsError (which would count as an outage). One quick reconnect attempt (a
        # pooled connection may be stale after a Redis restart); no backoff: the request waits.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=10.0,  # queueing behind a burst is not an outage; socket timeouts catch a hung Redis
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1),
        )
        self._client = aioredis.Redis(connection_pool=pool)
        self._reserve = self._client.register_script(_RESERVE)
        self._settle = self._client.register_script(_SETTLE)
        self._open_until = float("-inf")

    def _keys(self, scopes: Sequence[Scope]) -> list[str]:
        p = self.prefix
        return [k for s in scopes for k in (p + s.req_key, p + s.tok_key, p + s.key + ":c")]

    def _now_arg(self) -> str:
        return "" if self.clock is None else repr(self.clock())

    async def _run(self, script, keys: list[str], args: list[str]):  # type: ignore[no-untyped-def]
        if time.monotonic() < self._open_until:
            raise StoreUnavailable("redis marked down; retrying shortly")
        try:
            return await script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            self._open_until = time.monotonic() + self.retry_s
            raise StoreUnavailable(f"redis error: {type(exc).__name__}") from exc

    async def reserve(self, reservation_id: str, scopes: Sequence[Scope], tokens: int, lease_s: float) -> Outcome:
        args = [self._now_arg(), str(tokens), reservation_id, repr(lease_s)]
        for s in scopes:
            args += [str(s.rpm), str(s.tpm), str(s.max_concurrent)]
        raw = await self._run(self._reserve, self._keys(scopes), args)
        admitted, fail_index, reason = int(raw[0]) == 1, int(raw[1]), raw[2].decode() or None
        states = []
        for i, s in enumerate(scopes):
            reset_req, reset_tok = float(raw[4 + 2 * i]), float(raw[5 + 2 * i])
            states.append(
                ScopeState(
                    remaining_requests=remaining(reset_req, 0.0, s.rpm) if s.rpm else 0,
                    reset_requests_s=reset_req,
                    remaining_tokens=remaining(reset_tok, 0.0, s.tpm) if s.tpm else 0,
                    reset_tokens_s=reset_tok,
                )
            )
        return Outcome(admitted, states, failed_index=fail_index, reason=reason, retry_after_s=float(raw[3]))  # type: ignore[arg-type]

    async def settle(self, reservation_id: str, scopes: Sequence[Scope], token_delta: int) -> None:
        args = [self._now_arg(), reservation_id, str(token_delta)]
        for s in scopes:
            args += [str(s.tpm), str(s.max_concurrent)]
        # Shielded: a client disconnect cancels the request task, but the slot must still be freed.
        await asyncio.shield(self._run(self._settle, self._keys(scopes), args))

    async def close(self) -> None:
        await self._client.aclose()
        await self._client.connection_pool.disconnect()

