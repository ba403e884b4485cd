"""Uniform quantization grids: settings, scale/zero per group, round-to-nearest (RTN).

A group of weights x is stored as integer codes q in [0, maxq] (maxq = 2^bits - 1) with
one fp16 scale and one integer zero per output row: x ~ scale * (q - zero). GPTQ
(``qmodel_runtime.gptq``) and RTN share everything here, so both produce identical
packing and a checkpoint reads the same whatever method made it.

Two rules of the GPTQ v1 checkpoint (``qmodel_kernels.layout``) are enforced at the source:
- scales are rounded to fp16 *before* the codes are chosen, so the quantizer's dequantized
  weights equal the checkpoint's bit for bit;
- an asymmetric zero is clamped to [1, maxq] while the group's grid is computed (never 0:
  loaders disagree on a stored zero-1 of -1), and GPTQ's error feedback absorbs the change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qmodel_kernels import layout

METHODS = ("gptq", "rtn")
# The smallest normal fp16 (2^-14): a smaller scale would lose precision once stored as fp16.
# Only groups whose range is below ~1e-4 * maxq hit it, and their codes then all round to zero.
_MIN_SCALE = 2.0**-14


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize every Linear of the decoder layers (the CRD's spec.quantization)."""

    bits: int = 4
    group_size: int = 128  # -1: one group per output row
    sym: bool = True
    desc_act: bool = False  # act-order: quantize columns by decreasing Hessian diagonal
    static_groups: bool = False  # with act-order: group grids fixed up front in natural order
    damp_percent: float = 0.01  # of the mean Hessian diagonal, raised automatically if needed
    true_sequential: bool = True  # q/k/v, then o, then gate/up, then down, each on quantized inputs
    method: str = "gptq"
    block_size: int = 128  # GPTQ's lazy-batch block (the paper's B = 128)
    clip_steps: int = 0  # >0: search scale shrinking over this many steps of 1% (MSE, norm 2.4)

    def __post_init__(self) -> None:
        layout.check_bits(self.bits)
        if self.group_size != -1 and self.group_size < 1:
            raise ValueError(f"group_size must be -1 (per channel) or at least 1, got {self.group_size}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not 0.0 <= self.damp_percent <= 1.0:
            raise ValueError(f"damp_percent must lie in [0, 1], got {self.damp_percent}")
        if self.block_size < 1 or not 0 <= self.clip_steps < 100:
            raise ValueError("block_size must be >= 1 and clip_steps within [0, 100)")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def group_width(self, in_features: int) -> int:
        """Columns per group: the whole row for group_size -1."""
        return in_features if self.group_size == -1 else self.group_size

    def hf_quantization_config(self) -> dict:
        """The ``quantization_config`` that Hugging Face, optimum and vLLM read (GPTQ v1)."""
        return {
            "quant_method": "gptq",
            "bits": self.bits,
            "group_size": self.group_size,
            "desc_act": self.desc_act,
            "sym": self.sym,
            "static_groups": self.static_groups,
            "true_sequential": self.true_sequential,
            "damp_percent": self.damp_percent,
            "checkpoint_format": "gptq",
        }


# The clipping search the quantize Job runs with GPTQ (RTN stays the plain min/max baseline):
# measured on SmolLM2-135M, 4-bit g64 asym act-order, perplexity 16.75 -> 16.42 with it; 3-bit
# 32.23 -> 22.60 (fp32 14.09; runtime/benchmarks/README.md). Each group start tries 21 grids.
GPTQ_CLIP_STEPS = 20

# --------------------------------------------------------------------------- the grid


def codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Nearest grid point of x as integer codes in [0, maxq] (float tensor)."""
    return torch.clamp(torch.round(x / scale) + zero, 0, maxq)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """x rounded to the grid scale * (q - zero): the GPTQ paper's quant(.)."""
    q = codes(x, scale, zero, maxq)
    return scale * (q - zero)


def _minmax_grid(xmin: torch.Tensor, xmax: torch.Tensor, maxq: int, sym: bool):
    """Scale/zero covering [xmin, xmax] (xmin <= 0 <= xmax) per row."""
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)  # an all-zero row: any grid works, keep it finite
    xmin, xmax = torch.where(empty, -1.0, xmin), torch.where(empty, 1.0, xmax)
    scale = ((xmax - xmin) / maxq).clamp(min=_MIN_SCALE).half().float()
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-xmin / scale).clamp(1, maxq)  # never 0: see the module docstring
    return scale, zero


