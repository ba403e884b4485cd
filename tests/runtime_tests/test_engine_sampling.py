"""Sampling: the filters, the exponential race, per-request seeds."""

from __future__ import annotations

import math

import pytest
import torch

from qmodel_runtime.engine.sampling import SamplingParams, filter_logits, make_generator, sample


def _filter(logits, temperature=1.0, top_k=0, top_p=1.0):
    b = logits.shape[0]
    return filter_logits(
        logits, torch.full((b,), temperature), torch.full((b,), top_k), torch.full((b,), top_p)
    )


def test_temperature_alone_is_softmax_of_scaled_logits():
    logits = torch.randn(3, 50)
    probs = _filter(logits, temperature=0.7)
    assert torch.allclose(probs, torch.softmax(logits / 0.7, dim=-1), atol=1e-6)


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]])
    probs = _filter(logits, top_k=2)
    assert probs[0].nonzero().flatten().tolist() == [1, 3]
    assert torch.allclose(probs[0, [1, 3]], torch.softmax(torch.tensor([3.0, 2.0]), -1))


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    # probabilities 0.5, 0.3, 0.15, 0.05: p=0.45 needs the first token, 0.75 the first two,
    # 0.81 the first three, 0.99 all four.
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    for p, kept in ((0.45, 1), (0.75, 2), (0.81, 3), (0.99, 4), (1e-6, 1)):
        probs = _filter(logits, top_p=p)
        assert (probs[0] > 0).sum().item() == kept, p
        assert math.isclose(probs.sum().item(), 1.0, rel_tol=1e-6)


def test_rows_use_their_own_parameters():
    logits = torch.randn(2, 40)
    k = torch.tensor([1, 40])
    probs = filter_logits(logits, torch.ones(2), k, torch.ones(2))
    assert (probs[0] > 0).sum() == 1 and (probs[1] > 0).sum() == 40


def test_greedy_is_argmax():
    logits = torch.randn(4, 100)
    tokens = sample(logits, [SamplingParams(max_tokens=1, temperature=0.0)] * 4, [None] * 4)
    assert tokens == logits.argmax(-1).tolist()


def test_sampling_frequencies_follow_the_distribution():
    """20,000 draws from 5 tokens: every frequency within 5 standard errors of its
    probability (a wrong race, e.g. p * E instead of p / E, is off by >30 standard errors)."""
    torch.manual_seed(0)
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0])
    n = 20_000
    params = [SamplingParams(max_tokens=1, temperature=1.0)] * n
    tokens = torch.tensor(sample(logits.expand(n, 5).clone(), params, [None] * n))
    freq = torch.bincount(tokens, minlength=5).double() / n
    p = torch.softmax(logits.double(), -1)
    stderr = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() < 5 * stderr).all(), (freq, p)


def test_a_seed_gives_the_same_tokens_whatever_shares_the_batch():
    logits = torch.randn(1, 1000)
    seeded = SamplingParams(max_tokens=1, temperature=1.0, seed=1234)
    other = SamplingParams(max_tokens=1, temperature=0.9)
    alone = [sample(logits, [seeded], [make_generator(1234, "cpu")])[0] for _ in range(1)]
    draws_alone, draws_batched = [], []
    g1, g2 = make_generator(1234, "cpu"), make_generator(1234, "cpu")
    for _ in range(20):
        draws_alone.append(sample(logits, [seeded], [g1])[0])
        batch = torch.cat([torch.randn(1, 1000), logits, torch.randn(1, 1000)])
        draws_batched.append(sample(batch, [other, seeded, other], [None, g2, None])[1])
    assert draws_alone == draws_batched
    assert alone[0] == draws_alone[0]
    assert len(set(draws_alone)) > 1  # it really samples: 20 draws from 1000 near-uniform tokens


@pytest.mark.parametrize(
    "bad",
    [
        dict(max_tokens=0),
        dict(max_tokens=1, temperature=-0.1),
        dict(max_tokens=1, top_p=0.0),
        dict(max_tokens=1, top_k=-1),
    ],
)
def test_invalid_parameters_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)
