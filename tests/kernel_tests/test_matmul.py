"""The Triton kernels against the fp64 reference: both paths, both dtypes, odd shapes.

On a CPU these run in Triton's interpreter (conftest.py), so shapes are small and every
case picks its launch config explicitly: together the cases cover multi-tile grids in
M and N, N not a multiple of the tile, K not a multiple of the group or the K tile,
split-K (including a last split that hangs a whole tile over K), per-tile and per-row
groups, symmetric and asymmetric zeros, 2/4/8 bits, act-order reordered and g_idx-aware.

Tolerance: the kernels accumulate in fp32 and round at most twice in the activation
dtype (the GEMM's dequantized weight tile, and the output), each rounding contributing
about u/sqrt(3) of relative error (u = unit roundoff: 2^-11 fp16, 2^-8 bf16); measured
0.41u (GEMV) and 0.57u (GEMM). The bound is u. A wrong zero (off by one) or scale, a
mis-masked partial group or a lost split shows as 10-100% error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import pytest
import torch
from kernel_tests.helpers import DEVICE, UNIT_ROUNDOFF, random_layer, rel_err

from qmodel_kernels.quant_weight import matmul_ref, prepare


@dataclass(frozen=True)
class Case:
    bits: int
    group: int
    m: int
    k: int
    n: int
    dtype: torch.dtype
    sym: bool = False
    act_order: str | None = None  # None | "reorder" | "g_idx"
    bias: bool = True

    def __str__(self) -> str:
        dt = "fp16" if self.dtype == torch.float16 else "bf16"
        act = f"-{self.act_order}" if self.act_order else ""
        return f"b{self.bits}g{self.group}-{self.m}x{self.k}x{self.n}-{dt}{'-sym' if self.sym else ''}{act}"


def _run(kernel_fn, case: Case, config, gen):
    pw = random_layer(gen, case.k, case.n, case.bits, case.group, case.sym, case.act_order is not None)
    w = prepare(pw, case.act_order or "reorder")
    if case.act_order == "reorder":
        assert w.perm is not None and w.g_idx is None
    if case.act_order == "g_idx":
        assert w.g_idx is not None and w.perm is None
    w = _to(w, DEVICE)
    w = replace(w, scales=_guarded(w.scales))
    x = _guarded(torch.randn(case.m, case.k, generator=gen).to(DEVICE, case.dtype), cols=16)
    bias = _guarded(torch.randn(case.n, generator=gen).to(DEVICE, torch.float16)) if case.bias else None
    y = kernel_fn(x, w, bias, config)
    ref = matmul_ref(x.cpu(), _to(w, "cpu"), None if bias is None else bias.cpu())
    assert y.shape == (case.m, case.n) and y.dtype == case.dtype
    assert torch.isfinite(y).all(), "some output elements were never written"
    err = rel_err(y.cpu(), ref)
    assert err <= UNIT_ROUNDOFF[case.dtype], f"relative error {err:.2e}"
    return w


def _guarded(t: torch.Tensor, cols: int = 0) -> torch.Tensor:
    """``t`` as a view into a NaN-filled buffer one row longer (and ``cols`` wider): a read
    past the end, masked wrongly, turns the output NaN instead of passing unseen."""
    rows = t.shape[0]
    if cols:
        buf = torch.full((rows + 1, t.shape[1] + cols), math.nan, dtype=t.dtype, device=t.device)
        buf[:rows, : t.shape[1]] = t
        return buf[:rows, : t.shape[1]]
    flat = torch.full((t.numel() + t[0].numel(),), math.nan, dtype=t.dtype, device=t.device)
    flat[: t.numel()] = t.reshape(-1)
    return flat[: t.numel()].view(t.shape)


def _to(w, device):
    moved = {
        f.name: getattr(w, f.name).to(device)
        for f in fields(w)
        if isinstance(getattr(w, f.name), torch.Tensor)
    }
    return replace(w, **moved)


F16, B16 = torch.float16, torch.bfloat16
# (case, GemvConfig args: block_n, block_k, split_k)
GEMV_CASES = [
    (Case(4, 128, 1, 200, 72, F16), (64, 128, 1)),  # one group per tile, partial last group, 2 N tiles
    (Case(4, 32, 3, 200, 40, B16, sym=True), (32, 64, 2)),  # 2 groups per tile, constant zero, split
    (Case(4, -1, 8, 96, 24, F16, bias=False), (16, 64, 1)),  # per-channel, M = 8
    (Case(4, 128, 2, 456, 24, B16), (32, 64, 3)),  # last split's last tile lies wholly past K
    (Case(4, 64, 5, 192, 40, B16, act_order="reorder"), (32, 64, 3)),
    (Case(4, 64, 2, 192, 40, F16, act_order="g_idx"), (32, 128, 2)),
    (Case(4, 100, 1, 200, 16, F16), (16, 64, 1)),  # a group that splits a word: g_idx-aware path
    (Case(8, 32, 4, 100, 20, B16), (32, 32, 2)),
    (Case(2, 64, 1, 208, 48, F16, sym=True), (64, 256, 1)),
]


@pytest.mark.parametrize(("case", "cfg"), GEMV_CASES, ids=[str(c) for c, _ in GEMV_CASES])
def test_gemv_matches_reference(kernels, poison, gen, case, cfg):
    gemv = kernels[0]
    _run(gemv.gemv, case, gemv.GemvConfig(*cfg), gen)


# (case, GemmConfig args: block_m, block_n, block_k, split_k, group_m)
GEMM_CASES = [
    (Case(4, 128, 33, 200, 72, F16), (16, 32, 64, 1, 8)),  # 3 x 3 tiles, partial edges in M and N
    (Case(4, 32, 17, 200, 40, B16, sym=True), (32, 64, 64, 2, 8)),  # per-row groups, split
    (Case(4, 128, 12, 456, 24, F16), (16, 32, 64, 3, 8)),  # a wholly empty tile past K
    (Case(4, 64, 9, 192, 40, F16, act_order="reorder"), (16, 64, 32, 1, 8)),
    (Case(4, 64, 20, 192, 40, B16, act_order="g_idx"), (32, 32, 64, 1, 8)),
    (Case(4, 64, 70, 64, 40, F16), (16, 16, 64, 1, 2)),  # grouped CTA order, a partial group of rows
    (Case(8, -1, 1, 100, 20, F16), (16, 32, 32, 1, 8)),
    (Case(2, 32, 24, 208, 48, B16), (16, 64, 64, 3, 8)),
]


@pytest.mark.parametrize(("case", "cfg"), GEMM_CASES, ids=[str(c) for c, _ in GEMM_CASES])
def test_gemm_matches_reference(kernels, poison, gen, case, cfg):
    gemm = kernels[1]
    _run(gemm.gemm, case, gemm.GemmConfig(*cfg), gen)


@pytest.mark.parametrize("m", [1, 7, 16, 33])
def test_quant_matmul_any_leading_dims(kernels, gen, m):
    """The entry point flattens leading dims, takes strided x, and picks GEMV or GEMM by M."""
    from qmodel_kernels.matmul import choose_path, quant_matmul

    w = _to(prepare(random_layer(gen, 128, 48, 4, 64)), DEVICE)
    wide = torch.randn(m, 2 * 128, generator=gen).to(DEVICE, F16)
    x = wide[:, ::2]  # a strided view: the wrapper must copy, not misread
    calls = _count_launches(kernels)
    with calls:
        y = quant_matmul(x.reshape(1, m, 128), w)
    assert y.shape == (1, m, 48)
    assert rel_err(y.reshape(m, 48).cpu(), matmul_ref(x.cpu(), _to(w, "cpu"))) <= UNIT_ROUNDOFF[F16]
    path = choose_path(m)
    assert calls.counts[path] == 1 and calls.counts["gemv" if path == "gemm" else "gemm"] == 0
    assert quant_matmul(x[:0], w).shape == (0, 48)


class _count_launches:
    """Counts launches of each kernel through Triton's pre-run hooks (compiled or interpreted)."""

    def __init__(self, kernels):
        gemv, gemm, splitk = kernels
        self.kernels = {
            "gemv": gemv._gemv_kernel,
            "gemm": gemm._gemm_kernel,
            "reduce": splitk._splitk_reduce_kernel,
        }
        self.counts = dict.fromkeys(self.kernels, 0)
        self.hooks = {}

    def __enter__(self):
        for name, kernel in self.kernels.items():
            self.hooks[name] = lambda *a, name=name, **k: self.counts.__setitem__(name, self.counts[name] + 1)
            kernel.add_pre_run_hook(self.hooks[name])
        return self

    def __exit__(self, *exc):
        for name, kernel in self.kernels.items():
            kernel.pre_run_hooks.remove(self.hooks[name])


