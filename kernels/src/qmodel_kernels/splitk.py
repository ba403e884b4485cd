"""Split-K: partial products [SPLIT, M, N] in fp32, summed (+ bias) by a second small kernel.

Splitting K multiplies the CTAs of a decode GEMV (N / BLOCK_N tiles are too few to fill
132 SMs for a 4096-wide output). Partials are written with plain stores and reduced in a
fixed order, not with atomics: results are deterministic and keep fp32 precision, at the
price of one extra launch that reads SPLIT*M*N*4 bytes (tens of kB at decode).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qmodel_kernels.quant_weight import interpreting
from qmodel_kernels.tiles import round_to

# int32 offsets inside the kernels: SPLIT * M * N must stay below 2^31.
MAX_PARTIAL_ELEMENTS = 2**31 - 1


def reduce_configs() -> list[dict]:
    """Launch settings for the reduction (memory-bound on tens of kB: one size suffices)."""
    return [{"BLOCK": 1024, "num_warps": 4}]


@triton.jit
def _splitk_reduce_kernel(
    # tensors
    part_ptr,  # fp32 [SPLIT, M, N] contiguous
    bias_ptr,  # [N] or unused
    out_ptr,  # [M, N] contiguous, the activation dtype
    # sizes
    MN,
    N,
    SPLIT,
    # flags and tiling
    HAS_BIAS: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLIT):
        acc += tl.load(part_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, round_to(acc, out_ptr.dtype.element_ty, INTERPRET), mask=mask)


def split_rows(k: int, block_k: int, split: int) -> tuple[int, int]:
    """-> (input rows per split, rounded up to whole tiles; the number of non-empty splits)."""
    per = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    return per, triton.cdiv(k, per)


def partial_buffer(m: int, n: int, split: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, int]:
    """Where a kernel writes: the final [M, N] output (split 1) or fp32 partials [split, M, N].

    -> (tensor, stride between splits).
    """
    if split == 1:
        return torch.empty(m, n, dtype=dtype, device=device), 0
    if split * m * n > MAX_PARTIAL_ELEMENTS:
        raise ValueError(
            f"split_k={split} with M={m}, N={n} overflows the partial buffer; use a smaller split"
        )
    return torch.empty(split, m, n, dtype=torch.float32, device=device), m * n


def splitk_reduce(partials: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """partials fp32 [SPLIT, M, N] -> sum over SPLIT (+ bias) as [M, N] in ``dtype``."""
    if partials.ndim != 3 or partials.dtype != torch.float32 or not partials.is_contiguous():
        raise ValueError(
            f"partials must be a contiguous fp32 [SPLIT, M, N] tensor, got {partials.dtype} "
            f"{tuple(partials.shape)}"
        )
    split, m, n = partials.shape
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must have shape [{n}], got {tuple(bias.shape)}")
    out = torch.empty(m, n, dtype=dtype, device=partials.device)
    cfg = reduce_configs()[0]
    grid = (triton.cdiv(m * n, cfg["BLOCK"]),)
    _splitk_reduce_kernel[grid](
        partials,
        partials if bias is None else bias,
        out,
        m * n,
        n,
        split,
        HAS_BIAS=bias is not None,
        INTERPRET=interpreting(_splitk_reduce_kernel),
        BLOCK=cfg["BLOCK"],
        num_warps=cfg["num_warps"],
    )
    return out


def splitk_reduce_ref(partials: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    out = partials.sum(0)
    return (out if bias is None else out + bias.float()).to(dtype)
