"""Perplexity, the measuring stick: checked by hand on a tiny model, then on SmolLM2."""

from __future__ import annotations

import math

import pytest
import torch

from qmodel_runtime import evaluate


class BigramTable(torch.nn.Module):
    """logits[b, t] = log P(. | ids[b, t]) from a fixed table: NLLs can be written by hand."""

    def __init__(self, probs: list[list[float]]):
        super().__init__()
        self.logp = torch.tensor(probs, dtype=torch.float64).log()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.logp[ids]


PROBS = [[0.5, 0.25, 0.25], [0.1, 0.1, 0.8], [0.2, 0.6, 0.2]]


def test_perplexity_by_hand():
    windows = torch.tensor([[0, 1, 2, 1], [2, 2, 0, 0]])
    # window 1 predicts 1|0, 2|1, 1|2; window 2 predicts 2|2, 0|2, 0|0; the first token of
    # each window is never predicted (non-overlapping windows, no BOS).
    nll = -sum(math.log(p) for p in (0.25, 0.8, 0.6, 0.2, 0.2, 0.5))
    result = evaluate.perplexity(BigramTable(PROBS), windows)
    assert result.tokens == 6 and result.windows == 2
    # log-probabilities are taken in fp32 (as for real models): ~1e-7 relative rounding
    assert result.nll_sum == pytest.approx(nll, rel=1e-6)
    assert result.perplexity == pytest.approx(math.exp(nll / 6), rel=1e-6)


def test_batching_does_not_change_the_result():
    windows = torch.randint(0, 3, (7, 9))
    one = evaluate.perplexity(BigramTable(PROBS), windows, batch_size=1)
    three = evaluate.perplexity(BigramTable(PROBS), windows, batch_size=3)
    assert three.perplexity == pytest.approx(one.perplexity, rel=1e-12)


def test_uniform_model_has_perplexity_equal_to_vocab():
    model = lambda ids: torch.zeros(*ids.shape, 11)  # noqa: E731 - a one-line model
    assert evaluate.perplexity(model, torch.randint(0, 11, (3, 5))).perplexity == pytest.approx(11.0)


def test_bad_window_shape():
    with pytest.raises(ValueError, match=r"\[n, T\]"):
        evaluate.perplexity(BigramTable(PROBS), torch.tensor([1, 2, 3]))


@pytest.mark.slow
def test_smollm2_fp32_baseline(smollm2_baseline_ppl):
    # design notes: 14.09 over the first 100 x 512 tokens of the evaluation split, fp32, 2 CPU cores
    assert smollm2_baseline_ppl.tokens == 100 * 511
    assert abs(smollm2_baseline_ppl.perplexity - 14.09) <= 0.05


@pytest.mark.slow
def test_greedy_generation_knows_paris(smollm2_model, smollm2_tokenizer):
    ids = smollm2_tokenizer("The capital of France is", return_tensors="pt", add_special_tokens=False)
    out = smollm2_model.generate(**ids, max_new_tokens=12, do_sample=False)
    text = smollm2_tokenizer.decode(out[0, ids["input_ids"].shape[1] :])
    assert "Paris" in text, text
