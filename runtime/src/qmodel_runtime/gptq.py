"""GPTQ (Frantar et al. 2022, "Accurate Post-Training Quantization for Generative
Pre-trained Transformers"), written to be read beside the paper's Algorithm 1.

For a Linear y = W x with calibration inputs X, GPTQ quantizes W column by column and
after each column spreads its rounding error over the columns not yet quantized, weighted
by the inverse Hessian H^-1 of the layer-wise loss ||W X - Q X||^2 (H = 2 X X^T):

- H is accumulated in fp32 over every calibration token (``GPTQ.add_batch``);
- dead columns (an input that is always 0: H[i, i] = 0) are zeroed and skipped;
- H is dampened by ``damp_percent`` of its mean diagonal; when the Cholesky
  factorization still fails the damping doubles and it retries;
- the column sweep uses the upper Cholesky factor of H^-1 (numerically stable) and
  works in blocks of B = 128 columns: errors inside a block are applied column by column,
  to the rest of W once per block ("lazy batch updates");
- act-order (desc_act) quantizes columns by decreasing H[i, i]; group grids then follow
  that order, or are fixed up front in natural order (static groups).

Math names (W, H, Hinv, Q, Err) are kept as in the paper inside this module only.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from qmodel_runtime.quantizer import QuantConfig, QuantizedWeight, codes, grid_params

log = logging.getLogger(__name__)


class HessianError(RuntimeError):
    """H cannot be factorized (NaN/inf activations, or singular even at 100% damping)."""


@dataclass(frozen=True)
class GPTQStats:
    loss: float  # sum over rows of (w - q)^2 / Hinv[i, i]^2 / 2: the paper's layer-wise error
    damp_percent: float  # the damping that the Cholesky factorization finally accepted
    dead_columns: int
    tokens: int


@contextmanager
def cpu_threads(n: int, device: torch.device):
    """Run CPU tensor ops on ``n`` threads. The column sweep's ops are small (1536 x 128): on 2
    shared cores, 1 thread quantized a 1536 x 576 weight in 1.43 s, 2 threads in 2.24 s."""
    if device.type != "cpu":
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@contextmanager
def tf32_disabled():
    """TF32 matmuls round inputs to 10 mantissa bits; GPTQ's Hessian and updates need fp32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class GPTQ:
    """The Hessian of one Linear's inputs, then the column sweep that quantizes its weight."""

    def __init__(self, columns: int, device: torch.device | str):
        self.columns = columns
        self.H = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.nsamples = 0  # tokens seen

    def add_batch(self, inp: torch.Tensor) -> None:
        """Fold inputs [..., K] into H = 2/n sum x x^T (a running mean, so H stays O(1))."""
        x = inp.reshape(-1, self.columns).to(self.H.device)
        n = x.shape[0]
        self.H *= self.nsamples / (self.nsamples + n)
        self.nsamples += n
        self.H.add_(_xtx(x), alpha=2 / self.nsamples)

    @torch.no_grad()
    def quantize(
        self, weight: torch.Tensor, cfg: QuantConfig, fused: bool | None = None
    ) -> tuple[QuantizedWeight, GPTQStats]:
        """Quantize ``weight`` [N, K] (any rows sharing these inputs, e.g. fused q/k/v).
        ``fused``: the column loop as one Triton kernel per block (default: on CUDA when the
        settings allow it, see ``gptq_triton.supports``), else the PyTorch loop."""
        if self.nsamples == 0:
            raise HessianError("no calibration inputs reached this layer")
        with tf32_disabled():
            return self._quantize(weight, cfg, fused)

    def free(self) -> None:
        self.H = None

    def _quantize(self, weight: torch.Tensor, cfg: QuantConfig, fused: bool | None):
        W = weight.detach().to(self.H.device, torch.float32).clone()
        H = self.H
        self.H = None  # consumed in place below
        if not torch.isfinite(H).all():
            raise HessianError("the Hessian holds NaN/inf: calibration activations overflowed")
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0

        grids = _static_grids(W, cfg) if cfg.static_groups and cfg.group_size != -1 else None
        perm = torch.argsort(torch.diag(H), descending=True) if cfg.desc_act else None
        if perm is not None:
            W, H = W[:, perm], H[perm][:, perm]

        Hinv, damp = inverse_cholesky(H, cfg.damp_percent)
        del H
        sweep = _Sweep(W, Hinv, cfg, perm, grids)
        if fused is None:
            fused = W.is_cuda and _fusable(cfg, sweep.width)
        with cpu_threads(1, W.device):
            loss = _run_fused_or_fall_back(sweep) if fused else sweep.run()
        stats = GPTQStats(loss, damp, int(dead.sum()), self.nsamples)
        return sweep.result(), stats