def test_kernel_code_really_runs(kernels, gen, monkeypatch):
    """With the PyTorch reference made unusable, results still come, from the kernels."""
    from qmodel_kernels import layout
    from qmodel_kernels.quant_weight import interpreting

    gemv, gemm, _ = kernels
    if DEVICE == "cpu":
        assert interpreting(gemv._gemv_kernel) and interpreting(gemm._gemm_kernel)
    pw = random_layer(gen, 128, 32, 4, 64)
    w = _to(prepare(pw), DEVICE)
    x = torch.randn(2, 128, generator=gen).to(DEVICE, F16)
    ref = matmul_ref(x.cpu(), _to(w, "cpu"))

    def no_reference(*_a, **_k):
        raise AssertionError("the PyTorch reference ran")

    monkeypatch.setattr(layout, "dequantize_ref", no_reference)
    with _count_launches(kernels) as calls:
        y1 = gemv.gemv(x, w, None, gemv.GemvConfig(32, 64, 2))
        y2 = gemm.gemm(x, w, None, gemm.GemmConfig(16, 32, 64, 1))
    assert calls.counts == {"gemv": 1, "gemm": 1, "reduce": 1}
    assert rel_err(y1.cpu(), ref) <= UNIT_ROUNDOFF[F16] and rel_err(y2.cpu(), ref) <= UNIT_ROUNDOFF[F16]


