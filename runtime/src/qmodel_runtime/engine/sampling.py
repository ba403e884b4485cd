"""Choosing the next token: greedy, temperature, top-k, top-p, per-request seeds.

One batched pass over the rows that sample; greedy rows are a plain argmax. A request with
a seed draws from its own ``torch.Generator``, so its output does not depend on which other
requests share the batch; rows without a seed share the engine's generator.

Sampling uses the exponential race: ``argmax(p / E)`` with ``E ~ Exp(1)`` picks index i with
probability p_i, needs no cumulative sum and works on a whole batch at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        # The HTTP layer validates user input with messages; these guard internal callers.
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"bad sampling parameters: {self}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def make_generator(seed: int | None, device) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def filter_logits(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """Probabilities [B, V] after temperature, top-k and top-p (each row its own values).

    logits: [B, V] fp32; temperature: [B] > 0; top_k: [B] int (0: off); top_p: [B] in (0, 1].
    """
    logits = logits / temperature[:, None]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, logits.shape[-1])
    drop = rank >= k[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    # top-p: keep the smallest prefix whose mass reaches p (the first token always stays).
    before = probs.cumsum(dim=-1) - probs
    drop |= before >= top_p[:, None]
    probs = probs.masked_fill(drop, 0.0)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(-1, order, probs)


def exponential_like(probs: Tensor, generators: list[torch.Generator | None]) -> Tensor:
    """Exp(1) noise [B, V]; rows with a generator draw from it, the rest from the default one."""
    noise = torch.empty_like(probs)
    shared = [i for i, g in enumerate(generators) if g is None]
    if shared:
        noise[shared] = torch.empty(len(shared), probs.shape[-1], device=probs.device).exponential_()
    for i, g in enumerate(generators):
        if g is not None:
            noise[i].exponential_(generator=g)
    return noise.clamp_min_(1e-30)  # p / 0 would be nan for p = 0


def sample(
    logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """Next token for each row of ``logits`` [B, V] under that row's parameters."""
    tokens = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        dev = logits.device
        sub = [params[i] for i in rows]
        probs = filter_logits(
            logits[rows],
            torch.tensor([p.temperature for p in sub], device=dev),
            torch.tensor([p.top_k for p in sub], device=dev),
            torch.tensor([p.top_p for p in sub], device=dev),
        )
        choice = (probs / exponential_like(probs, [generators[i] for i in rows])).argmax(dim=-1)
        tokens[rows] = choice
    return tokens.tolist()
