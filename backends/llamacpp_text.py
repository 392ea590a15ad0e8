"""Text plumbing for the llama.cpp backend, in plain Python (no model needed to test it).

- `render_chat`: a chat template (Jinja, sandboxed) + messages -> prompt text.
- `Utf8Decoder`: token pieces are bytes; a multi-byte character can be split across tokens.
- `StopMatcher`: stop strings are matched on text, never emitted, and a possible prefix of one
  is held back while streaming so a client never sees half a stop string.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from backends.base import BackendRequestError, Message


def _raise_exception(message: str) -> None:
    # Hugging Face templates call raise_exception() to reject conversations they cannot format.
    raise TemplateError(message)


@lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(template)


def render_chat(template: str, messages: Sequence[Message], *, bos_token: str, eos_token: str) -> str:
    """Render `messages` with a Hugging Face style chat template, ending with the assistant's turn.

    A template that rejects the conversation (e.g. roles not alternating) is the client's fault:
    it becomes a `BackendRequestError` carrying the template's own message.
    """
    try:
        return _compile(template).render(
            messages=[{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=True,
            bos_token=bos_token,
            eos_token=eos_token,
        )
    except TemplateError as exc:
        raise BackendRequestError(f"chat template rejected the messages: {exc}", param="messages") from None


class Utf8Decoder:
    """Bytes of successive token pieces -> text, holding back an incomplete UTF-8 sequence."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def decode(self, piece: bytes) -> str:
        return self._decoder.decode(piece)

    def flush(self) -> str:
        """Whatever is left at the end of generation (an incomplete tail becomes U+FFFD)."""
        return self._decoder.decode(b"", final=True)


class StopMatcher:
    """Cuts generated text at the first stop string, never emitting any part of it."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""  # text that could be the start of a stop string
        self.stopped = False

    def feed(self, text: str) -> str:
        """Add generated text; return what is safe to emit now. Sets `stopped` on a match."""
        if not self._stops:
            return text
        pending = self._held + text
        cut = min((i for i in (pending.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            self.stopped = True
            return pending[:cut]
        keep = self._longest_stop_prefix_suffix(pending)
        self._held = pending[len(pending) - keep :]
        return pending[: len(pending) - keep]

    def flush(self) -> str:
        """Generation ended without a stop string: the held text is ordinary output."""
        held, self._held = self._held, ""
        return held

    def _longest_stop_prefix_suffix(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        best = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:k]):
                    best = k
                    break
        return best