def _xtx(x: torch.Tensor) -> torch.Tensor:
    """x^T x in fp32. Half-precision inputs on a GPU go through tensor cores with fp32 output:
    products of fp16/bf16 values are exact in fp32 and the accumulation is fp32, so this is the
    fp32 Hessian (up to summation order) at tensor-core speed, about 10x the fp32 matmul's."""
    if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
        return torch.mm(x.t(), x, out_dtype=torch.float32)
    x = x.float()
    with tf32_disabled():
        return x.t() @ x


def inverse_cholesky(H: torch.Tensor, damp_percent: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, raising damp until it works."""
    mean_diag = torch.mean(torch.diag(H))
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    damp = damp_percent
    while True:
        L, info = torch.linalg.cholesky_ex(H + damp * mean_diag * eye)
        if info == 0:
            # H^-1 by solving against I: on CPU torch.cholesky_inverse took 2.0 s for K=576,
            # cholesky_solve 0.08 s (same result up to rounding)
            Hinv, info = torch.linalg.cholesky_ex(torch.cholesky_solve(eye, L), upper=True)
            if info == 0 and torch.isfinite(Hinv).all():
                return Hinv, damp
        if damp >= 1.0:
            raise HessianError("the Hessian is not positive definite even with damping of 100% of its mean")
        # Doubling reaches 100% from the default 1% in 7 tries; each is one K x K factorization.
        next_damp = min(max(2 * damp, 0.01), 1.0)
        log.warning("Cholesky failed at damp %.4f of the mean diagonal; retrying at %.4f", damp, next_damp)
        damp = next_damp


def _run_fused_or_fall_back(sweep: _Sweep) -> float:
    """The fused loop; if its kernel cannot be built here (it fails at the first block, before
    anything is updated), the PyTorch loop with a warning rather than a failed Job."""
    from qmodel_runtime import gptq_triton

    try:
        return sweep.run_fused()
    except gptq_triton.KernelUnavailable as exc:
        log.warning("%s; using the PyTorch column loop", exc)
        return sweep.run()


def _fusable(cfg: QuantConfig, width: int) -> bool:
    from qmodel_runtime import gptq_triton  # imported on first use: CPU runs never need Triton

    return gptq_triton.supports(cfg, width)


def _static_grids(W: torch.Tensor, cfg: QuantConfig):
    """Static groups: each natural-order group's grid from the weights before any update."""
    width = cfg.group_width(W.shape[1])
    return [
        grid_params(W[:, s : s + width], cfg.bits, cfg.sym, cfg.clip_steps)
        for s in range(0, W.shape[1], width)
    ]


class _Sweep:
    """Algorithm 1's loop over column blocks; W and Hinv are in quantization (perm) order."""

    def __init__(self, W, Hinv, cfg: QuantConfig, perm, grids):
        self.W, self.Hinv, self.cfg, self.perm = W, Hinv, cfg, perm
        rows, cols = W.shape
        self.width = cfg.group_width(cols)
        self.codes = torch.empty(rows, cols, dtype=torch.uint8, device=W.device)
        # g_idx in quantization order: a column's group is fixed by its position, or (static
        # groups) by its natural index.
        order = torch.arange(cols, device=W.device) if perm is None else perm
        position = torch.arange(cols, device=W.device)
        self.g_idx = ((position if grids is None else order) // self.width).to(torch.int32)
        self.static = grids is not None
        if self.static:
            self.scales = torch.stack([s for s, _ in grids])
            self.zeros = torch.stack([z for _, z in grids])
            self.column_group = self.g_idx.tolist()  # one host copy, not a sync per column
        else:
            groups = math.ceil(cols / self.width)
            self.scales = torch.empty(groups, rows, dtype=torch.float32, device=W.device)
            self.zeros = torch.empty(groups, rows, dtype=torch.float32, device=W.device)
        self.scale = self.zero = None

    def run(self) -> float:
        W, Hinv, cols, maxq = self.W, self.Hinv, self.W.shape[1], self.cfg.maxq
        loss = torch.zeros((), dtype=torch.float32, device=W.device)
        for i1 in range(0, cols, self.cfg.block_size):
            i2 = min(i1 + self.cfg.block_size, cols)
            W1 = W[:, i1:i2].clone()
            Q1 = torch.empty_like(W1)  # codes of this block
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                self._select_grid(i1, i, i2, W1, Err1)
                w = W1[:, i]
                Q1[:, i] = codes(w, self.scale, self.zero, maxq)
                err = (w - self.scale * (Q1[:, i] - self.zero)) / Hinv1[i, i]
                # a rank-1 update as addmm: torch's CPU addr_ is ~100x slower here (12.7 ms vs
                # 0.1 ms for 1536 x 128 on 2 cores)
                W1[:, i:].addmm_(err[:, None], Hinv1[i : i + 1, i:], alpha=-1)
                Err1[:, i] = err
            self.codes[:, i1:i2] = Q1.to(torch.uint8)
            loss += torch.sum(Err1 * Err1) / 2
            W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1)
        return float(loss)

    def run_fused(self) -> float:
        """``run`` with each block's column loop in one Triton kernel (``gptq_triton``)."""
        from qmodel_runtime import gptq_triton

        W, cols, width = self.W, self.W.shape[1], self.width
        Hinv = self.Hinv.contiguous()  # the kernel reads rows of it; cholesky may return a transpose
        loss = torch.zeros((), dtype=torch.float32, device=W.device)
        in_block = width < self.cfg.block_size  # groups start inside blocks: the kernel finds grids
        for i1 in range(0, cols, self.cfg.block_size):
            i2 = min(i1 + self.cfg.block_size, cols)
            if not in_block and i1 % width == 0:  # a group starts with this block; nothing pending
                g = i1 // width
                self.scales[g], self.zeros[g] = grid_params(
                    W[:, i1 : i1 + width], self.cfg.bits, self.cfg.sym, self.cfg.clip_steps
                )
            Q1, Err1 = gptq_triton.quantize_block(
                W[:, i1:i2].contiguous(), Hinv[i1:i2, i1:i2], self.scales, self.zeros,
                first_group=i1 // width, group=width if in_block else 0, maxq=self.cfg.maxq, sym=self.cfg.sym,
            )  # fmt: skip
            self.codes[:, i1:i2] = Q1
            loss += torch.sum(Err1 * Err1) / 2
            W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1)
        return float(loss)

    def _select_grid(self, i1: int, i: int, i2: int, W1, Err1) -> None:
        """The grid for column j = i1 + i: computed where a group starts, or looked up if static."""
        j = i1 + i
        if self.static:
            g = self.column_group[j]
            self.scale, self.zero = self.scales[g], self.zeros[g]
        elif j % self.width == 0:
            group = self._current_columns(i1, i, i2, min(j + self.width, self.W.shape[1]), W1, Err1)
            self.scale, self.zero = grid_params(group, self.cfg.bits, self.cfg.sym, self.cfg.clip_steps)
            self.scales[j // self.width], self.zeros[j // self.width] = self.scale, self.zero

    def _current_columns(self, i1, i, i2, end, W1, Err1) -> torch.Tensor:
        """Columns [i1+i, end) as they are now: a group wider than what is left of the block
        gets this block's pending errors applied to its columns beyond the block."""
        inside = W1[:, i : min(end, i2) - i1]
        if end <= i2:
            return inside
        beyond = self.W[:, i2:end] - Err1[:, :i] @ self.Hinv[i1 : i1 + i, i2:end]
        return torch.cat([inside, beyond], dim=1)

    def result(self) -> QuantizedWeight:
        """Codes and g_idx back in natural column order."""
        q, g_idx = self.codes, self.g_idx
        if self.perm is not None:
            invperm = torch.argsort(self.perm)
            q, g_idx = q[:, invperm], g_idx[invperm]
        return QuantizedWeight(
            q.contiguous(), self.scales, self.zeros.to(torch.int32), g_idx, self.cfg.bits, self.cfg.group_size
        )
