"""Perplexity: exp of the mean token negative log-likelihood over non-overlapping windows.

The GPTQ paper's method: the text is cut into windows of ``length`` tokens without BOS,
each window is scored on its own, and every position but the first predicts its next
token. ``perplexity`` takes any callable that maps token ids [B, T] to logits [B, T, V]
(or an object with ``.logits``), so the same measuring stick serves the full model, the
layer-streamed model of the quantize Job and the packed int4 model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qmodel_runtime.progress import Progress


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll_sum: float  # sum of token negative log-likelihoods (nats)
    tokens: int  # predicted tokens counted
    windows: int
    seconds: float


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed NLL per window: logits [B, T, V] at position t predict ids[:, t+1]. -> [B] fp32."""
    pred = logits[:, :-1].float()
    target = ids[:, 1:].to(pred.device)
    nll = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="none")
    return nll.view(target.shape).sum(dim=1)


def _logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


@torch.no_grad()
def perplexity(
    model: Callable[[torch.Tensor], torch.Tensor],
    windows: torch.Tensor,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    desc: str = "perplexity",
) -> PerplexityResult:
    """Perplexity of ``model`` over ``windows`` [n, T] (int64 token ids), with progress."""
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [n, T] with T >= 2, got {tuple(windows.shape)}")
    n, length = windows.shape
    progress = Progress(desc, n, unit="windows")
    nll_sum = 0.0
    for start in range(0, n, batch_size):
        batch = windows[start : start + batch_size]
        if device is not None:
            batch = batch.to(device)
        nll = window_nll(_logits(model(batch)), batch)
        nll_sum += float(nll.double().sum())
        tokens_so_far = (start + batch.shape[0]) * (length - 1)
        progress.update(batch.shape[0], note=f"ppl {math.exp(nll_sum / tokens_so_far):.3f}")
    tokens = n * (length - 1)
    return PerplexityResult(math.exp(nll_sum / tokens), nll_sum, tokens, n, progress.seconds)
