"""The two hot endpoints, dispatched before Litestar's router.

A POST to /v1/chat/completions or /v1/completions goes from `Gateway.__call__` straight to
`pipeline.handle`, behind the drain middleware as Litestar would run it, with an `ASGIRequest`.
The pipeline answers every outcome itself (errors included) with bare ASGI responses
(gateway.streaming), so what Litestar does per request there (router lookup, exception
middleware, send wrapper, `Request`, the handler's signature model, response checks) bought
nothing: skipping it saves ~0.05 ms of CPU per request, a tenth of aibox's overhead at
concurrency 1 (docs/benchmarks.md, "Stop 12").

The routes stay declared in Litestar: they make the OpenAPI schema, and they serve what this
does not take: another method (405), or a path under a `root_path` mount. Both call
`pipeline.handle`.
"""

from __future__ import annotations

import logging
from typing import Any

from litestar import Litestar

from gateway import pipeline
from gateway.asgi_request import ASGIRequest
from gateway.drain import Drain
from gateway.errors import ServerError
from gateway.schemas import encoder
from gateway.streaming import JSONResponse

log = logging.getLogger("aibox.app")

ENDPOINTS = {"/v1/chat/completions": "chat.completions", "/v1/completions": "completions"}
_BUG = ServerError("The server had an error while processing your request.")


class Gateway(Litestar):
    """Litestar, with POSTs to the two completion endpoints served before its router."""

    def __init__(self, *, drain: Drain, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._serve_api = drain.middleware(self._api)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in ENDPOINTS:
            await self._serve_api(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)

    async def _api(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            services = self.state.services
            request = ASGIRequest(scope, receive, services.settings.server.max_body_bytes)
            response: Any = await pipeline.handle(services, request, ENDPOINTS[scope["path"]])
        except Exception:  # a bug outside the pipeline's own handling: OpenAI's shape, as Litestar would answer
            log.exception("unhandled error on POST %s", scope["path"])
            response = JSONResponse(encoder.encode(_BUG.body()), _BUG.status_code)
        await response(scope, receive, send)
