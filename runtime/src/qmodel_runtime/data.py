"""Text -> token windows, for calibration and perplexity (pure functions over tensors)."""

from __future__ import annotations

import torch


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D int64 tensor of token ids, without BOS/EOS."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


def token_windows(ids: torch.Tensor, length: int, limit: int | None = None) -> torch.Tensor:
    """Non-overlapping windows [n, length] from the start of ``ids``; the ragged tail is dropped
    (the GPTQ paper's evaluation). ``limit`` keeps only the first windows."""
    if length < 2:
        raise ValueError(f"window length must be at least 2 tokens, got {length}")
    n = ids.numel() // length
    if limit is not None:
        n = min(n, limit)
    if n == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {length}")
    return ids[: n * length].view(n, length)


def calibration_windows(ids: torch.Tensor, count: int, length: int, seed: int = 0) -> torch.Tensor:
    """``count`` windows [count, length] starting at seeded random offsets (the GPTQ paper's
    calibration sampling); the same seed gives the same windows on every machine."""
    if ids.numel() <= length:
        raise ValueError(f"calibration text has {ids.numel()} tokens; need more than {length}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - length, (count,), generator=gen)
    return torch.stack([ids[s : s + length] for s in starts.tolist()])
