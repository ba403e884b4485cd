"""The kernel-ready form of one packed layer (built once at load), input checks, the reference.

``prepare(packed)`` turns a checkpoint layer (``layout.PackedWeight``) into a ``QuantWeight``:
the same qweight/qzeros/scales tensors, plus what the kernels need to know about them.

- Act-order layers (g_idx not k // group_size) are by default *reordered* once: rows are
  sorted by group (``layout.permute_rows``) so every group is contiguous again, and the
  kernels read x through ``perm`` (y = x[:, perm] @ W[perm]). The alternative keeps the
  checkpoint rows and reads each row's group from ``g_idx`` inside the kernel; that path
  also serves layers whose groups cannot be made contiguous (group sizes that split a
  packed word, irregular g_idx). kernels/benchmarks/bench_matmul.py measures both.
- Symmetric layers (every zero 2^(bits-1), e.g. 4-bit qzeros words 0x77777777) are marked
  so the kernels use the constant and never read qzeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qmodel_kernels import layout

KERNEL_BITS = (2, 4, 8)  # codes that never straddle a 32-bit word; 3-bit uses the PyTorch path
ACTIVATION_DTYPES = (torch.float16, torch.bfloat16)
ACT_ORDER_MODES = ("reorder", "g_idx")


@dataclass(frozen=True)
class QuantWeight:
    """One layer as the kernels read it: y[M, N] = x[M, K] @ dequant(W)[K, N]."""

    qweight: torch.Tensor  # int32 [K*bits/32, N], rows in kernel order
    qzeros: torch.Tensor  # int32 [G, N*bits/32], zero - 1 (GPTQ v1)
    scales: torch.Tensor  # fp16 [G, N]
    g_idx: torch.Tensor | None  # int32 [K]: per-row group, for the g_idx-aware path only
    perm: torch.Tensor | None  # int32 [K]: kernel row i reads x[:, perm[i]] (reordered act-order)
    bits: int
    group_size: int  # -1: one group per output channel
    zero: int  # 0: read zeros from qzeros; else every zero equals this (symmetric)

    @property
    def in_features(self) -> int:
        return self.qweight.shape[0] * 32 // self.bits

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def packed(self) -> layout.PackedWeight:
        """Back to checkpoint form, rows in kernel order (equal to the checkpoint without perm)."""
        g_idx = self.g_idx
        if g_idx is None:
            g_idx = layout.default_g_idx(self.in_features, self.group_size, self.device)
        return layout.PackedWeight(self.qweight, self.qzeros, self.scales, g_idx, self.bits, self.group_size)


def _contiguous_groups_possible(pw: layout.PackedWeight) -> bool:
    # A kernel tile reads whole packed words, so a group must not start inside one.
    return pw.group_size == -1 or pw.group_size % (32 // pw.bits) == 0


def prepare(pw: layout.PackedWeight, act_order: str = "reorder") -> QuantWeight:
    """Checkpoint layer -> kernel form; for act-order layers this copies qweight once."""
    if pw.bits not in KERNEL_BITS:
        raise ValueError(
            f"the Triton kernels handle {KERNEL_BITS}-bit layers, not {pw.bits}-bit; "
            "use layout.dequantize_ref for this layer (Int4Linear does so by itself)"
        )
    if act_order not in ACT_ORDER_MODES:
        raise ValueError(f"act_order must be one of {ACT_ORDER_MODES}, got {act_order!r}")
    zero = layout.symmetric_zero(pw) or 0
    contiguous_ok = _contiguous_groups_possible(pw)
    if contiguous_ok and layout.is_default_g_idx(pw.g_idx, pw.group_size):
        return _quant_weight(pw, None, None, zero)
    if contiguous_ok and act_order == "reorder":
        perm = layout.act_order_permutation(pw.g_idx)
        sorted_pw = layout.permute_rows(pw, perm)
        if layout.is_default_g_idx(sorted_pw.g_idx, pw.group_size):
            return _quant_weight(sorted_pw, None, perm.to(torch.int32), zero)
    return _quant_weight(pw, pw.g_idx.to(torch.int32).contiguous(), None, zero)


def _quant_weight(pw, g_idx, perm, zero) -> QuantWeight:
    return QuantWeight(
        qweight=pw.qweight.contiguous(),
        qzeros=pw.qzeros.contiguous(),
        scales=pw.scales.contiguous(),
        g_idx=g_idx,
        perm=perm if perm is None else perm.contiguous(),
        bits=pw.bits,
        group_size=pw.group_size,
        zero=zero,
    )


# --------------------------------------------------------------------------- input checks


def interpreting(kernel) -> bool:
    """True when ``kernel`` runs in Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    from triton.runtime.interpreter import InterpretedFunction  # here: loading a model needs no triton

    return isinstance(kernel, InterpretedFunction)


