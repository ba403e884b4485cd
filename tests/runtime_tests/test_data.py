"""Token windows and seeded calibration sampling."""

from __future__ import annotations

import pytest
import torch

from qmodel_runtime import data


def test_token_windows_are_contiguous_and_drop_the_tail():
    ids = torch.arange(1030)
    w = data.token_windows(ids, 512)
    assert w.shape == (2, 512)
    assert torch.equal(w.flatten(), ids[:1024])
    assert data.token_windows(ids, 100, limit=3).shape == (3, 100)


def test_token_windows_errors():
    with pytest.raises(ValueError, match="fewer than one window"):
        data.token_windows(torch.arange(10), 512)
    with pytest.raises(ValueError, match="at least 2"):
        data.token_windows(torch.arange(10), 1)


def test_calibration_windows_are_seeded_slices():
    ids = torch.randint(0, 1000, (5000,))
    a = data.calibration_windows(ids, 8, 64, seed=3)
    b = data.calibration_windows(ids, 8, 64, seed=3)
    c = data.calibration_windows(ids, 8, 64, seed=4)
    assert a.shape == (8, 64) and torch.equal(a, b) and not torch.equal(a, c)
    text = ids.tolist()
    for row in a.tolist():  # every window is a real slice of the text
        assert any(text[s : s + 64] == row for s in range(len(text) - 63) if text[s] == row[0])


def test_calibration_needs_enough_text():
    with pytest.raises(ValueError, match="need more than 64"):
        data.calibration_windows(torch.arange(64), 1, 64)


def test_tokenize_adds_no_special_tokens(smollm2_tokenizer):
    ids = data.tokenize(smollm2_tokenizer, "Hello world")
    assert ids.dtype == torch.int64 and ids.ndim == 1
    assert smollm2_tokenizer.bos_token_id not in ids.tolist()
    assert smollm2_tokenizer.decode(ids) == "Hello world"
