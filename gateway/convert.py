"""OpenAI request bodies -> validated backend `GenerationRequest`s (one per output choice)."""

from __future__ import annotations

import msgspec

from backends.base import GenerationRequest, Message, SamplingParams
from gateway.errors import InvalidRequest, PayloadTooLarge
from gateway.schemas import ChatCompletionRequest, CompletionRequest, chat_decoder, completion_decoder
from gateway.settings import ServerSettings

MAX_STOP_SEQUENCES = 16


def decode_body(raw: bytes, endpoint: str, server: ServerSettings) -> ChatCompletionRequest | CompletionRequest:
    """Decode and range-check a body; errors name the offending field in `param`."""
    if len(raw) > server.max_body_bytes:
        raise PayloadTooLarge(f"Request body is {len(raw)} bytes; the limit is {server.max_body_bytes}.")
    if not raw.strip():
        raise InvalidRequest("The request body is empty; send a JSON object.")
    decoder = chat_decoder if endpoint == "chat.completions" else completion_decoder
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError as exc:
        message, _, path = str(exc).partition(" - at `")
        param = _param_from_path(path.rstrip("`")) if path else None
        if "missing required field" in message:
            field = message.split("`")[1] if "`" in message else None
            param = f"{param}.{field}" if param and field else field
        raise InvalidRequest(f"Invalid request: {message}" + (f" (at '{param}')" if param else ""), param=param) from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"The body is not valid JSON: {exc}") from None


def _param_from_path(path: str) -> str:
    # msgspec paths look like "$.messages[0].content"; OpenAI's param is "messages[0].content".
    return path.removeprefix("$").removeprefix(".")


def _sampling(body: ChatCompletionRequest | CompletionRequest) -> SamplingParams:
    stop = body.stop
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if len(stops) > MAX_STOP_SEQUENCES:
        raise InvalidRequest(f"At most {MAX_STOP_SEQUENCES} stop sequences are allowed.", param="stop")
    if any(s == "" for s in stops):
        raise InvalidRequest("Stop sequences must not be empty.", param="stop")
    return SamplingParams(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        seed=body.seed,
        stop=stops,
    )


def _check_common(body: ChatCompletionRequest | CompletionRequest, server: ServerSettings) -> int | None:
    if not body.model:
        raise InvalidRequest("You must provide a model parameter.", param="model")
    if (body.n or 1) > server.max_n:
        raise InvalidRequest(f"n must be at most {server.max_n}.", param="n")
    if body.logprobs:
        raise InvalidRequest("logprobs are not supported by this server.", param="logprobs")
    if body.stream_options is not None and not body.stream:
        raise InvalidRequest("stream_options is only allowed when stream is true.", param="stream_options")
    max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
    param = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
    if max_tokens is not None and max_tokens > server.max_tokens_cap:
        raise InvalidRequest(f"{param} must be at most {server.max_tokens_cap}.", param=param)
    return max_tokens


def _message_text(msg_index: int, content: object) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for j, part in enumerate(content):  # type: ignore[union-attr]
        if part.type != "text" or part.text is None:
            raise InvalidRequest(
                f"Only text content parts are supported; got type '{part.type}'.",
                param=f"messages[{msg_index}].content[{j}].type",
            )
        parts.append(part.text)
    return "\n".join(parts)


def chat_requests(body: ChatCompletionRequest, request_id: str, model: str, server: ServerSettings) -> list[GenerationRequest]:
    """One GenerationRequest per choice (n)."""
    max_tokens = _check_common(body, server)
    if not body.messages:
        raise InvalidRequest("messages must contain at least one message.", param="messages")
    if len(body.messages) > server.max_messages:
        raise InvalidRequest(f"At most {server.max_messages} messages are allowed.", param="messages")
    messages = []
    for i, m in enumerate(body.messages):
        if m.role == "tool":
            raise InvalidRequest("Tool messages are not supported by this server.", param=f"messages[{i}].role")
        role = "system" if m.role == "developer" else m.role
        messages.append(Message(role=role, content=_message_text(i, m.content)))
    sampling = _sampling(body)
    return [
        GenerationRequest(
            request_id=f"{request_id}/{i}",
            model=model,
            messages=messages,
            max_tokens=max_tokens,
            sampling=_choice_sampling(sampling, i),
        )
        for i in range(body.n or 1)
    ]


def completion_requests(body: CompletionRequest, request_id: str, model: str, server: ServerSettings) -> list[GenerationRequest]:
    """One GenerationRequest per (prompt, choice), in OpenAI's choice order."""
    max_tokens = _check_common(body, server)
    if body.suffix:
        raise InvalidRequest("suffix is not supported by this server.", param="suffix")
    if body.best_of is not None and body.best_of != (body.n or 1):
        raise InvalidRequest("best_of is not supported by this server (it must equal n).", param="best_of")
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts:
        raise InvalidRequest("prompt must not be empty.", param="prompt")
    if not all(isinstance(p, str) for p in prompts):
        raise InvalidRequest("Token-id prompts are not supported; send the prompt as text.", param="prompt")
    if len(prompts) * (body.n or 1) > server.max_n * 4:
        raise InvalidRequest(f"Too many prompts x n (at most {server.max_n * 4} choices).", param="prompt")
    sampling = _sampling(body)
    return [
        GenerationRequest(
            request_id=f"{request_id}/{p}.{i}",
            model=model,
            prompt=prompt,  # type: ignore[arg-type]
            max_tokens=max_tokens,
            sampling=_choice_sampling(sampling, i),
        )
        for p, prompt in enumerate(prompts)
        for i in range(body.n or 1)
    ]


def _choice_sampling(sampling: SamplingParams, index: int) -> SamplingParams:
    # n choices with one seed would all be identical; give each its own derived seed.
    if index == 0 or sampling.seed is None:
        return sampling
    return msgspec.structs.replace(sampling, seed=sampling.seed + index)


def prompt_key(request: GenerationRequest) -> int:
    """Identity of a request's prompt: the n choices of one prompt share the same object."""
    return id(request.messages) if request.messages is not None else id(request.prompt)


def estimate_prompt_tokens(requests: list[GenerationRequest]) -> int:
    """A cheap upper-ish estimate (~4 chars/token) for rate-limit reservation; reconciled later."""
    seen: set[int] = set()
    chars = 0
    for r in requests:
        key = prompt_key(r)
        if key in seen:
            continue
        seen.add(key)
        chars += sum(len(m.content) + 8 for m in r.messages) if r.messages is not None else len(r.prompt or "")
    return chars // 4 + 1