def test_splitk_reduce_matches_reference(kernels, poison, gen):
    splitk = kernels[2]
    partials = torch.randn(3, 5, 37, generator=gen).to(DEVICE)
    bias = torch.randn(37, generator=gen).to(DEVICE, F16)
    for dtype in (F16, B16):
        y = splitk.splitk_reduce(partials, bias, dtype)
        ref = partials.double().sum(0) + bias.double()
        assert torch.isfinite(y).all() and rel_err(y.cpu(), ref.cpu()) <= UNIT_ROUNDOFF[dtype]
        assert torch.equal(y.cpu(), splitk.splitk_reduce_ref(partials, bias, dtype).cpu())


def test_inputs_are_checked_with_clear_messages(kernels, gen):
    from qmodel_kernels.matmul import quant_matmul
    from qmodel_kernels.quant_weight import check_inputs

    gemv, gemm, _ = kernels
    w = _to(prepare(random_layer(gen, 128, 32, 4, 64)), DEVICE)
    x = torch.randn(2, 128, generator=gen).to(DEVICE, F16)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        gemm.gemm(x.float(), w)
    with pytest.raises(ValueError, match="expects in_features=128"):
        gemm.gemm(x[:, :64].contiguous(), w)
    with pytest.raises(ValueError, match="expects 128"):
        quant_matmul(x[:, :64], w)
    with pytest.raises(ValueError, match="contiguous along its last dimension"):
        gemm.gemm(x.t().contiguous().t(), w)
    with pytest.raises(ValueError, match="bias must have shape"):
        gemm.gemm(x, w, torch.zeros(31, device=DEVICE))
    with pytest.raises(ValueError, match="1 to 8 rows"):
        gemv.gemv(torch.zeros(9, 128, dtype=F16, device=DEVICE), w)
    with pytest.raises(ValueError, match="at least 16"):
        gemm.gemm(x, w, None, gemm.GemmConfig(8, 32, 32))
    with pytest.raises(ValueError, match="on meta but the layer's weights"):
        check_inputs(x.to("meta"), w, None, gemm._gemm_kernel)
    with pytest.raises(ValueError, match="need a CUDA device"):
        check_inputs(x.cpu(), _to(w, "cpu"), None, kernel=object())  # a compiled (not interpreted) kernel
    with pytest.raises(ValueError, match="path must be one of"):
        quant_matmul(x, w, path="fast")


def test_prepare_refuses_3bit_and_unknown_modes(gen):
    pw3 = random_layer(gen, 96, 32, 3, 32)
    with pytest.raises(ValueError, match=r"use layout\.dequantize_ref"):
        prepare(pw3)
    with pytest.raises(ValueError, match="act_order must be one of"):
        prepare(random_layer(gen, 64, 8, 4, 32), act_order="sorted")
