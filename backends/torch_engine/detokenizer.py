"""Incremental detokenization with stop strings held back (plain Python, no torch).

Decoding one token at a time is wrong for byte-level and SentencePiece vocabularies (a character
can span tokens; a leading space depends on the previous token), and decoding the whole output
each step is quadratic. As in vLLM, we decode a short window: the text of
`ids[prefix_offset:]` minus the text of `ids[prefix_offset:read_offset]` is what the newest
tokens added; it is held while it ends in U+FFFD (an unfinished UTF-8 character).

Stop strings: text that could still become a stop string (a suffix of the text that is a prefix
of some stop string) is held back, so a stop string is never streamed to the client.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

# Prompt tokens kept as left context so the first output token decodes with its leading space.
_NUM_CONTEXT_TOKENS = 4


class IncrementalDetokenizer:
    """Turns a growing list of output token ids into text deltas, honouring stop strings."""

    def __init__(
        self,
        decode: Callable[[list[int]], str],
        prompt_token_ids: Sequence[int],
        stop: Sequence[str] = (),
    ) -> None:
        self._decode = decode
        self._ids: list[int] = list(prompt_token_ids[-_NUM_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._stop = tuple(s for s in stop if s)
        self._max_stop_len = max((len(s) for s in self._stop), default=0)
        self.text = ""  # all output text decoded so far (cut at a stop string once one matched)
        self._num_emitted_chars = 0
        self.stopped = False

    def add_token(self, token_id: int) -> str:
        """Feed one generated token; return the text that is now safe to emit (may be '')."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.text += new_text[len(prefix_text) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
        return self._emit()

    def flush(self) -> str:
        """At the end of generation (not by a stop string): release the held-back text."""
        out = self.text[self._num_emitted_chars :]
        self._num_emitted_chars = len(self.text)
        return out

    def _emit(self) -> str:
        if not self._stop:
            return self.flush()
        # Only text past what was already emitted can complete a stop string.
        search_from = max(0, self._num_emitted_chars - self._max_stop_len + 1)
        stop_at = min((i for s in self._stop if (i := self.text.find(s, search_from)) != -1), default=-1)
        if stop_at != -1:
            self.stopped = True
            self.text = self.text[:stop_at]
            return self.flush()
        safe_end = len(self.text) - self._held_back_chars()
        out = self.text[self._num_emitted_chars : safe_end]
        self._num_emitted_chars = max(self._num_emitted_chars, safe_end)
        return out

    def _held_back_chars(self) -> int:
        """Length of the longest text suffix that is a proper prefix of a stop string."""
        tail = self.text[-self._max_stop_len :]
        for n in range(min(len(tail), self._max_stop_len - 1), 0, -1):
            suffix = tail[-n:]
            if any(s.startswith(suffix) for s in self._stop):
                return n
        return 0