def grid_params(x: torch.Tensor, bits: int, sym: bool, clip_steps: int = 0):
    """Per-row scale and zero for a group x [rows, cols] -> (scale [rows], zero [rows]).

    Min/max of each row (0 always inside the range). With ``clip_steps`` > 0 the range is
    also shrunk by 1%, 2%, ... and each row keeps the grid with the least |x - q|^2.4, the
    clipping search of the GPTQ reference code (outliers traded for resolution).
    """
    maxq = 2**bits - 1
    x = x.float()
    xmin = x.min(dim=1).values.clamp(max=0)
    xmax = x.max(dim=1).values.clamp(min=0)
    scale, zero = _minmax_grid(xmin, xmax, maxq, sym)
    if clip_steps:
        best = _grid_error(x, scale, zero, maxq)
        for step in range(1, clip_steps + 1):
            shrink = 1.0 - step / 100
            s, z = _minmax_grid(xmin * shrink, xmax * shrink, maxq, sym)
            err = _grid_error(x, s, z, maxq)
            better = err < best
            best = torch.where(better, err, best)
            scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
    return scale, zero


def _grid_error(x, scale, zero, maxq):
    q = quantize(x, scale[:, None], zero[:, None], maxq)
    return (q - x).abs().pow(2.4).sum(dim=1)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class QuantizedWeight:
    """One quantized weight matrix in nn.Linear orientation (rows = output features)."""

    codes: torch.Tensor  # uint8 [N, K]
    scales: torch.Tensor  # fp32 [G, N], every value exactly representable in fp16
    zeros: torch.Tensor  # int32 [G, N], in [1, maxq]
    g_idx: torch.Tensor  # int32 [K]: the group of each input column
    bits: int
    group_size: int

    def dequantize(self) -> torch.Tensor:
        """W [N, K] fp32 = scales[g] * (codes - zeros[g]), exactly as a GPTQ loader computes it."""
        g = self.g_idx.long()
        q = self.codes.float() - self.zeros.t()[:, g].float()
        return self.scales.t()[:, g] * q

    def rows(self, start: int, stop: int) -> QuantizedWeight:
        """Output rows [start, stop): one Linear out of a fused q/k/v or gate/up result."""
        return QuantizedWeight(
            self.codes[start:stop],
            self.scales[:, start:stop],
            self.zeros[:, start:stop],
            self.g_idx.clone(),  # safetensors refuses tensors that share memory
            self.bits,
            self.group_size,
        )

    def pack(self) -> layout.PackedWeight:
        """The checkpoint tensors (qweight/qzeros/scales/g_idx) through the layout module."""
        return layout.pack(
            self.codes.t().contiguous().cpu(),
            self.zeros.cpu(),
            self.scales.cpu(),
            self.g_idx.cpu(),
            self.bits,
            self.group_size,
        )


def rtn(weight: torch.Tensor, cfg: QuantConfig) -> QuantizedWeight:
    """Round-to-nearest baseline: each group's own min/max grid, no error feedback."""
    rows, cols = weight.shape
    width = cfg.group_width(cols)
    w = weight.float()
    q = torch.empty(rows, cols, dtype=torch.uint8, device=w.device)
    scales, zeros = [], []
    for start in range(0, cols, width):
        group = w[:, start : start + width]
        scale, zero = grid_params(group, cfg.bits, cfg.sym, cfg.clip_steps)
        q[:, start : start + width] = codes(group, scale[:, None], zero[:, None], cfg.maxq).to(torch.uint8)
        scales.append(scale)
        zeros.append(zero)
    g_idx = layout.default_g_idx(cols, cfg.group_size, device=w.device)
    return QuantizedWeight(
        q, torch.stack(scales), torch.stack(zeros).to(torch.int32), g_idx, cfg.bits, cfg.group_size
    )
