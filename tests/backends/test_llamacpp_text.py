"""Prompt rendering, UTF-8 reassembly and stop-string matching of the llama.cpp backend (no model)."""

from __future__ import annotations

import pytest

from backends.base import BackendRequestError, Message
from backends.bundled import GEMMA_CHAT_TEMPLATE
from backends.llamacpp_text import StopMatcher, Utf8Decoder, render_chat


def stream_through(stops: list[str], pieces: list[str]) -> tuple[list[str], bool]:
    matcher = StopMatcher(stops)
    out = []
    for piece in pieces:
        out.append(matcher.feed(piece))
        if matcher.stopped:
            return out, True
    out.append(matcher.flush())
    return out, False


@pytest.mark.parametrize(
    ("stops", "pieces", "joined", "stopped"),
    [
        (["END"], ["abc", "E", "N", "D", "xyz"], "abc", True),  # stop split across pieces
        (["END"], ["abcEN", "x"], "abcENx", False),  # a false start is released
        (["END"], ["ab", "EN"], "abEN", False),  # held tail flushed at the end
        (["\n\n", "###"], ["a\n", "b##", "#c"], "a\nb", True),
        (["ab", "b"], ["xab"], "x", True),  # earliest match wins
        ([], ["a", "b"], "ab", False),
        ([""], ["a"], "a", False),  # an empty stop string means nothing
    ],
)
def test_stop_matcher_cuts_at_first_stop_and_never_emits_it(
    stops: list[str], pieces: list[str], joined: str, stopped: bool
) -> None:
    out, was_stopped = stream_through(stops, pieces)
    assert "".join(out) == joined
    assert was_stopped is stopped


def test_stop_matcher_holds_back_only_a_possible_prefix() -> None:
    matcher = StopMatcher(["<end>"])
    assert matcher.feed("hello <e") == "hello "  # "<e" could start "<end>"
    assert matcher.feed("x") == "<ex"  # it did not


def test_utf8_decoder_joins_characters_split_across_tokens() -> None:
    data = "héllo 🙂 世界".encode()
    decoder = Utf8Decoder()
    text = "".join(decoder.decode(data[i : i + 1]) for i in range(len(data))) + decoder.flush()
    assert text == "héllo 🙂 世界"


def test_utf8_decoder_replaces_an_incomplete_tail_at_the_end() -> None:
    decoder = Utf8Decoder()
    assert decoder.decode("🙂".encode()[:2]) == ""
    assert decoder.flush() == "\ufffd"


def test_gemma_template_renders_turns_and_generation_prompt() -> None:
    messages = [
        Message(role="system", content="Be brief."),
        Message(role="user", content="Hi"),
        Message(role="assistant", content="Hello"),
        Message(role="user", content="Bye"),
    ]
    text = render_chat(GEMMA_CHAT_TEMPLATE, messages, bos_token="<bos>", eos_token="<eos>")
    assert text == (
        "<bos><start_of_turn>user\nBe brief.\n<end_of_turn>\n"
        "<start_of_turn>user\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_template_rejection_is_a_request_error() -> None:
    template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok"
    with pytest.raises(BackendRequestError, match="first must be user"):
        render_chat(template, [Message(role="assistant", content="x")], bos_token="", eos_token="")


def test_template_sandbox_blocks_attribute_escapes() -> None:
    template = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(BackendRequestError, match="unsafe"):
        render_chat(template, [Message(role="user", content="x")], bos_token="", eos_token="")
