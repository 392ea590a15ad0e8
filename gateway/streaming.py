"""Backend chunks -> OpenAI response objects and SSE frames.

SSE framing is exactly OpenAI's: `data: {json}\\n\\n` per chunk and `data: [DONE]\\n\\n` last.
Chat streams open with a role delta, close each choice with an empty delta carrying
`finish_reason`, and (with `stream_options.include_usage`) end with a `choices: []` usage chunk,
every earlier chunk then carrying `"usage": null`.
"""

from __future__ import annotations

from typing import Any

from gateway.schemas import encoder

DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"


def sse(obj: Any) -> bytes:
    return b"data: " + encoder.encode(obj) + b"\n\n"


def usage_dict(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class ResponseShape:
    """Builds objects for one response (chat or text completion), sharing id/created/model."""

    def __init__(self, endpoint: str, response_id: str, created: int, model: str, include_usage: bool) -> None:
        self.chat = endpoint == "chat.completions"
        self.base: dict[str, Any] = {
            "id": response_id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": created,
            "model": model,
            "system_fingerprint": None,
        }
        self.include_usage = include_usage

    def _chunk(self, choices: list[dict[str, Any]]) -> bytes:
        obj = {**self.base, "choices": choices}
        if self.include_usage:
            obj["usage"] = None
        return sse(obj)

    def role_chunk(self, index: int) -> bytes:
        return self._chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])

    def text_chunk(self, index: int, text: str) -> bytes:
        if self.chat:
            return self._chunk([{"index": index, "delta": {"content": text}, "logprobs": None, "finish_reason": None}])
        return self._chunk([{"index": index, "text": text, "logprobs": None, "finish_reason": None}])

    def finish_chunk(self, index: int, finish_reason: str) -> bytes:
        if self.chat:
            return self._chunk([{"index": index, "delta": {}, "logprobs": None, "finish_reason": finish_reason}])
        return self._chunk([{"index": index, "text": "", "logprobs": None, "finish_reason": finish_reason}])

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        return sse({**self.base, "choices": [], "usage": usage_dict(prompt_tokens, completion_tokens)})

    def full(self, texts: list[str], finish_reasons: list[str], prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        """The non-streaming response body."""
        if self.chat:
            choices = [
                {"index": i, "message": {"role": "assistant", "content": t, "refusal": None}, "logprobs": None, "finish_reason": f}
                for i, (t, f) in enumerate(zip(texts, finish_reasons, strict=True))
            ]
            obj_type = "chat.completion"
        else:
            choices = [
                {"index": i, "text": t, "logprobs": None, "finish_reason": f}
                for i, (t, f) in enumerate(zip(texts, finish_reasons, strict=True))
            ]
            obj_type = "text_completion"
        return {**self.base, "object": obj_type, "choices": choices, "usage": usage_dict(prompt_tokens, completion_tokens)}


def error_event(body: dict[str, Any]) -> bytes:
    """An error after the stream began: an `error` event, then the caller sends [DONE]."""
    return sse(body)
