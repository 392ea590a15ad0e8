"""GET /metrics: Prometheus text exposition of this app's registry."""

from __future__ import annotations

from typing import Any

from litestar import Response, get
from litestar.datastructures import State

from gateway.metrics import CONTENT_TYPE


@get("/metrics", summary="Prometheus metrics", include_in_schema=False, sync_to_thread=False)
def metrics(state: State) -> Response[Any]:
    services = getattr(state, "services", None)
    if services is None or services.metrics is None:
        return Response(content=b"", media_type=CONTENT_TYPE)
    return Response(content=services.metrics.render(), media_type=CONTENT_TYPE)