def check_inputs(x: torch.Tensor, w: QuantWeight, bias: torch.Tensor | None, kernel) -> None:
    """Shapes, dtypes, devices and contiguity, with messages that say what to change."""
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}; flatten leading dims first")
    if x.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"x must be float16 or bfloat16 for the int{w.bits} kernels, got {x.dtype}")
    if x.shape[1] != w.in_features:
        raise ValueError(f"x has {x.shape[1]} features but the layer expects in_features={w.in_features}")
    if x.stride(1) != 1:
        raise ValueError("x must be contiguous along its last dimension; pass x.contiguous()")
    if x.device != w.device:
        raise ValueError(f"x is on {x.device} but the layer's weights are on {w.device}; move one of them")
    if x.device.type != "cuda" and not interpreting(kernel):
        raise ValueError(
            f"x is on {x.device}: the Triton kernels need a CUDA device (or TRITON_INTERPRET=1 set "
            "before qmodel_kernels is imported, for testing); Int4Linear uses the PyTorch path on CPU"
        )
    for name, t, dtype in (
        ("qweight", w.qweight, torch.int32),
        ("qzeros", w.qzeros, torch.int32),
        ("scales", w.scales, torch.float16),
    ):
        if t.dtype != dtype or not t.is_contiguous() or t.device != w.device:
            raise ValueError(
                f"{name} must be a contiguous {dtype} tensor on {w.device}; build it with prepare()"
            )
    if bias is not None and (bias.shape != (w.out_features,) or bias.device != w.device):
        raise ValueError(
            f"bias must have shape [{w.out_features}] on {w.device}, got {tuple(bias.shape)} on {bias.device}"
        )


def pointer_args(x, w: QuantWeight, bias):
    """The kernels' tensor arguments; absent optional tensors become an unused placeholder."""
    unused = w.qweight  # never read: the matching HAS_* flag is False
    return (
        x,
        w.qweight,
        w.scales,
        w.qzeros,
        unused if w.g_idx is None else w.g_idx,
        unused if w.perm is None else w.perm,
        unused if bias is None else bias,
    )


def quant_flags(w: QuantWeight, has_bias: bool) -> dict:
    """The compile-time flags both kernels share."""
    return {
        "BITS": w.bits,
        "GROUP_SIZE": w.group_size,
        "ZERO": w.zero,
        "HAS_GIDX": w.g_idx is not None,
        "HAS_PERM": w.perm is not None,
        "HAS_BIAS": has_bias,
    }


def one_group_per_tile(w: QuantWeight, block_k: int) -> bool:
    """A K tile of ``block_k`` rows never crosses a group boundary (one scale row per tile)."""
    if w.g_idx is not None:
        return False
    return w.group_size == -1 or w.group_size % block_k == 0


# --------------------------------------------------------------------------- the reference


def matmul_ref(
    x: torch.Tensor, w: QuantWeight, bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """What every kernel computes, in ``dtype`` (fp64 for tests): x[..., perm] @ dequant(W) + bias."""
    weight = layout.dequantize_ref(w.packed(), dtype)
    if w.perm is not None:
        x = x[..., w.perm.long()]
    y = x.to(dtype) @ weight
    return y if bias is None else y + bias.to(dtype)
