"""The contract between the gateway and anything that produces tokens.

A backend turns a `GenerationRequest` into an async stream of `Chunk`s. The gateway owns
everything around it (auth, limits, routing, n-way fan-out, SSE framing, audit); a backend only
renders the prompt, generates, and reports usage. Closing the iterator early (client gone) must
abort the work and free whatever it held.

Error tree (rendered by `gateway.errors`):

    BackendError                  500  a fault inside the backend
    ├── BackendUnavailable        503  cannot serve right now (connection refused, loading); retriable
    │   └── BackendOverloaded     503  queue full; carries retry_after_s
    ├── BackendTimeout            504  a deadline fired; retriable
    └── BackendRequestError       400  the request itself is unservable here (not retriable)
        └── ContextLengthExceeded 400  prompt + max_tokens exceed the context window
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Literal, Protocol, runtime_checkable

import msgspec

FinishReason = Literal["stop", "length"]


class Message(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One chat turn with its content flattened to text."""

    role: str
    content: str


class SamplingParams(msgspec.Struct, kw_only=True, frozen=True):
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means disabled
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


class GenerationRequest(msgspec.Struct, kw_only=True):
    """What a backend is asked to do. Exactly one of `prompt` / `messages` is set."""

    request_id: str
    model: str  # the public model name the client asked for (after alias resolution)
    prompt: str | None = None
    messages: list[Message] | None = None
    max_tokens: int | None = None  # None: up to the end of the context window
    sampling: SamplingParams = SamplingParams()
    # No `echo`: the gateway prepends the prompt itself, the same way for every backend.
    # The raw OpenAI body, for backends that forward it (openai upstream). Others ignore it.
    raw: dict[str, Any] | None = None


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Chunk(msgspec.Struct, kw_only=True):
    """A piece of output. The last chunk of a stream has `finish_reason` and `usage` set."""

    text: str = ""
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    # Output tokens in `text`; counts a choice that was cut off before its usage arrived. A
    # backend that joins several tokens into one chunk says how many.
    num_tokens: int = 1
    # Set by backends that queue (torch engine, llama.cpp slots): ms from submit to first schedule.
    queue_ms: float | None = None


class BackendInfo(msgspec.Struct, kw_only=True):
    name: str  # the [backends.NAME] key
    type: str
    model_id: str  # what the weights are (file stem, HF id, upstream model)
    context_length: int
    ready: bool = False
    detail: dict[str, Any] = {}


class BackendError(Exception):
    status_code = 500
    error_type = "server_error"
    code: str | None = None
    retriable = False

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param


class BackendUnavailable(BackendError):
    status_code = 503
    error_type = "service_unavailable"
    code = "backend_unavailable"
    retriable = True


class BackendOverloaded(BackendUnavailable):
    code = "overloaded"

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BackendTimeout(BackendError):
    status_code = 504
    error_type = "timeout"
    code = "timeout"
    retriable = True


class BackendRequestError(BackendError):
    status_code = 400
    error_type = "invalid_request_error"


class ContextLengthExceeded(BackendRequestError):
    code = "context_length_exceeded"

    def __init__(self, message: str) -> None:
        super().__init__(message, param="messages")

    @classmethod
    def for_request(cls, context_length: int, num_prompt: int, max_tokens: int) -> ContextLengthExceeded:
        """OpenAI's wording, with the numbers, for every backend."""
        return cls(
            f"This model's maximum context length is {context_length} tokens. However, you requested "
            f"{num_prompt + max_tokens} tokens ({num_prompt} in the prompt, {max_tokens} for the "
            "completion). Please reduce the length of the prompt or max_tokens."
        )


@runtime_checkable
class Backend(Protocol):
    """What every backend implements. Construct cheaply; load in `start()`."""

    name: str

    async def start(self) -> None:
        """Load weights / open connections. Called once in the app lifespan."""

    async def close(self) -> None:
        """Abort in-flight work and release resources."""

    def info(self) -> BackendInfo:
        """Static facts plus readiness; cheap, called by /ready and /v1/models."""

    def stats(self) -> dict[str, float]:
        """Live gauges: in_flight, and for engines num_requests_running/waiting, kv_cache_usage_perc,
        num_preemptions_total. Cheap; read by /metrics and least-busy routing."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        """Stream chunks. Raise BackendError subclasses before the first chunk for clean failover."""
