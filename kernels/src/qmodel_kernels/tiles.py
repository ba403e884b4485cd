"""Triton device functions shared by the GEMV and GEMM kernels (not launched on their own).

Conventions: W is [K, N]; ``qweight`` holds 32 // BITS codes per int32 word along K, low
bits first; ``qzeros`` holds zero - 1 packed the same way along N (GPTQ v1); ``scales``
is [G, N]. Every helper takes masks, so tiles that hang over an edge read zeros.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def row_groups(k, GROUP_SIZE: tl.constexpr):
    """Group of each input row k (no act-order): k // GROUP_SIZE, or 0 for per-channel (-1)."""
    if GROUP_SIZE == -1:
        g = k * 0
    else:
        g = k // GROUP_SIZE
    return g


@triton.jit
def codes_as_float(words, shift, BITS: tl.constexpr):
    """The codes ``(words >> shift) & (2^BITS - 1)`` as fp32, without an int-to-float convert.

    OR-ing a code into the mantissa of 2^23 (bits 0x4B000000) gives the float 2^23 + code
    exactly; subtracting 2^23 leaves the code. That is a shift, one LOP3 and an FADD. The
    convert instruction (I2F) runs at 16 per clock per SM on sm_80/sm_90 (CUDA programming
    guide, throughput table), an eighth of fp32 adds: at batch 1 it alone would need
    50.3M / (132 SMs x 16 x 1.98 GHz) = 12 us for a 4096 x 12288 layer on an H100, above
    that layer's 8.9 us memory floor.
    """
    magic = ((words >> shift) & ((1 << BITS) - 1)) | 0x4B000000
    return magic.to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def group_params(
    scales_ptr,
    qzeros_ptr,
    g,  # int [G'] groups to read (one per tile row, or a single group)
    offs_n,  # int [BLOCK_N] output columns
    mask,  # bool [G', BLOCK_N]
    N,
    BITS: tl.constexpr,
    ZERO: tl.constexpr,  # 0: read qzeros; else the zero of every group (symmetric)
):
    """Scale and zero of groups ``g`` for columns ``offs_n``, as fp32 [G', BLOCK_N] tiles."""
    s = tl.load(scales_ptr + g[:, None] * N + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    if ZERO == 0:
        PER_WORD: tl.constexpr = 32 // BITS
        zero_words = tl.load(
            qzeros_ptr + g[:, None] * (N // PER_WORD) + (offs_n // PER_WORD)[None, :], mask=mask, other=0
        )
        shift = ((offs_n % PER_WORD) * BITS)[None, :]
        z = (((zero_words >> shift) & ((1 << BITS) - 1)) + 1).to(tl.float32)  # v1 stores zero - 1
    else:
        z = tl.zeros_like(s) + ZERO
    return s, z


@triton.jit
def round_to(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 -> ``dtype``, rounding to nearest even as the GPU's conversion does.

    Triton 3.6's CPU interpreter truncates fp32 -> bf16 (a relative error of up to 2^-7,
    twice what RTNE allows); there the rounding is done on the bits: add 0x7FFF plus the
    lowest kept bit, keep the high 16 bits (finite values only, as here).
    """
    if INTERPRET and dtype == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        y = (bits >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(dtype)
    return y


@triton.jit
def store_tile(
    out_ptr,
    acc,  # fp32 [BLOCK_M, BLOCK_N]
    bias_ptr,
    offs_m,
    offs_n,
    M,
    N,
    stride_om,
    HAS_BIAS: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """acc (+ bias) -> out in out's dtype, masked to the [M, N] edge."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(ptrs, round_to(acc, out_ptr.dtype.element_ty, INTERPRET), mask=mask)
