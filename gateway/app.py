"""create_app(settings) -> Litestar. Wiring only: every resource is built in the lifespan."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from litestar import Litestar
from litestar.openapi import OpenAPIConfig

from backends.base import Backend
from backends.registry import create_backend
from gateway.drain import Drain
from gateway.errors import handle_exception
from gateway.fastpath import Gateway
from gateway.pipeline import Services, record_refusal
from gateway.routes import health, metrics, openai
from gateway.settings import Settings
from policies.routing import Router

log = logging.getLogger("aibox.app")


async def build_services(
    settings: Settings, *, reuse: dict[str, Backend] | None = None, authenticator: Any | None = None
) -> Services:
    """Construct (not start) everything a request needs. `reuse` maps backend names to already
    running backends whose config did not change, and `authenticator` is the running one when
    [auth] did not change (hot reload)."""
    backends = {name: (reuse or {}).get(name) or create_backend(name, cfg) for name, cfg in settings.backends.items()}
    services = Services(settings=settings, backends=backends, router=Router(settings, backends))
    # HOOK(auth)
    if authenticator is not None:
        services.authenticator = authenticator
    elif settings.auth.enabled:
        from policies.auth import build_authenticator

        # Off the loop: it may read key files and fetch a JWKS over the network.
        services.authenticator = await asyncio.to_thread(build_authenticator, settings)
    # HOOK(ratelimit)
    if settings.ratelimit.enabled:
        from policies.ratelimit import build_limiter

        services.limiter = build_limiter(settings)  # None when no tier sets a limit
    # HOOK(audit)
    if settings.audit.enabled:
        from gateway.audit import AuditStore

        services.audit = AuditStore(settings.audit)
    # HOOK(metrics)
    from gateway.metrics import Metrics

    services.metrics = Metrics(settings)
    return services


async def start_backends(services: Services, load_errors: dict[str, str], names: list[str] | None = None) -> None:
    """Load backends concurrently; a failure is logged and shown in /ready, not fatal."""

    async def start(name: str, backend: Backend) -> None:
        try:
            await backend.start()
            log.info("backend %s ready: %s", name, backend.info().model_id)
        except Exception as exc:
            load_errors[name] = f"{type(exc).__name__}: {exc}"
            log.exception("backend %s failed to load", name)

    targets = {n: b for n, b in services.backends.items() if names is None or n in names}
    await asyncio.gather(*(start(n, b) for n, b in targets.items()))


async def close_services(services: Services, *, backends: bool = True) -> None:
    if services.background:
        await asyncio.gather(*list(services.background), return_exceptions=True)
    for part in (services.limiter, services.authenticator, services.audit):
        close = getattr(part, "close", None)
        if close is not None:
            try:
                await close()
            except Exception:
                log.exception("error while closing %s", type(part).__name__)
    if backends:
        await asyncio.gather(*(b.close() for b in services.backends.values()), return_exceptions=True)


def create_app(settings: Settings, *, config_path: str | None = None) -> Litestar:
    """The ASGI app for these settings. `config_path` enables hot reload (SIGHUP)."""
    drain = Drain(settings.server.shutdown_timeout_s)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        state = app.state
        state.draining = False
        state.load_errors = {}
        services = await build_services(settings)
        for part in (services.audit, services.limiter, services.authenticator):
            start = getattr(part, "start", None)
            if start is not None:
                await start()
        state.services = services
        state.drain = drain  # DrainingServer (aibox serve) drives it on SIGTERM
        drain.on_refused = lambda scope, err: record_refusal(state.services, scope, err)  # services change on reload
        services.metrics.bind(lambda: getattr(state, "services", None))
        await services.metrics.start()
        loader = asyncio.create_task(start_backends(services, state.load_errors))
        # HOOK(reload)
        reloader = None
        if config_path is not None:
            from gateway.reload import Reloader

            reloader = state.reloader = Reloader(state, config_path)
            reloader.install()  # SIGHUP, and the file watch when server.config_watch_s > 0
        try:
            yield
        finally:
            state.draining = True
            if reloader is not None:
                await reloader.aclose()
            loader.cancel()
            await asyncio.gather(loader, return_exceptions=True)
            await close_services(state.services)
            await services.metrics.close()

    return Gateway(
        drain=drain,
        route_handlers=[
            openai.chat_completions,
            openai.completions,
            openai.list_models,
            openai.get_model,
            health.health,
            health.ready,
            metrics.metrics,
        ],
        middleware=[drain.middleware],
        lifespan=[lifespan],
        exception_handlers={Exception: handle_exception},
        request_max_body_size=settings.server.max_body_bytes,
        openapi_config=OpenAPIConfig(title="aibox", version="0.1.0", path="/openapi"),
        debug=False,
        logging_config=None,
    )
