"""OpenAI wire shapes read from upstreams, and upstream failures mapped to our BackendError tree.

    connection refused/reset, DNS          BackendUnavailable   (retriable)      [openai_upstream]
    429, or 503 with Retry-After          BackendOverloaded    (retriable; carries Retry-After)
    5xx, 408, 409, 425                     BackendUnavailable   (retriable)
    401, 403, 404                          BackendUnavailable   (retriable: our key or our configured
                                                                 model is wrong for this deployment,
                                                                 another deployment may be right)
    400, 413, 422 and other 4xx            BackendRequestError  (not retriable; upstream's message),
                                           ContextLengthExceeded when upstream says so
"""

from __future__ import annotations

import email.utils
import time

import msgspec

from backends.base import (
    BackendError,
    BackendOverloaded,
    BackendRequestError,
    BackendUnavailable,
    ContextLengthExceeded,
)

_REQUEST_CAUSED = {400, 413, 422}
_RETRIABLE_4XX = {401, 403, 404, 408, 409, 425}


class UpstreamUsage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Delta(msgspec.Struct):
    content: str | None = None


class Choice(msgspec.Struct):
    index: int = 0
    text: str | None = None  # /completions
    delta: Delta | None = None  # /chat/completions
    finish_reason: str | None = None


class UpstreamError(msgspec.Struct):
    message: str = "upstream error"
    type: str | None = None
    code: str | int | None = None


class Event(msgspec.Struct):
    choices: list[Choice] = []
    usage: UpstreamUsage | None = None
    error: UpstreamError | None = None


class ErrorBody(msgspec.Struct):
    error: UpstreamError | str | None = None
    message: str | None = None  # some servers (llama-server, FastAPI) use a flat shape


class Message(msgspec.Struct):
    content: str | None = None


class WholeChoice(msgspec.Struct):
    index: int = 0
    text: str | None = None
    message: Message | None = None
    finish_reason: str | None = None


class Whole(msgspec.Struct):
    """A non-streaming answer, from servers that ignore `stream: true`."""

    choices: list[WholeChoice] = []
    usage: UpstreamUsage | None = None


event_decoder = msgspec.json.Decoder(Event)
whole_decoder = msgspec.json.Decoder(Whole)
_error_decoder = msgspec.json.Decoder(ErrorBody)


def status_error(status: int, body: bytes, retry_after: str | None) -> BackendError:
    """The error for a non-200 upstream answer (see the table above)."""
    message, code = _error_message(body)
    retry_after_s = _parse_retry_after(retry_after)
    if status == 429 or (status == 503 and retry_after_s is not None):
        return BackendOverloaded("The model backend is overloaded; try again later.", retry_after_s=retry_after_s or 1.0)
    if status >= 500 or status in _RETRIABLE_4XX:
        return BackendUnavailable(f"The model backend failed (upstream HTTP {status}).", code="upstream_error")
    if code == "context_length_exceeded" or "context length" in message.lower() or "maximum context" in message.lower():
        return ContextLengthExceeded(message)
    err = BackendRequestError(message, code=str(code) if code is not None else None)
    if status not in _REQUEST_CAUSED:
        err.code = err.code or f"upstream_{status}"
    return err


def stream_error(error: UpstreamError) -> BackendError:
    """The error for an `{"error": ...}` event inside an upstream stream."""
    if error.type == "invalid_request_error" or error.code in (400, "400"):
        return BackendRequestError(error.message)
    return BackendUnavailable("The model backend failed mid-response.", code="upstream_error")


def _error_message(body: bytes) -> tuple[str, str | int | None]:
    """Upstream's error message and code from an OpenAI-shaped (or flat) error body."""
    try:
        parsed = _error_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        text = body.decode("utf-8", "replace").strip()
        return (text[:300] or "upstream error", None)
    if isinstance(parsed.error, UpstreamError):
        return (parsed.error.message[:500], parsed.error.code)
    return ((parsed.error or parsed.message or "upstream error")[:500], None)


def _parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
