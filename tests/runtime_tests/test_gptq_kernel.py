"""The fused Triton column loop (``gptq_triton``) against the PyTorch loop it replaces on GPUs.

On a machine without CUDA the kernel runs in Triton's CPU interpreter, which has to be chosen
before the kernel module is imported: that happens in a fresh interpreter process here, so
this file does not depend on what else the test session imported first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from qmodel_runtime.quantizer import QuantConfig

# (rows, columns, bits, group, sym, act-order, clip steps): groups inside blocks, per channel
# (one grid for all blocks), groups of whole blocks, a partial last block, rows not a multiple of
# the tile, and the clipping search where grids are found outside the kernel.
CASES = [
    (40, 256, 4, 32, False, False, 0),
    (33, 200, 3, -1, True, False, 0),
    (24, 256, 8, 128, False, True, 0),
    (20, 160, 2, 32, False, True, 0),
    (24, 256, 4, 128, False, True, 20),
    (17, 200, 3, -1, False, False, 20),
]

SCRIPT = r"""
import json, sys, torch
from qmodel_runtime.gptq import GPTQ
from qmodel_runtime.quantizer import QuantConfig
out = []
for rows, cols, bits, group, sym, act, clip in json.loads(sys.argv[1]):
    gen = torch.Generator().manual_seed(rows)
    mix = torch.randn(cols, cols, generator=gen) * 0.2 + torch.eye(cols)
    x = torch.randn(2048, cols, generator=gen) @ mix
    w = torch.randn(rows, cols, generator=gen) * 0.02
    cfg = QuantConfig(bits=bits, group_size=group, sym=sym, desc_act=act, clip_steps=clip)
    results = []
    for fused in (False, True):
        g = GPTQ(cols, "cpu")
        g.add_batch(x)
        qw, stats = g.quantize(w, cfg, fused=fused)
        results.append((qw, stats.loss))
    (a, la), (b, lb) = results
    out.append({
        "codes": float((a.codes == b.codes).float().mean()),
        "scales": bool(torch.equal(a.scales, b.scales)),
        "zeros": bool(torch.equal(a.zeros, b.zeros)),
        "g_idx": bool(torch.equal(a.g_idx, b.g_idx)),
        "loss": [la, lb],
    })
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def interpreted():
    if torch.cuda.is_available():
        pytest.skip("with CUDA the kernel is checked compiled (test_fused_loop_on_cuda)")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(CASES)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", range(len(CASES)), ids=[str(c) for c in CASES])
def test_fused_loop_equals_the_pytorch_loop(interpreted, case):
    got = interpreted[case]
    # Same fp32 arithmetic, same half-to-even rounding and IEEE divisions: identical results
    # are expected; a rare code may differ where an fp32 multiply-add contracts differently.
    assert got["codes"] > 0.999
    assert got["scales"] and got["zeros"] and got["g_idx"]
    assert got["loss"][1] == pytest.approx(got["loss"][0], rel=1e-4)


def test_unsupported_settings_stay_on_the_pytorch_loop():
    from qmodel_runtime import gptq_triton

    assert gptq_triton.supports(QuantConfig(group_size=64), 64)
    assert gptq_triton.supports(QuantConfig(group_size=-1), 576)
    assert not gptq_triton.supports(QuantConfig(group_size=100), 100)
    assert not gptq_triton.supports(QuantConfig(group_size=64, desc_act=True, static_groups=True), 64)
    assert not gptq_triton.supports(QuantConfig(group_size=64, clip_steps=10), 64)  # grids in-kernel
    assert gptq_triton.supports(QuantConfig(group_size=128, clip_steps=10), 128)


@pytest.mark.gpu
@pytest.mark.parametrize("rows, cols, bits, group, sym, act, clip", CASES)
def test_fused_loop_on_cuda(rows, cols, bits, group, sym, act, clip):
    from qmodel_runtime.gptq import GPTQ

    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(2048, cols, generator=gen) @ (
        torch.randn(cols, cols, generator=gen) * 0.2 + torch.eye(cols)
    )
    w = torch.randn(rows, cols, generator=gen) * 0.02
    cfg = QuantConfig(bits=bits, group_size=group, sym=sym, desc_act=act, clip_steps=clip)
    out = []
    for fused in (False, True):
        g = GPTQ(cols, "cuda")
        g.add_batch(x.cuda())
        out.append(g.quantize(w.cuda(), cfg, fused=fused)[0])
    assert (out[0].codes == out[1].codes).float().mean() > 0.999
    torch.testing.assert_close(out[0].scales, out[1].scales, rtol=1e-3, atol=0)


def test_a_kernel_that_cannot_be_built_falls_back_to_the_pytorch_loop(monkeypatch, caplog):
    from qmodel_runtime import gptq_triton
    from qmodel_runtime.gptq import GPTQ

    def unavailable(*_args, **_kwargs):
        raise gptq_triton.KernelUnavailable("the fused GPTQ kernel is unavailable here: out of registers")

    monkeypatch.setattr(gptq_triton, "quantize_block", unavailable)
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(512, 64, generator=gen), torch.randn(16, 64, generator=gen) * 0.02
    cfg = QuantConfig(bits=4, group_size=32, sym=False)
    out = []
    for fused in (True, False):
        g = GPTQ(64, "cpu")
        g.add_batch(x)
        out.append(g.quantize(w, cfg, fused=fused)[0])
    assert torch.equal(out[0].codes, out[1].codes)
    assert "using the PyTorch column loop" in caplog.text
