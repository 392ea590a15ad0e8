"""A scripted, deterministic backend: a real implementation of the Backend protocol for tests,
benchmarks and demos. Tokens are whitespace-led words (`re \\s*\\S+`), so counts are real.

The output is the configured script from an offset (0 when greedy; derived from the seed when
sampling), repeated until max_tokens or one full pass (then finish_reason "stop").

Directives in the prompt drive fault tests:
    [[fail]]          raise BackendError before the first token
    [[unavailable]]   raise BackendUnavailable before the first token (retriable)
    [[fail-after:N]]  raise BackendError after N tokens
    [[hang]]          never produce a token
    [[bug-after:N]]   raise RuntimeError after N tokens (a bug in a backend, not a BackendError)
    [[echo]]          output the prompt's last message instead of the script

Config `fail_after_tokens = N` makes one deployment die (retriably) after N chunks, for failover tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import zlib
from collections.abc import AsyncIterator

from backends.base import (
    BackendError,
    BackendInfo,
    BackendOverloaded,
    BackendUnavailable,
    Chunk,
    ContextLengthExceeded,
    GenerationRequest,
    Usage,
)
from gateway.settings import FakeBackendConfig

_TOKEN = re.compile(r"\s*\S+")
_FAIL_AFTER = re.compile(r"\[\[fail-after:(\d+)\]\]")
_BUG_AFTER = re.compile(r"\[\[bug-after:(\d+)\]\]")


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text)


def render_prompt(request: GenerationRequest) -> str:
    if request.messages is not None:
        return "".join(f"{m.role}: {m.content}\n" for m in request.messages) + "assistant:"
    return request.prompt or ""


class FakeBackend:
    def __init__(self, name: str, config: FakeBackendConfig) -> None:
        self.name = name
        self.config = config
        self._script = tokenize(config.script) or ["."]
        self._in_flight = 0
        self._ready = False

    async def start(self) -> None:
        self._ready = True

    async def close(self) -> None:
        self._ready = False

    def info(self) -> BackendInfo:
        return BackendInfo(
            name=self.name,
            type="fake",
            model_id=self.config.model_id or "fake-scripted",
            context_length=self.config.context_length,
            ready=self._ready,
        )

    def stats(self) -> dict[str, float]:
        return {"in_flight": float(self._in_flight)}

    def _output_tokens(self, request: GenerationRequest, prompt: str) -> list[str]:
        if "[[echo]]" in prompt:
            last = request.messages[-1].content if request.messages else (request.prompt or "")
            return tokenize(last.replace("[[echo]]", "")) or ["."]
        offset = 0
        if request.sampling.temperature > 0 and request.sampling.seed is not None:
            offset = zlib.crc32(str(request.sampling.seed).encode()) % len(self._script)
        return self._script[offset:] + self._script[:offset]

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        cfg = self.config
        if cfg.max_concurrent and self._in_flight >= cfg.max_concurrent:
            raise BackendOverloaded(f"backend {self.name!r} is at capacity", retry_after_s=1.0)
        prompt = render_prompt(request)
        num_prompt = len(tokenize(prompt))
        budget = cfg.context_length - num_prompt
        if budget <= 0 or (request.max_tokens is not None and request.max_tokens > budget):
            raise ContextLengthExceeded.for_request(cfg.context_length, num_prompt, request.max_tokens or 0)
        if "[[fail]]" in prompt:
            raise BackendError("scripted failure before the first token")
        if "[[unavailable]]" in prompt:
            raise BackendUnavailable(f"backend {self.name!r} is unavailable (scripted)")
        fail_after = int(m.group(1)) if (m := _FAIL_AFTER.search(prompt)) else None
        dies_after = cfg.fail_after_tokens or None
        bug_after = int(m.group(1)) if (m := _BUG_AFTER.search(prompt)) else None
        max_tokens = min(request.max_tokens or budget, budget)
        script = self._output_tokens(request, prompt)

        self._in_flight += 1
        try:
            if "[[hang]]" in prompt:
                await asyncio.Event().wait()
            if cfg.first_token_delay_s:
                await asyncio.sleep(cfg.first_token_delay_s)
            chunks = self._emit(script, max_tokens, request.sampling.stop, num_prompt, fail_after)
            async with contextlib.aclosing(chunks):  # not left to the GC when the consumer stops early
                async for chunk in chunks:
                    if bug_after is not None and chunk.text:
                        bug_after -= 1
                        if bug_after < 0:
                            raise RuntimeError("scripted bug mid-stream")
                    if dies_after is not None and chunk.text:
                        dies_after -= 1
                        if dies_after < 0:
                            raise BackendUnavailable(f"backend {self.name!r} lost its connection mid-stream (scripted)")
                    yield chunk
        finally:
            self._in_flight -= 1

    async def _emit(
        self, script: list[str], max_tokens: int, stops: tuple[str, ...], num_prompt: int, fail_after: int | None
    ) -> AsyncIterator[Chunk]:
        delay = 1.0 / self.config.tokens_per_s if self.config.tokens_per_s else 0.0
        text = ""
        sent = 0  # chars of `text` already yielded
        hold = max((len(s) for s in stops), default=0)
        finish = "stop"
        num_out = 0
        for num_out, token in enumerate(script[:max_tokens] if len(script) >= max_tokens else script, start=1):
            if fail_after is not None and num_out > fail_after:
                raise BackendError("scripted failure mid-stream")
            if delay:
                await asyncio.sleep(delay)
            elif num_out % 64 == 0:
                await asyncio.sleep(0)  # stay cooperative on long outputs
            text += token
            cut = min((i for s in stops if (i := text.find(s)) != -1), default=-1)
            if cut != -1:
                if cut > sent:
                    yield Chunk(text=text[sent:cut])
                yield Chunk(finish_reason="stop", usage=Usage(prompt_tokens=num_prompt, completion_tokens=num_out))
                return
            safe = len(text) - (hold - 1 if hold else 0)  # keep a possible stop-string prefix back
            if safe > sent:
                yield Chunk(text=text[sent:safe])
                sent = safe
        if len(script) >= max_tokens:
            finish = "length"
        if len(text) > sent:
            yield Chunk(text=text[sent:])
        yield Chunk(finish_reason=finish, usage=Usage(prompt_tokens=num_prompt, completion_tokens=num_out))
