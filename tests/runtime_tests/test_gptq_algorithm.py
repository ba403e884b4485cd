"""The GPTQ algorithm and the quantization grid on small random layers (fast, CPU)."""

from __future__ import annotations

import logging

import pytest
import torch

from qmodel_runtime.gptq import GPTQ, HessianError, inverse_cholesky, tf32_disabled
from qmodel_runtime.quantizer import QuantConfig, grid_params, quantize, rtn

K, N, TOKENS = 256, 96, 2048


def correlated_inputs(k: int = K, tokens: int = TOKENS, seed: int = 0) -> torch.Tensor:
    """Inputs with correlated features and uneven scales, like a transformer's activations:
    the case where GPTQ's error feedback has something to exploit."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=gen) / k**0.5 + torch.eye(k)
    scale = torch.logspace(-1, 1, k)[torch.randperm(k, generator=gen)]
    return (torch.randn(tokens, k, generator=gen) @ mix) * scale


def weight(n: int = N, k: int = K, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.02


def hessian_of(x: torch.Tensor, batches: int = 4) -> GPTQ:
    g = GPTQ(x.shape[1], "cpu")
    for part in x.chunk(batches):
        g.add_batch(part)
    return g


def output_error(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> float:
    return float(((x @ (w - q).t()) ** 2).sum())


@pytest.mark.parametrize(
    "bits, desc_act",
    # 2-bit without act-order is left out: on these inputs (feature scales spread 100x) GPTQ's
    # feedback pushes weights past the group grid and loses to RTN (measured 1.36x RTN's
    # error), the known 2-bit instability; with act-order it is 0.56x.
    [(3, False), (4, False), (8, False), (2, True), (3, True), (4, True), (8, True)],
)
@pytest.mark.parametrize("sym", [True, False])
def test_gptq_beats_rtn_on_layer_output_error(bits, sym, desc_act):
    x, w = correlated_inputs(), weight()
    cfg = QuantConfig(bits=bits, group_size=64, sym=sym, desc_act=desc_act)
    qw, stats = hessian_of(x).quantize(w, cfg)
    gptq_err = output_error(x, w, qw.dequantize())
    rtn_err = output_error(x, w, rtn(w, cfg).dequantize())
    # Measured ratios: 0.66-0.78 without act-order, 0.45-0.58 with it. 0.85 still fails an
    # implementation without error feedback (1.0) or with a wrong inverse Hessian (above 1).
    assert gptq_err < 0.85 * rtn_err
    assert stats.damp_percent == 0.01 and stats.dead_columns == 0 and stats.tokens == TOKENS


def test_hessian_is_the_running_mean_of_2xxT():
    x = correlated_inputs(tokens=300)
    g = hessian_of(x, batches=7)  # uneven batch sizes
    expected = 2 * x.t().double() @ x.double() / x.shape[0]
    torch.testing.assert_close(g.H.double(), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_without_correlation_gptq_is_rtn():
    """With H = c*I the inverse Hessian is diagonal: no error is fed forward, so GPTQ must pick
    exactly the RTN grid and codes."""
    w = weight()
    g = GPTQ(K, "cpu")
    g.H = 3.0 * torch.eye(K)
    g.nsamples = 1
    cfg = QuantConfig(bits=4, group_size=32, sym=False)
    qw, _ = g.quantize(w, cfg)
    ref = rtn(w, cfg)
    assert torch.equal(qw.codes, ref.codes)
    assert torch.equal(qw.scales, ref.scales) and torch.equal(qw.zeros, ref.zeros)


@pytest.mark.parametrize("group_size", [64, 100, 200, -1])
def test_lazy_batches_equal_one_column_at_a_time(group_size):
    """Blocks of 128 with lazy updates must give what block size 1 (every update applied at
    once) gives, including groups that straddle a block boundary (100, 200: their grids need
    the block's pending updates)."""
    x, w = correlated_inputs(), weight()
    cfg = QuantConfig(bits=3, group_size=group_size, sym=False)
    lazy, _ = hessian_of(x).quantize(w, cfg)
    eager, _ = hessian_of(x).quantize(w, QuantConfig(bits=3, group_size=group_size, sym=False, block_size=1))
    # Same algorithm, different fp32 summation order: a handful of codes may round the other way.
    same = (lazy.codes == eager.codes).float().mean()
    assert same > 0.999
    torch.testing.assert_close(lazy.scales, eager.scales, rtol=2e-3, atol=0)


def test_partial_last_group_and_group_index():
    x, w = correlated_inputs(), weight()
    qw, _ = hessian_of(x).quantize(w, QuantConfig(bits=4, group_size=100, sym=True))
    assert qw.scales.shape == (3, N)  # 100 + 100 + 56
    assert torch.equal(qw.g_idx, torch.arange(K, dtype=torch.int32) // 100)


def test_act_order_groups_follow_decreasing_hessian_diagonal():
    x, w = correlated_inputs(), weight()
    g = hessian_of(x)
    order = torch.argsort(torch.diag(g.H), descending=True)
    qw, _ = g.quantize(w, QuantConfig(bits=4, group_size=64, sym=False, desc_act=True))
    # The 64 columns with the largest H[i, i] form group 0, the next 64 group 1, ...
    assert torch.equal(qw.g_idx[order], torch.arange(K, dtype=torch.int32) // 64)
    assert torch.bincount(qw.g_idx.long()).tolist() == [64] * 4


def test_static_groups_keep_natural_groups_and_grids_from_the_original_weights():
    x, w = correlated_inputs(), weight()
    cfg = QuantConfig(bits=4, group_size=64, sym=False, desc_act=True, static_groups=True)
    qw, _ = hessian_of(x).quantize(w, cfg)
    assert torch.equal(qw.g_idx, torch.arange(K, dtype=torch.int32) // 64)
    for gi in range(4):
        scale, zero = grid_params(w[:, gi * 64 : (gi + 1) * 64], 4, sym=False)
        assert torch.equal(qw.scales[gi], scale) and torch.equal(qw.zeros[gi], zero.int())


def test_dead_columns_are_zeroed():
    x, w = correlated_inputs(), weight()
    dead = torch.tensor([3, 77, 200])
    x[:, dead] = 0
    qw, stats = hessian_of(x).quantize(w, QuantConfig(bits=4, group_size=64, sym=False))
    assert stats.dead_columns == 3
    assert torch.equal(qw.dequantize()[:, dead], torch.zeros(N, 3))


def test_damping_doubles_until_cholesky_succeeds(caplog):
    """H with a negative eigenvalue of -0.05 x its mean diagonal: damping 1%, 2%, 4% fail, 8% works."""
    k = 64
    q, _ = torch.linalg.qr(torch.randn(k, k, generator=torch.Generator().manual_seed(0)))
    eig = torch.ones(k)
    eig[0] = -0.05 * (k - 1) / (k + 0.05)  # so that -eig[0] / mean(eig) == 0.05
    H = (q * eig) @ q.t()
    with caplog.at_level(logging.WARNING, logger="qmodel_runtime.gptq"):
        Hinv, damp = inverse_cholesky(H.clone(), 0.01)
    assert damp == pytest.approx(0.08)
    assert len([r for r in caplog.records if "Cholesky failed" in r.message]) == 3
    dampened = H + 0.08 * torch.mean(torch.diag(H)) * torch.eye(k)
    torch.testing.assert_close(Hinv.t() @ Hinv, torch.linalg.inv(dampened), rtol=1e-3, atol=1e-3)


def test_hopeless_hessians_raise_clear_errors():
    g = GPTQ(8, "cpu")
    g.H, g.nsamples = -torch.eye(8), 1
    with pytest.raises(HessianError, match="not positive definite"):
        g.quantize(weight(4, 8), QuantConfig())
    g.H, g.nsamples = torch.full((8, 8), float("nan")), 1
    with pytest.raises(HessianError, match="NaN"):
        g.quantize(weight(4, 8), QuantConfig())
    with pytest.raises(HessianError, match="no calibration inputs"):
        GPTQ(8, "cpu").quantize(weight(4, 8), QuantConfig())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_asymmetric_zeros_are_never_zero(bits):
    """Rows whose groups are all positive would get zero 0 from min/max; the v1 format stores
    zero-1, and loaders disagree on a stored -1, so the grid clamps zeros into [1, maxq]."""
    x = correlated_inputs()
    w = weight().abs() + 0.01
    w[: N // 2] *= -1  # and all-negative rows: zero maxq
    cfg = QuantConfig(bits=bits, group_size=32, sym=False)
    for qw in (hessian_of(x).quantize(w, cfg)[0], rtn(w, cfg)):
        assert int(qw.zeros.min()) >= 1 and int(qw.zeros.max()) <= 2**bits - 1
        assert int(qw.zeros.max()) == 2**bits - 1  # the all-negative rows reach the top


def test_grid_scales_are_fp16_exact_and_quantize_is_the_nearest_grid_point():
    w = weight()
    scale, zero = grid_params(w[:, :64], bits=4, sym=False)
    assert torch.equal(scale, scale.half().float())
    q = quantize(w[:, :64], scale[:, None], zero[:, None], 15)
    levels = scale[:, None, None] * (torch.arange(16.0)[None, None, :] - zero[:, None, None])
    levels = levels.expand(-1, 64, -1)
    nearest = levels.gather(2, (w[:, :64, None] - levels).abs().argmin(2, keepdim=True)).squeeze(2)
    inside = (w[:, :64] >= levels[..., 0]) & (w[:, :64] <= levels[..., -1])
    assert inside.float().mean() > 0.9
    assert torch.equal(q[inside], nearest[inside])


def test_symmetric_grid_is_centered():
    w = weight()[:, :64]
    scale, zero = grid_params(w, bits=4, sym=True)
    assert torch.all(zero == 8)
    assert torch.equal(scale, (2 * w.abs().max(dim=1).values / 15).half().float())


def test_clip_search_never_increases_the_grid_error():
    w = weight() * torch.linspace(0.2, 5, K)  # some outliers
    plain = grid_params(w, 3, sym=False)
    clipped = grid_params(w, 3, sym=False, clip_steps=40)

    def err(grid):
        return (quantize(w, grid[0][:, None], grid[1][:, None], 7) - w).abs().pow(2.4).sum(1)

    assert torch.all(err(clipped) <= err(plain))
    assert torch.any(err(clipped) < err(plain))


def test_tf32_is_off_inside_and_restored_after():
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with tf32_disabled():
            assert not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def test_fused_rows_equal_separate_quantization():
    """q/k/v share one Hessian and are quantized stacked; GPTQ treats rows independently."""
    x, w = correlated_inputs(), weight(n=96)
    cfg = QuantConfig(bits=4, group_size=64, sym=False, desc_act=True)
    fused, _ = hessian_of(x).quantize(w, cfg)
    top, _ = hessian_of(x).quantize(w[:32], cfg)
    part = fused.rows(0, 32)
    assert (part.codes == top.codes).float().mean() > 0.999
    assert torch.equal(part.g_idx, top.g_idx)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"bits": 5}, "bits must be one of"),
        ({"group_size": 0}, "group_size must be -1"),
        ({"method": "awq"}, "method must be one of"),
        ({"damp_percent": 1.5}, "damp_percent"),
    ],
)
def test_config_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantConfig(**kwargs)


def test_hf_quantization_config_has_every_field_loaders_read():
    qc = QuantConfig(bits=3, group_size=64, sym=False, desc_act=True).hf_quantization_config()
    assert qc == {
        "quant_method": "gptq",
        "bits": 3,
        "group_size": 64,
        "desc_act": True,
        "sym": False,
        "static_groups": False,
        "true_sequential": True,
        "damp_percent": 0.01,
        "checkpoint_format": "gptq",
    }


@pytest.mark.gpu
def test_cuda_hessian_of_half_inputs_equals_the_fp32_one():
    """On a GPU, fp16 inputs go through tensor cores with fp32 output (exact products, fp32
    sums): the Hessian must match the fp32 CPU one up to summation order."""
    x = correlated_inputs(tokens=4096).half()
    cpu = hessian_of(x.float())
    gpu = GPTQ(K, "cuda")
    for part in x.cuda().chunk(4):
        gpu.add_batch(part)
    scale = float(cpu.H.abs().max())
    torch.testing.assert_close(gpu.H.cpu(), cpu.H, rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.gpu
def test_cuda_quantization_matches_cpu():
    x, w = correlated_inputs(), weight()
    cfg = QuantConfig(bits=4, group_size=64, sym=False, desc_act=True)
    cpu, _ = hessian_of(x).quantize(w, cfg)
    g = GPTQ(K, "cuda")
    g.add_batch(x.cuda())
    gpu, _ = g.quantize(w.cuda(), cfg)
    # fp32 on both, different summation orders: a few codes may round the other way.
    assert (gpu.codes.cpu() == cpu.codes).float().mean() > 0.999
    assert torch.equal(gpu.g_idx.cpu(), cpu.g_idx)
