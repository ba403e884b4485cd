"""Shared helpers for the kernel tests: random packed layers and error measures."""

from __future__ import annotations

import torch

from qmodel_kernels import layout

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs kernels interpreted


def random_layer(gen, k, n, bits=4, group_size=128, sym=False, act_order=False) -> layout.PackedWeight:
    """A packed layer with random codes, zeros in [1, 2^bits - 1] and GPTQ-like scales."""
    groups = layout.num_groups(k, group_size)
    codes = torch.randint(0, 2**bits, (k, n), generator=gen)
    if sym:
        zeros = torch.full((groups, n), 2 ** (bits - 1))
    else:
        zeros = torch.randint(1, 2**bits, (groups, n), generator=gen)
    # scales spanning 30x, as across a real layer's rows, so a wrong group shows
    scales = (torch.rand(groups, n, generator=gen) * 0.029 + 0.001).half()
    g_idx = layout.default_g_idx(k, group_size)
    if act_order:  # GPTQ's act-order: full groups, rows assigned in a random order
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    return layout.pack(codes, zeros, scales, g_idx, bits, group_size)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error in the Frobenius norm, against the fp64 reference."""
    y, ref = y.detach().double(), ref.detach().double()
    return float((y - ref).norm() / ref.norm())


# Unit roundoff of the output dtype (RTNE): 2^-11 for fp16, 2^-8 for bf16.
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
