"""Hot reload of config.toml on SIGHUP (and, with `server.config_watch_s > 0`, when the file changes).

A reload is all-or-nothing:
1. The file is validated by `gateway.settings.load`; a bad file is refused with a logged reason and
   the running config keeps serving.
2. Backends whose `[backends.NAME]` table is unchanged are reused as they are (no reload, live state
   kept); new or changed ones are built and started *before* the swap. If one fails to start, the
   ones just started are closed and the reload is refused. A backend that had failed to load is
   retried; failing again does not block the reload (it stays in /ready's load_errors).
3. A new immutable `Services` snapshot is swapped in with one assignment. A request reads the
   snapshot once when it starts and holds it to the end, so in-flight requests finish on the config
   they started with.
4. Backends that were removed or replaced are closed once their in-flight requests have finished
   (bounded by the longest request deadline); a replaced limiter/authenticator after that deadline.

Applied live: [backends], [[models]], [[routes]], [auth], [ratelimit], the quota tables
[audit.tenant_quotas] and [audit.subject_quotas], and the per-request [server] keys (timeouts,
caps). Needing a restart (kept at their running values, reported): the other [audit] keys (one
writer owns the database), server.host/port/max_body_bytes/shutdown_timeout_s/log_*/config_watch_s.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from gateway.settings import ConfigError, Settings, load

log = logging.getLogger("aibox.reload")

# [server] keys bound at startup (socket, Litestar app, logging): a change waits for a restart.
_SERVER_RESTART_KEYS = ("host", "port", "max_body_bytes", "shutdown_timeout_s", "log_format", "log_level", "config_watch_s")
_DRAIN_POLL_S = 0.1


class ReloadResult(msgspec.Struct, kw_only=True):
    """What a reload did; `message` is the one-line summary that is also logged."""

    ok: bool
    message: str
    started: list[str] = []  # backends built and started (new or changed)
    reused: list[str] = []  # backends kept as they were
    retired: list[str] = []  # backends closed once their in-flight requests finish
    restart_needed: list[str] = []  # changed keys that take effect only after a restart


def effective_settings(new: Settings, running: Settings) -> tuple[Settings, list[str]]:
    """`new` with the keys that cannot change live put back to their running values, and their names."""
    pinned = {k: getattr(running.server, k) for k in _SERVER_RESTART_KEYS}
    restart = [f"server.{k}" for k, v in pinned.items() if getattr(new.server, k) != v]
    # Quotas apply live; every other [audit] key belongs to the one writer that owns the database.
    audit = msgspec.structs.replace(running.audit, tenant_quotas=new.audit.tenant_quotas, subject_quotas=new.audit.subject_quotas)
    if new.audit != audit:
        restart.append("audit")
    server = msgspec.structs.replace(new.server, **pinned)
    return msgspec.structs.replace(new, server=server, audit=audit), restart


class Reloader:
    """Owns reloads for one app: serialises them, swaps `state.services`, retires old parts."""

    def __init__(self, state: Any, config_path: str | Path) -> None:
        self.state = state
        self.path = Path(config_path)
        self.num_reloads = 0
        self.last_result: ReloadResult | None = None
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._retired: list[Any] = []  # parts awaiting close, closed at once on shutdown
        self._loop: asyncio.AbstractEventLoop | None = None
        self._signal_installed = False

    # ------------------------------------------------------------------ triggers
    def install(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """SIGHUP handler, plus the file watch when `server.config_watch_s` > 0."""
        self._loop = loop or asyncio.get_running_loop()
        self._signal_installed = install_sighup_handler(self._loop, self.trigger)
        interval = self.state.services.settings.server.config_watch_s
        if interval > 0:
            self._spawn(self._watch(interval))

    def trigger(self) -> None:
        """Schedule a reload (safe to call from a signal handler)."""
        self._spawn(self.reload())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch(self, interval_s: float) -> None:
        """Poll mtime+size (cheap, works on every filesystem and with ConfigMap symlink swaps)."""
        last = _fingerprint(self.path)
        while True:
            await asyncio.sleep(interval_s)
            now = _fingerprint(self.path)
            if now != last:
                last = now  # a refused file is not retried until it changes again
                await self.reload()

    # ------------------------------------------------------------------ the reload
    async def reload(self) -> ReloadResult:
        """Validate, build, start, swap; never raises (a failure is a refused reload)."""
        async with self._lock:
            try:
                result = await self._reload()
            except Exception as exc:  # an unexpected bug must not take the serving config down
                log.exception("config reload failed")
                result = ReloadResult(ok=False, message=f"config reload refused: {type(exc).__name__}: {exc}")
            self.last_result = result
            (log.info if result.ok else log.error)("%s", result.message)
            return result

    async def _reload(self) -> ReloadResult:
        from gateway.app import build_services  # late: app imports this module in its lifespan

        try:
            new = load(self.path)
        except ConfigError as exc:
            return ReloadResult(ok=False, message=f"config reload refused, still serving the previous config: {exc}")
        old = self.state.services
        settings, restart = effective_settings(new, old.settings)
        failed = getattr(self.state, "load_errors", {})  # a backend that failed to load is retried
        reused = {
            n: old.backends[n]
            for n, cfg in settings.backends.items()
            if n in old.backends and old.settings.backends.get(n) == cfg and n not in failed
        }
        try:
            same_auth = settings.auth == old.settings.auth
            services = await build_services(settings, reuse=reused, authenticator=old.authenticator if same_auth else None)
        except (ConfigError, ValueError) as exc:
            return ReloadResult(ok=False, message=f"config reload refused, still serving the previous config: {exc}")
        started = [n for n in services.backends if n not in reused]
        errors = await _start_all({n: services.backends[n] for n in started})
        still_failing = {n: e for n, e in errors.items() if n in failed and n in old.backends}
        errors = {n: e for n, e in errors.items() if n not in still_failing}
        if errors:
            await asyncio.gather(*(services.backends[n].close() for n in started), return_exceptions=True)
            detail = "; ".join(f"backend {n}: {e}" for n, e in errors.items())
            return ReloadResult(ok=False, message=f"config reload refused, still serving the previous config: {detail}")
        services.router = old.router.reconfigure(settings, services.backends, keep=reused)
        services.audit, services.metrics = old.audit, old.metrics  # one writer, continuous series
        if services.metrics is not None and hasattr(services.metrics, "reconfigure"):
            services.metrics.reconfigure(settings)
        try:
            replaced = await self._keep_or_start(services, old, settings)
        except Exception as exc:
            await asyncio.gather(*(services.backends[n].close() for n in started), return_exceptions=True)
            return ReloadResult(ok=False, message=f"config reload refused, still serving the previous config: {type(exc).__name__}: {exc}")

        if services.audit is not None and settings.audit != old.settings.audit:
            services.audit.update_quotas(settings.audit)  # only quotas can differ here
        self.state.services = services  # the swap: new requests see the new snapshot from here on
        self.num_reloads += 1
        retired = [n for n in old.backends if n not in reused]
        for name in [*retired, *started]:
            failed.pop(name, None)
        failed.update(still_failing)
        self._retire(old, retired, replaced, _grace_s(old.settings))
        msg = f"config reloaded from {self.path}: started {sorted(started) or '-'}, reused {sorted(reused) or '-'}, retiring {sorted(retired) or '-'}"
        if restart:
            msg += f"; changes to {', '.join(restart)} need a restart"
        return ReloadResult(ok=True, message=msg, started=sorted(started), reused=sorted(reused), retired=sorted(retired), restart_needed=restart)

    async def _keep_or_start(self, services: Any, old: Any, settings: Settings) -> list[Any]:
        """Keep the running authenticator/limiter when their sections did not change (limiter
        counters survive a reload); start the new ones otherwise. Returns the parts replaced."""
        replaced = []
        for attr, section in (("authenticator", "auth"), ("limiter", "ratelimit")):
            if getattr(settings, section) == getattr(old.settings, section):
                setattr(services, attr, getattr(old, attr))
                continue
            part = getattr(services, attr)
            start = getattr(part, "start", None)
            if start is not None:
                await start()
            if getattr(old, attr) is not None:
                replaced.append(getattr(old, attr))
        return replaced

    # ------------------------------------------------------------------ retiring
    def _retire(self, old: Any, names: list[str], parts: list[Any], grace_s: float) -> None:
        for name in names:
            backend = old.backends[name]
            self._retired.append(backend)
            self._spawn(self._close_when_idle(backend, lambda n=name: _in_flight(old, n), grace_s))
        for part in parts:
            self._retired.append(part)
            self._spawn(self._close_when_idle(part, lambda: 1, grace_s))

    async def _close_when_idle(self, part: Any, in_flight: Callable[[], float], grace_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while in_flight() > 0 and loop.time() < deadline:
            await asyncio.sleep(_DRAIN_POLL_S)
        await _close(part)
        if part in self._retired:
            self._retired.remove(part)

    async def aclose(self) -> None:
        """Shutdown: stop watching, close whatever is still waiting to retire."""
        if self._signal_installed and self._loop is not None:
            self._loop.remove_signal_handler(signal.SIGHUP)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for part in self._retired:
            await _close(part)
        self._retired.clear()


# --------------------------------------------------------------------------- helpers
def install_sighup_handler(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> bool:
    """Call `callback` on SIGHUP. False where signals cannot be handled (not the main thread, Windows)."""
    sighup = getattr(signal, "SIGHUP", None)
    if sighup is None:
        return False
    try:
        loop.add_signal_handler(sighup, callback)
    except (RuntimeError, ValueError, NotImplementedError):
        log.debug("SIGHUP reload not available here (not the main thread?)")
        return False
    return True


async def reload(app_state: Any, path: str | Path) -> ReloadResult:
    """Reload the app whose `app.state` is given (through its Reloader when it has one)."""
    reloader = getattr(app_state, "reloader", None)
    if reloader is None:
        reloader = Reloader(app_state, path)
    return await reloader.reload()


async def _start_all(backends: dict[str, Any]) -> dict[str, str]:
    """Start backends concurrently; name -> error for those that failed."""
    results = await asyncio.gather(*(b.start() for b in backends.values()), return_exceptions=True)
    return {n: f"{type(r).__name__}: {r}" for n, r in zip(backends, results, strict=True) if isinstance(r, BaseException)}


def _in_flight(services: Any, name: str) -> float:
    routed = services.router.state().get(name, {}).get("in_flight", 0)
    try:
        own = services.backends[name].stats().get("in_flight", 0.0)
    except Exception:  # stats() of a half-broken backend must not block its retirement
        own = 0.0
    return max(float(routed), float(own))


def _grace_s(settings: Settings) -> float:
    """The longest a request started on these settings can still run."""
    return max([settings.server.request_timeout_s, *(m.timeout_s or 0.0 for m in settings.models)]) + 5.0


async def _close(part: Any) -> None:
    close = getattr(part, "close", None)
    if close is None:
        return
    try:
        await close()
    except Exception:
        log.exception("error while closing retired %s", type(part).__name__)


def _fingerprint(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)
