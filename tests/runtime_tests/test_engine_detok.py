"""Incremental detokenization and stop strings, with the real SmolLM2 tokenizer."""

from __future__ import annotations

import pytest

from qmodel_runtime.engine.detok import Detokenizer

TEXT = "Grüße aus Zürich! 東京 is 🙂 far, isn't it?\n    def f(x): return x"


def stream(tokenizer, text: str, stop=(), prompt="Say:"):
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    d = Detokenizer(tokenizer, prompt_ids, tuple(stop))
    pieces = []
    for i in ids:
        pieces.append(d.add(i))
        if d.stopped:
            break
    pieces.append(d.flush())
    return pieces, d


def test_token_by_token_text_equals_the_whole_decode(smollm2_tokenizer):
    pieces, _ = stream(smollm2_tokenizer, TEXT)
    assert "".join(pieces) == TEXT
    # multi-byte characters span tokens here: no piece may hold a replacement character
    assert not any("\ufffd" in p for p in pieces)
    assert sum(1 for p in pieces if p) > 10  # it streams, not one lump at the end


def test_stop_string_spanning_tokens_is_cut_and_not_returned(smollm2_tokenizer):
    pieces, d = stream(smollm2_tokenizer, TEXT, stop=("is 🙂",))
    assert "".join(pieces) == "Grüße aus Zürich! 東京 "
    assert d.stopped


def test_text_that_only_starts_a_stop_string_is_released(smollm2_tokenizer):
    # "far, is" starts the stop "far, isn't it!" but the text goes on with "n't it?": released
    pieces, d = stream(smollm2_tokenizer, TEXT, stop=("far, isn't it!",))
    assert "".join(pieces) == TEXT
    assert not d.stopped


def test_held_back_text_is_not_streamed_early(smollm2_tokenizer):
    """While the output ends in a prefix of a stop string, that prefix is held back."""
    tok = smollm2_tokenizer
    d = Detokenizer(tok, tok("x")["input_ids"], ("END",))
    out = "".join(d.add(i) for i in tok("hello EN", add_special_tokens=False)["input_ids"])
    assert out == "hello "  # "EN" could become "END"
    rest = "".join(d.add(i) for i in tok("D", add_special_tokens=False)["input_ids"])
    assert rest == "" and d.stopped


@pytest.mark.parametrize("stop", [("Zürich",), ("nothing here", "東京")])
def test_the_first_matching_stop_wins(smollm2_tokenizer, stop):
    pieces, d = stream(smollm2_tokenizer, TEXT, stop=stop)
    assert d.stopped
    assert "".join(pieces) == TEXT[: TEXT.index(stop[-1])]
