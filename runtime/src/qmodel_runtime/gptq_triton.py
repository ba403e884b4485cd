"""GPTQ's column loop for one block of columns, fused into one Triton kernel (CUDA).

The PyTorch loop in ``qmodel_runtime.gptq`` launches ~10 small kernels per column; a 7B
layer has 23k columns (q/k/v, o, gate/up fused; down), so on a GPU that loop is bound by
launch and Python overhead, not arithmetic (the reference implementation spends 10.0 of its
13.7 s per layer there on an H100). Here one program owns a tile of weight rows and the
block's columns in registers and runs the whole Algorithm-1 inner loop over them: select
column i, compute the group's grid where a group starts, quantize, divide the error by
Hinv[i, i], update the remaining columns. Rows are independent in GPTQ, so tiles never talk.

Scope: groups that start inside a block must fit in it (group sizes dividing the block
size, e.g. 32/64/128 with blocks of 128); otherwise the caller passes each block's grid in
(per-channel, or groups of 256...). No clipping search, no static groups: those stay on the
PyTorch loop. Rounding is half-to-even and divisions are IEEE-rounded, as in PyTorch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources

# fp16's smallest normal, as in qmodel_runtime.quantizer (scales are stored in fp16).
MIN_SCALE = 2.0**-14


# A tile of BLOCK_R rows x 128 fp32 columns lives in registers (32 rows: 16 KiB per program;
# 3 such tiles). Not tuned yet (no GPU when it was written): the kernel runs once per 128
# columns, so the column loop stops mattering long before the tile size does.
BLOCK_R = 32
NUM_WARPS = 4
# Columns per program, whatever the block's width (masked): one compilation serves every block,
# so a kernel that cannot be built fails at the first block, before anything was updated.
BLOCK_C = 128


@triton.jit
def _rint(x):
    """Round half to even (torch.round), from floor: ties go to the even neighbour."""
    r = tl.floor(x + 0.5)
    tie = (r - x) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def _grid(w, in_group, maxq, SYM: tl.constexpr):
    """Min/max grid per row over the masked columns (0 always inside), scale rounded to fp16,
    asymmetric zero clamped to [1, maxq] (as quantizer.grid_params)."""
    xmin = tl.minimum(tl.min(tl.where(in_group, w, float("inf")), axis=1), 0.0)
    xmax = tl.maximum(tl.max(tl.where(in_group, w, float("-inf")), axis=1), 0.0)
    if SYM:
        xmax = tl.maximum(-xmin, xmax)
        xmin = -xmax
    empty = (xmin == 0.0) & (xmax == 0.0)
    xmin = tl.where(empty, -1.0, xmin)
    xmax = tl.where(empty, 1.0, xmax)
    scale = tl.maximum(tl.math.div_rn(xmax - xmin, maxq * 1.0), MIN_SCALE)
    scale = scale.to(tl.float16).to(tl.float32)
    if SYM:
        zero = tl.zeros_like(scale) + ((maxq + 1) // 2)
    else:
        zero = tl.minimum(tl.maximum(_rint(tl.math.div_rn(-xmin, scale)), 1.0), maxq * 1.0)
    return scale, zero


@triton.jit
def _gptq_block_kernel(
    # tensors: W1 [rows, count] in/out, codes [rows, count] out, Err1 [rows, count] out,
    # Hinv1 [count, count] upper Cholesky factor of the inverse Hessian (this block),
    # scales/zeros [groups, rows]: in (GROUPED == False: row 0 is this block's grid) or out
    w_ptr,
    q_ptr,
    e_ptr,
    h_ptr,
    s_ptr,
    z_ptr,
    # sizes and strides
    rows,
    count,
    stride_w,
    stride_h,
    stride_s,
    group,
    first_group,
    maxq,
    # meta
    SYM: tl.constexpr,
    GROUPED: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_C)
    rmask = r < rows
    tile = rmask[:, None] & (c[None, :] < count)
    offs = r[:, None] * stride_w + c[None, :]
    w = tl.load(w_ptr + offs, mask=tile, other=0.0)
    codes = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    errs = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    scale = tl.load(s_ptr + r, mask=rmask, other=1.0)
    zero = tl.load(z_ptr + r, mask=rmask, other=0.0)
    for i in range(count):
        if GROUPED:
            if i % group == 0:  # a group starts: its grid from the columns as they are now
                in_group = (c[None, :] >= i) & (c[None, :] < i + group) & (c[None, :] < count)
                scale, zero = _grid(w, in_group, maxq, SYM)
                g = first_group + i // group
                tl.store(s_ptr + g * stride_s + r, scale, mask=rmask)
                tl.store(z_ptr + g * stride_s + r, zero, mask=rmask)
        here = c[None, :] == i
        col = tl.sum(tl.where(here, w, 0.0), axis=1)  # column i of the tile
        d = tl.load(h_ptr + i * stride_h + i)
        h = tl.load(h_ptr + i * stride_h + c, mask=c < count, other=0.0)  # zero left of i
        q = tl.minimum(tl.maximum(_rint(tl.math.div_rn(col, scale)) + zero, 0.0), maxq * 1.0)
        err = tl.math.div_rn(col - scale * (q - zero), d)
        w = w - err[:, None] * h[None, :]
        codes = tl.where(here, q[:, None], codes)
        errs = tl.where(here, err[:, None], errs)
    tl.store(q_ptr + offs, codes.to(tl.uint8), mask=tile)
    tl.store(e_ptr + offs, errs, mask=tile)


class KernelUnavailable(RuntimeError):
    """The kernel does not compile or fit on this GPU: the caller falls back to PyTorch."""


def supports(cfg, width: int) -> bool:
    """Whether the fused block loop handles these settings (else the PyTorch loop runs):
    groups aligned with blocks of at most 128 columns, no static groups, and the clipping search
    only where grids are found outside the kernel (groups of whole blocks, or per channel)."""
    aligned = cfg.group_size == -1 or width % cfg.block_size == 0 or cfg.block_size % width == 0
    grids_outside = width >= cfg.block_size
    clip_ok = cfg.clip_steps == 0 or grids_outside
    return cfg.block_size <= 128 and not cfg.static_groups and clip_ok and aligned


def quantize_block(
    W1: torch.Tensor,
    Hinv1: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    first_group: int,
    group: int,
    maxq: int,
    sym: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One block: W1 [rows, count] fp32 (read only), Hinv1 [count, count] ->
    (codes uint8 [rows, count], Err1 fp32 [rows, count]). ``group`` > 0: groups of that many
    columns start inside the block and their grids are written to ``scales``/``zeros`` rows
    ``first_group``...; ``group`` == 0: ``scales[first_group]``/``zeros[first_group]`` hold the
    block's grid."""
    rows, count = W1.shape
    if W1.dtype != torch.float32 or Hinv1.shape != (count, count) or count > BLOCK_C:
        raise ValueError(f"expected fp32 W1 [rows, <={BLOCK_C}] and Hinv1 [{count}, {count}]")
    if not (W1.is_contiguous() and Hinv1.stride(1) == 1 and scales.is_contiguous() and zeros.is_contiguous()):
        raise ValueError("W1, scales and zeros must be contiguous, Hinv1 row-major")
    codes = torch.empty(rows, count, dtype=torch.uint8, device=W1.device)
    errs = torch.empty(rows, count, dtype=torch.float32, device=W1.device)
    base_s, base_z = scales[first_group], zeros[first_group]  # group == 0: the block's grid
    s, z = (scales, zeros) if group else (base_s, base_z)

    try:
        _gptq_block_kernel[(triton.cdiv(rows, BLOCK_R),)](
            W1, codes, errs, Hinv1, s, z,
            rows, count, W1.stride(0), Hinv1.stride(0), scales.stride(0), max(group, 1), first_group, maxq,
            SYM=sym, GROUPED=group > 0, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C,
            num_warps=NUM_WARPS,
        )  # fmt: skip
    except (CompilationError, OutOfResources) as exc:
        raise KernelUnavailable(f"the fused GPTQ kernel is unavailable here: {exc}") from exc
    return codes, errs
