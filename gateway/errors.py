"""One error tree, one renderer: every non-2xx body is OpenAI's
`{"error": {"message", "type", "param", "code"}}`.

    APIError                         (status, type, code)
    ├── InvalidRequest               400 invalid_request_error        bad body / field (param set)
    │   └── ContextLength            400 invalid_request_error        context_length_exceeded
    ├── Unauthorized                 401 authentication_error          invalid_api_key  (+ WWW-Authenticate)
    ├── Forbidden                    403 permission_error              model_not_allowed
    ├── NotFound                     404 invalid_request_error        model_not_found / not_found
    ├── PayloadTooLarge              413 invalid_request_error        body_too_large
    ├── RateLimited                  429 rate_limit_exceeded / insufficient_quota (+ Retry-After)
    ├── ServerError                  500 server_error                  (never a traceback)
    ├── Unavailable                  503 service_unavailable           (+ Retry-After)
    └── Timeout                      504 timeout
    backends.base.BackendError       mapped by `from_backend_error`

Messages are written for the client: no tracebacks, URLs, file paths or secrets.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, NotFoundException, ValidationException
from litestar.exceptions.http_exceptions import MethodNotAllowedException, RequestEntityTooLarge

from backends.base import BackendError, BackendOverloaded

log = logging.getLogger("aibox.errors")


class APIError(Exception):
    status_code = 500
    error_type = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


class InvalidRequest(APIError):
    status_code = 400
    error_type = "invalid_request_error"


class ContextLength(InvalidRequest):
    code = "context_length_exceeded"


class Unauthorized(APIError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"

    def __init__(self, message: str, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.headers.setdefault("WWW-Authenticate", 'Bearer realm="aibox"')


class Forbidden(APIError):
    status_code = 403
    error_type = "permission_error"
    code = "model_not_allowed"


class NotFound(APIError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model '{model}' does not exist or you do not have access to it.", param="model")


class PayloadTooLarge(APIError):
    status_code = 413
    error_type = "invalid_request_error"
    code = "body_too_large"


class ClientClosed(APIError):
    """The client went away before its request was read (recorded as 499, like a client that
    leaves mid-generation)."""

    status_code = 499
    error_type = "client_closed"
    code = "client_closed"


class RateLimited(APIError):
    status_code = 429
    error_type = "rate_limit_exceeded"
    code = "rate_limit_exceeded"


class QuotaExceeded(RateLimited):
    error_type = "insufficient_quota"
    code = "insufficient_quota"


class ServerError(APIError):
    pass


class Unavailable(APIError):
    status_code = 503
    error_type = "service_unavailable"
    code = "service_unavailable"


class Timeout(APIError):
    status_code = 504
    error_type = "timeout"
    code = "timeout"


def from_backend_error(exc: BackendError) -> APIError:
    """Map a backend failure to the client-facing error (same status, safe message)."""
    cls = {400: InvalidRequest, 503: Unavailable, 504: Timeout}.get(exc.status_code, ServerError)
    err = cls(exc.message, param=exc.param, code=exc.code)
    if exc.code == "context_length_exceeded":
        err = ContextLength(exc.message, param=exc.param or "messages")
    if isinstance(exc, BackendOverloaded):
        err.headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
    return err


_encoder = msgspec.json.Encoder()


def error_response(err: APIError) -> Response[bytes]:
    return Response(
        content=_encoder.encode(err.body()),
        status_code=err.status_code,
        media_type="application/json",
        headers=err.headers,
    )


def _validation_message(exc: ValidationException) -> tuple[str, str | None]:
    extra = exc.extra
    if isinstance(extra, list) and extra and isinstance(extra[0], dict):
        first = extra[0]
        key = first.get("key")
        msg = str(first.get("message", exc.detail))
        return (f"{msg}" if not key else f"Invalid value for '{key}': {msg}", key)
    return (str(exc.detail), None)


def handle_exception(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    """Litestar's single exception handler: everything becomes an OpenAI-shaped body."""
    if isinstance(exc, APIError):
        return error_response(exc)
    if isinstance(exc, BackendError):
        return error_response(from_backend_error(exc))
    if isinstance(exc, RequestEntityTooLarge):
        return error_response(PayloadTooLarge("Request body is too large."))
    if isinstance(exc, ValidationException):
        msg, param = _validation_message(exc)
        return error_response(InvalidRequest(msg, param=param))
    if isinstance(exc, NotFoundException):
        return error_response(NotFound(f"Unknown path: {request.url.path}"))
    if isinstance(exc, MethodNotAllowedException):
        err = APIError(f"Method {request.method} not allowed on {request.url.path}.")
        err.status_code, err.error_type, err.code = 405, "invalid_request_error", "method_not_allowed"
        return error_response(err)
    if isinstance(exc, HTTPException) and exc.status_code < 500:
        err = InvalidRequest(str(exc.detail))
        err.status_code = exc.status_code
        return error_response(err)
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(ServerError("The server had an error while processing your request."))
