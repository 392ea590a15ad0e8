"""OpenAPI detail the handlers cannot declare themselves.

The chat/completions handlers decode their bodies with msgspec (gateway/convert.py: precise
errors, no double parsing), so Litestar sees no body type. These operation classes put the
msgspec JSON Schema of the request structs into the document, and declare the OpenAI error
shape for every error status, so clients, docs and the fuzz suite (schemathesis) see the truth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIResponse, Operation, RequestBody

from gateway.schemas import ChatCompletionRequest, CompletionRequest

_REF_PREFIX = "#/$defs/"
_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                "code": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            },
        }
    },
}
_ERRORS = {
    "400": "Invalid request (the field is named in error.param)",
    "401": "Missing or invalid API key",
    "403": "The model is not allowed for this key",
    "404": "Unknown model",
    "413": "Body larger than server.max_body_bytes",
    "429": "Rate limit or quota exceeded (see Retry-After and x-ratelimit-* headers)",
    "500": "Backend failure",
    "503": "No deployment available, overloaded, or shutting down",
    "504": "Backend deadline exceeded",
}


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    """Replace every `$ref` by its definition. Litestar rebuilds components.schemas from its own
    registry, so the request schemas must be self-contained (these types are not recursive)."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith(_REF_PREFIX):
            return _inline(defs[ref[len(_REF_PREFIX) :]], defs)
        return {k: _inline(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


def request_schema(struct: type) -> dict[str, Any]:
    """The JSON Schema of a request Struct, with no references left."""
    (top,), defs = msgspec.json.schema_components([struct], ref_template=_REF_PREFIX + "{name}")
    return _inline(top, defs)  # type: ignore[no-any-return]


def _with_body(op: Operation, struct: type) -> None:
    # Litestar serialises nested plain dicts as they are, so a raw JSON Schema works as `schema`.
    body = OpenAPIMediaType(schema=request_schema(struct))  # type: ignore[arg-type]
    op.request_body = RequestBody(content={"application/json": body}, required=True)
    error = {"application/json": OpenAPIMediaType(schema=_ERROR_SCHEMA)}  # type: ignore[arg-type]
    op.responses = {**(op.responses or {}), **{s: OpenAPIResponse(description=t, content=error) for s, t in _ERRORS.items()}}


@dataclass
class ChatCompletionOperation(Operation):
    def __post_init__(self) -> None:
        _with_body(self, ChatCompletionRequest)


@dataclass
class CompletionOperation(Operation):
    def __post_init__(self) -> None:
        _with_body(self, CompletionRequest)
