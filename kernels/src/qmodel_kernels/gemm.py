"""Batched products (M > 8, up to prefill's thousands): tiled GEMM on dequantized weight tiles.

Each step loads an x tile [BLOCK_M, BLOCK_K] and the packed words under a W tile
[BLOCK_K, BLOCK_N], dequantizes the tile in registers (shift, mask, (q - z) * s in fp32,
rounded once to the activation dtype) and feeds it to ``tl.dot`` with fp32 accumulation;
``num_stages`` lets Triton pipeline the next tiles' loads behind the current dot.
Compared with fp16 cuBLAS this reads a quarter of the weight bytes and pays the
dequantization once per W tile, shared by BLOCK_M rows of x, so it wins while the
problem is memory-bound (M up to a few hundred on an H100) and costs ALU time after.
CTAs are ordered in groups of GROUP_M row-tiles so that CTAs running together read the
same weight columns from L2. Split-K serves M of 16-64 where M x N tiles are too few.
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
from qmodel_kernels.tiles import codes_as_float, group_params, round_to, row_groups, store_tile


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


def _block_ms(m: int) -> tuple[int, ...]:
    if m <= 16:
        return (16,)
    if m <= 32:
        return (16, 32)
    if m <= 64:
        return (32, 64)
    if m <= 128:
        return (64, 128)
    return (64, 128, 256)  # 256: each weight tile dequantized once for M = 256 (register-heavy)


def _split(m_tiles_n_tiles: int, k: int, block_k: int, sm_count: int) -> int:
    split = 1
    while m_tiles_n_tiles * split < sm_count and split * 2 <= min(8, k // block_k):
        split *= 2
    return split


# (block_n, block_k, warps, stages): 64-256 wide tiles, deeper pipelines for thinner K steps.
_SHAPES = (
    (64, 64, 4, 4),
    (128, 64, 4, 4),
    (128, 32, 4, 4),
    (256, 64, 8, 3),
    (128, 128, 8, 3),
    (64, 128, 4, 3),
)


def gemm_configs(m: int, n: int, k: int, sm_count: int) -> list[GemmConfig]:
    """Candidates the tuner times for one shape bucket."""
    out = []
    for block_m in _block_ms(m):
        for block_n, block_k, warps, stages in _SHAPES:
            if block_m * block_n > 32768:  # a 128 x 256 fp32 accumulator is 128 registers at 8 warps
                continue
            warps = 8 if block_m * block_n >= 16384 else warps
            tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
            splits = {1, _split(tiles, k, block_k, sm_count)}
            for split in sorted(splits):
                out.append(GemmConfig(block_m, block_n, block_k, split, 8, warps, stages))
    return out


def default_gemm_config(m: int, n: int, k: int, sm_count: int) -> GemmConfig:
    """Untuned choice: the tile the tuner most often lands near for Llama shapes."""
    block_m = min(128, max(16, triton.next_power_of_2(m)))
    block_n = 128 if block_m <= 64 else 64
    split = _split(triton.cdiv(m, block_m) * triton.cdiv(n, block_n), k, 64, sm_count)
    return GemmConfig(block_m, block_n, 64, split, 8, 4, 3)


@triton.jit
def _gemm_kernel(
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
    INTERPRET: tl.constexpr,  # running in Triton's CPU interpreter (works around its bf16 bugs)
    # tiling
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    PER_WORD: tl.constexpr = 32 // BITS
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    # grouped order: GROUP_M consecutive CTAs share one column tile of W
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    k_start = pid_s * tiles_per_split * BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tile in range(tiles_per_split):  # a bound from program_id breaks the interpreter
        k0 = k_start + tile * BLOCK_K
        k = k0 + tl.arange(0, BLOCK_K)
        mask_k = k < K
        if HAS_PERM:
            x_col = tl.load(perm_ptr + k, mask=mask_k, other=0)
        else:
            x_col = k
        a = tl.load(x_rows + x_col[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        mask_w = mask_k[:, None] & mask_n[None, :]
        # PER_WORD rows of the tile read the same word (L1 hits); each keeps its own bits
        words = tl.load(qweight_ptr + (k // PER_WORD)[:, None] * N + offs_n[None, :], mask=mask_w, other=0)
        q = codes_as_float(words, ((k % PER_WORD) * BITS)[:, None], BITS)
        if HAS_GIDX:
            g = tl.load(g_idx_ptr + k, mask=mask_k, other=0)
            s, z = group_params(scales_ptr, qzeros_ptr, g, offs_n, mask_w, N, BITS, ZERO)
        elif ONE_GROUP:
            g = row_groups(tl.zeros((1,), dtype=tl.int32) + k0, GROUP_SIZE)  # k0 < K: a real group
            s, z = group_params(
                scales_ptr, qzeros_ptr, g, offs_n, (mask_n & (k0 < K))[None, :], N, BITS, ZERO
            )
        else:
            s, z = group_params(
                scales_ptr, qzeros_ptr, row_groups(k, GROUP_SIZE), offs_n, mask_w, N, BITS, ZERO
            )
        b = round_to((q - z) * s, a.dtype, INTERPRET)
        if INTERPRET:  # Triton 3.6's interpreter multiplies bf16 bit patterns as integers in tl.dot
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
        else:
            acc = tl.dot(a, b, acc)
    store_tile(
        out_ptr + pid_s * stride_os, acc, bias_ptr, offs_m, offs_n, M, N, stride_om, HAS_BIAS, INTERPRET
    )


def gemm(
    x: torch.Tensor, w: QuantWeight, bias: torch.Tensor | None = None, config: GemmConfig | None = None
) -> torch.Tensor:
    """y [M, N] = x [M, K] @ dequant(w) (+ bias), any M >= 1, in x's dtype."""
    check_inputs(x, w, bias, _gemm_kernel)
    m, n, k = x.shape[0], w.out_features, w.in_features
    if m == 0:
        return torch.empty(0, n, dtype=x.dtype, device=x.device)
    cfg = config or default_gemm_config(m, n, k, sm_count=1)
    if cfg.block_m < 16 or cfg.block_k < 16 or cfg.block_n < 16 or cfg.block_k & (cfg.block_k - 1):
        raise ValueError(f"GEMM tiles must be powers of two of at least 16 (tl.dot), got {cfg}")
    per, split = split_rows(k, cfg.block_k, cfg.split_k)
    out, stride_os = partial_buffer(m, n, split, x.dtype, x.device)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), split)
    _gemm_kernel[grid](
        *pointer_args(x, w, bias),
        out,
        m,
        n,
        k,
        per // cfg.block_k,
        x.stride(0),
        n,
        stride_os,
        **quant_flags(w, bias is not None and split == 1),
        ONE_GROUP=one_group_per_tile(w, cfg.block_k),
        INTERPRET=interpreting(_gemm_kernel),
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out if split == 1 else splitk_reduce(out, bias, x.dtype)
