"""Incremental detokenization and stop-string hold-back (no model, no torch)."""

from __future__ import annotations

import pytest

from backends.torch_engine.detokenizer import IncrementalDetokenizer

# A byte-level toy vocabulary: token i is one byte; multi-byte UTF-8 spans several tokens.
TEXT = "héllo wörld STOP tail"
BYTES = list(TEXT.encode())


def decode(ids: list[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


def feed(stop: tuple[str, ...]) -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(decode, [ord(c) for c in "x> "], stop)
    deltas = []
    for b in BYTES:
        deltas.append(detok.add_token(b))
        if detok.stopped:
            break
    return deltas, detok


def test_multibyte_characters_are_never_split() -> None:
    deltas, detok = feed(())
    assert "".join(deltas) + detok.flush() == TEXT
    assert all("\ufffd" not in d for d in deltas)


@pytest.mark.parametrize("stop", [("STOP",), ("wörld S", "zzz"), ("ST", "STOP")])
def test_stop_string_cuts_output_and_is_never_emitted(stop: tuple[str, ...]) -> None:
    deltas, detok = feed(stop)
    streamed = "".join(deltas)
    first = min(TEXT.find(s) for s in stop if s in TEXT)
    assert detok.stopped
    assert streamed == TEXT[:first]
    assert detok.text == TEXT[:first]


def test_possible_stop_prefix_is_held_then_released() -> None:
    detok = IncrementalDetokenizer(decode, [], ("STOP",))
    out = "".join(detok.add_token(b) for b in b"a ST")
    assert out == "a "  # "ST" could still become "STOP"
    out += "".join(detok.add_token(b) for b in b"AR")
    assert out == "a STAR" and not detok.stopped
    detok.add_token(ord("S"))
    assert detok.flush() == "S"  # end of generation releases what was held
