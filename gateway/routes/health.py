"""Liveness and readiness."""

from __future__ import annotations

from typing import Any

from litestar import Response, get
from litestar.datastructures import State

from gateway.schemas import encoder


@get("/health", summary="The process is alive")
async def health() -> dict[str, str]:
    return {"status": "ok"}


def readiness(state: State) -> tuple[bool, dict[str, Any]]:
    """(ready, detail): backends loaded, audit writable, limiter store reachable, not draining."""
    services = getattr(state, "services", None)
    if services is None:
        return False, {"status": "starting"}
    infos = {name: b.info() for name, b in services.backends.items()}
    detail: dict[str, Any] = {
        "draining": bool(getattr(state, "draining", False)),
        "backends": {
            name: {"ready": i.ready, "type": i.type, "model_id": i.model_id, **i.detail, **services.backends[name].stats()}
            for name, i in infos.items()
        },
        "routing": services.router.state(),
    }
    ok = not detail["draining"] and all(i.ready for i in infos.values())
    load_errors = getattr(state, "load_errors", {})
    if load_errors:
        detail["load_errors"] = load_errors
    if services.audit is not None and hasattr(services.audit, "health"):
        detail["audit"] = services.audit.health()
        ok = ok and bool(detail["audit"].get("ok", True))
    if services.limiter is not None and hasattr(services.limiter, "health"):
        detail["ratelimit"] = services.limiter.health()
        ok = ok and bool(detail["ratelimit"].get("ok", True))
    detail["status"] = "ready" if ok else "not_ready"
    return ok, detail


@get("/ready", summary="Backends loaded and dependencies reachable")
async def ready(state: State) -> Response[Any]:
    ok, detail = readiness(state)
    return Response(content=encoder.encode(detail), status_code=200 if ok else 503, media_type="application/json")
