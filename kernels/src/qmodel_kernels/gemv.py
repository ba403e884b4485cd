"""Decode-shaped products (M <= 8): y[M, N] = x[M, K] @ dequant(W)[K, N] without tensor cores.

At batch 1 the work is reading the packed weights once: ~0.56 bytes per weight for int4
g128 against 2 for fp16, so the floor is 4-5.7x under cuBLAS fp16 (../shared/anchors.md).
What the kernel does to get near it:
- each int32 word is loaded once and its 32/BITS codes are peeled off with a shift and a
  mask (tile ``words`` [ROWS, BLOCK_N]); loads run along N, where qweight is contiguous,
  so a warp reads whole 128-byte lines (Triton vectorizes them up to 128 bits a thread);
- codes become fp32 by the 2^23 mantissa trick (tiles.codes_as_float), not by the slow
  int-to-float convert;
- the scale and zero are factored out of the inner loop: for rows sharing a group,
  sum_k x_k * s * (q_k - z) = s * (sum_k x_k * q_k - z * sum_k x_k), so per code the
  inner loop costs a shift, a LOP3, an FADD and one FMA per row of x (fp32 accumulation);
- split-K (grid dim 1) gives the GPU enough CTAs when N / BLOCK_N alone would leave SMs
  idle (N = 4096 at BLOCK_N = 64 is 64 CTAs for 132 SMs); see splitk.py.
The g_idx-aware variant (HAS_GIDX) dequantizes each code with its own row's group instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from qmodel_kernels.quant_weight import (
    QuantWeight,
    check_inputs,
    interpreting,
    one_group_per_tile,
    pointer_args,
    quant_flags,
)
from qmodel_kernels.splitk import partial_buffer, split_rows, splitk_reduce
from qmodel_kernels.tiles import codes_as_float, group_params, row_groups, store_tile

MAX_M = 8  # rows of x one CTA handles; larger M goes to the tensor-core GEMM (gemm.py)
# fp32 elements of one [BLOCK_M, ROWS, BLOCK_N] tile; the kernel holds two (acc, part). Up to
# 8k per tile runs 4 warps (2 x 64 registers per thread), up to 16k 8 warps (the same per
# thread): past that they spill (255 registers per thread at most, 65536 per SM).
_MAX_TILE = 16384


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int  # input rows per step (codes, not words)
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2


def block_m_for(m: int) -> int:
    return triton.next_power_of_2(max(1, m))


def _tile_elements(block_m: int, cfg_n: int, cfg_k: int, bits: int) -> int:
    return block_m * (cfg_k * bits // 32) * cfg_n


def split_for(ctas: int, k_tiles: int, sm_count: int, waves: int = 2) -> int:
    """Smallest power-of-two split that puts ``waves`` CTAs per SM, within the K tiles."""
    split = 1
    while ctas * split < waves * sm_count and split * 2 <= min(16, k_tiles):
        split *= 2
    return split


def gemv_configs(m: int, n: int, k: int, bits: int, sm_count: int) -> list[GemvConfig]:
    """Candidates the tuner times for one shape (compiles scale with distinct block/warp/stage)."""
    block_m = block_m_for(m)
    out = []
    for block_n, block_k in ((32, 256), (64, 256), (64, 128), (128, 128), (128, 64), (256, 64), (32, 512)):
        block_k = block_k * 4 // bits  # the same words per step whatever the bits
        if _tile_elements(block_m, block_n, block_k, bits) > _MAX_TILE:
            continue
        warps = 8 if _tile_elements(block_m, block_n, block_k, bits) > 8192 else 4
        s0 = split_for(triton.cdiv(n, block_n) * triton.cdiv(m, block_m), triton.cdiv(k, block_k), sm_count)
        for split in sorted({s0, max(1, s0 // 2), min(16, s0 * 2)}):
            for stages in (2, 4):
                out.append(GemvConfig(block_n, block_k, split, warps, stages))
    return out


def default_gemv_config(m: int, n: int, k: int, bits: int, sm_count: int) -> GemvConfig:
    """Untuned choice: 32 words per column per step at batch 1, fewer as M grows."""
    block_m = block_m_for(m)
    block_n = 64
    block_k = max(32 // bits, (32 // block_m) * 32 // bits)
    split = split_for(triton.cdiv(n, block_n) * triton.cdiv(m, block_m), triton.cdiv(k, block_k), sm_count)
    return GemvConfig(block_n, block_k, split, 4, 2)


@triton.jit
def _gemv_kernel(
    # tensors
    x_ptr,  # [M, K] fp16/bf16, rows strided by stride_xm, columns contiguous
    qweight_ptr,  # int32 [K / PER_WORD, N]
    scales_ptr,  # fp16 [G, N]
    qzeros_ptr,  # int32 [G, N / PER_WORD]
    g_idx_ptr,  # int32 [K] (HAS_GIDX)
    perm_ptr,  # int32 [K] (HAS_PERM): row k of W multiplies x[:, perm[k]]
    bias_ptr,  # [N] (HAS_BIAS)
    out_ptr,  # [SPLIT, M, N]: fp32 partials, or the final output when SPLIT == 1
    # sizes
    M,
    N,
    K,
    tiles_per_split,  # K tiles of BLOCK_K rows per split (the last split may hang over K)
    # strides
    stride_xm,
    stride_om,
    stride_os,
    # quantization
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    ZERO: tl.constexpr,
    HAS_GIDX: tl.constexpr,
    HAS_PERM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ONE_GROUP: tl.constexpr,  # every K tile lies inside one group
    INTERPRET: tl.constexpr,  # running in Triton's CPU interpreter (exact bf16 rounding)
    # tiling
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    PER_WORD: tl.constexpr = 32 // BITS
    ROWS: tl.constexpr = BLOCK_K // PER_WORD  # packed words per column in one K tile
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    k_start = pid_s * tiles_per_split * BLOCK_K
    # [BLOCK_M, ROWS, BLOCK_N] partial sums, reduced over ROWS once after the loop rather
    # than in every step (a reduction across threads costs shuffles and a barrier)
    acc = tl.zeros((BLOCK_M, ROWS, BLOCK_N), dtype=tl.float32)
    for tile in range(tiles_per_split):  # a bound from program_id breaks the interpreter
        k0 = k_start + tile * BLOCK_K
        word_rows = k0 // PER_WORD + tl.arange(0, ROWS)
        mask_r = word_rows * PER_WORD < K
        mask_w = mask_r[:, None] & mask_n[None, :]
        words = tl.load(qweight_ptr + word_rows[:, None] * N + offs_n[None, :], mask=mask_w, other=0)
        part = tl.zeros((BLOCK_M, ROWS, BLOCK_N), dtype=tl.float32)  # sum over codes j of x * q
        x_sum = tl.zeros((BLOCK_M, ROWS), dtype=tl.float32)
        for j in tl.static_range(PER_WORD):
            k = word_rows * PER_WORD + j  # the input row of code j of every word
            if HAS_PERM:
                x_col = tl.load(perm_ptr + k, mask=mask_r, other=0)
            else:
                x_col = k
            xj = tl.load(x_rows + x_col[None, :], mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            xj = xj.to(tl.float32)
            w = codes_as_float(words, j * BITS, BITS)
            if HAS_GIDX:  # each row its own group: dequantize every code
                g = tl.load(g_idx_ptr + k, mask=mask_r, other=0)
                s, z = group_params(scales_ptr, qzeros_ptr, g, offs_n, mask_w, N, BITS, ZERO)
                acc += xj[:, :, None] * ((w - z) * s)[None, :, :]
            else:
                part += xj[:, :, None] * w[None, :, :]
                x_sum += xj
        if not HAS_GIDX:
            if ONE_GROUP:  # k0 < K: a real group (the last split's tiles may lie past K)
                g = row_groups(tl.zeros((1,), dtype=tl.int32) + k0, GROUP_SIZE)
                mask_g = (mask_n & (k0 < K))[None, :]
            else:  # groups change between word rows (a group is a whole number of words)
                g = row_groups(word_rows * PER_WORD, GROUP_SIZE)
                mask_g = mask_w
            s, z = group_params(scales_ptr, qzeros_ptr, g, offs_n, mask_g, N, BITS, ZERO)  # [1|ROWS, BN]
            acc += s[None, :, :] * (part - z[None, :, :] * x_sum[:, :, None])
    store_tile(
        out_ptr + pid_s * stride_os,
        tl.sum(acc, axis=1),
        bias_ptr,
        offs_m,
        offs_n,
        M,
        N,
        stride_om,
        HAS_BIAS,
        INTERPRET,
    )


def gemv(
    x: torch.Tensor, w: QuantWeight, bias: torch.Tensor | None = None, config: GemvConfig | None = None
) -> torch.Tensor:
    """y [M, N] = x [M, K] @ dequant(w) (+ bias) for M <= MAX_M, in x's dtype."""
    check_inputs(x, w, bias, _gemv_kernel)
    m, n = x.shape[0], w.out_features
    if not 1 <= m <= MAX_M:
        raise ValueError(f"gemv handles 1 to {MAX_M} rows of x, got M={m}; use gemm() or quant_matmul()")
    cfg = config or default_gemv_config(m, n, w.in_features, w.bits, sm_count=1)
    if cfg.block_k % (32 // w.bits) or cfg.block_k & (cfg.block_k - 1):
        raise ValueError(f"block_k={cfg.block_k} must be a power of two holding whole {w.bits}-bit words")
    per_split, split = split_rows(w.in_features, cfg.block_k, cfg.split_k)
    out, stride_os = partial_buffer(m, n, split, x.dtype, x.device)
    block_m = block_m_for(m)
    grid = (triton.cdiv(n, cfg.block_n), split, triton.cdiv(m, block_m))
    _gemv_kernel[grid](
        *pointer_args(x, w, bias),
        out,
        m,
        n,
        w.in_features,
        per_split // cfg.block_k,
        x.stride(0),
        n,
        stride_os,
        **quant_flags(w, bias is not None and split == 1),
        ONE_GROUP=one_group_per_tile(w, cfg.block_k),
        INTERPRET=interpreting(_gemv_kernel),
        BLOCK_M=block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out if split == 1 else splitk_reduce(out, bias, x.dtype)
