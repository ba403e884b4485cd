"""The kernels compiled on a GPU: real Llama shapes, every tuning candidate, act-order, CUDA graphs.

Skipped without CUDA (tests/conftest.py). References are fp32 on the GPU with TF32 off:
fp32 accumulation over K <= 28672 adds ~sqrt(K) * 2^-24 ~ 1e-5 relative, far below the
bound (u, the unit roundoff of the output dtype; see test_matmul.py for why u).
"""

from __future__ import annotations

import pytest
import torch
from kernel_tests.helpers import UNIT_ROUNDOFF, rel_err

from qmodel_kernels import layout
from qmodel_kernels.quant_weight import prepare
from qmodel_kernels.tuning import Tuner, TuningSettings

pytestmark = pytest.mark.gpu

# (K, N): Llama-2-7B qkv, gate_up, down; Llama-2-70B gate_up, down; SmolLM2 (576 = 4.5 x 128)
LLAMA_SHAPES = [
    (4096, 12288),
    (4096, 22016),
    (11008, 4096),
    (8192, 57344),
    (28672, 8192),
    (576, 1536),
    (1536, 576),
]
MS = [1, 3, 8, 16, 33, 64, 256, 1024]


@pytest.fixture(autouse=True)
def _no_tf32():
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def gpu_layer(k, n, group=128, sym=False, act_order=False, seed=0) -> layout.PackedWeight:
    """A random 4-bit layer made on the GPU (random words are valid codes; zeros via pack)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    qweight = torch.randint(-(2**31), 2**31 - 1, (k // 8, n), dtype=torch.int32, device="cuda", generator=gen)
    groups = layout.num_groups(k, group)
    zeros = (
        torch.full((groups, n), 8)
        if sym
        else torch.randint(1, 16, (groups, n), generator=gen.manual_seed(seed))
    )
    scales = torch.rand(groups, n, device="cuda", generator=gen) * 0.029 + 0.001
    g_idx = layout.default_g_idx(k, group, "cuda")
    if act_order:
        g_idx = g_idx[torch.randperm(k, device="cuda", generator=gen)]
    qzeros = layout.pack_dim1(zeros - 1, 4)
    return layout.PackedWeight(qweight, qzeros, scales.half(), g_idx, 4, group)


def reference(x, pw, bias=None):
    y = x.float() @ layout.dequantize_ref(pw, torch.float32)
    return y if bias is None else y + bias.float()


@pytest.fixture(scope="module")
def untuned():
    """Heuristic configs only: the shape sweep checks correctness, not speed."""
    return Tuner(TuningSettings(cache_dir=None, enabled=False), "untuned")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(("k", "n"), LLAMA_SHAPES, ids=[f"{k}x{n}" for k, n in LLAMA_SHAPES])
def test_llama_shapes(untuned, poison, k, n, dtype):
    from qmodel_kernels.matmul import quant_matmul

    pw = gpu_layer(k, n, sym=(k + n) % 2 == 0, seed=k + n)
    w = prepare(pw)
    bias = torch.randn(n, device="cuda").half()
    for m in MS:
        x = torch.randn(m, k, device="cuda").to(dtype)
        y = quant_matmul(x, w, bias, tuner=untuned)
        assert torch.isfinite(y).all(), (m, "unwritten or overflowed outputs")
        assert rel_err(y, reference(x, pw, bias)) <= UNIT_ROUNDOFF[dtype], m


@pytest.mark.parametrize(
    ("path", "m"), [("gemv", 1), ("gemv", 4), ("gemv", 8), ("gemm", 16), ("gemm", 64), ("gemm", 256)]
)
def test_every_tuning_candidate_is_correct(poison, path, m):
    """Whatever config the tuner picks on any GPU must be right: run them all on one shape."""
    from qmodel_kernels import gemm, gemv

    k, n = 11008, 4096  # long K, narrow N: the shape where split-K matters
    pw = gpu_layer(k, n, group=128, seed=m)
    w = prepare(pw)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    ref = reference(x, pw)
    sm = torch.cuda.get_device_properties(0).multi_processor_count
    if path == "gemv":
        configs, run = gemv.gemv_configs(m, n, k, 4, sm), gemv.gemv
    else:
        configs, run = gemm.gemm_configs(m, n, k, sm), gemm.gemm
    assert len(configs) >= 6
    for cfg in configs:
        assert rel_err(run(x, w, None, cfg), ref) <= UNIT_ROUNDOFF[torch.float16], cfg


@pytest.mark.parametrize("mode", ["reorder", "g_idx"])
@pytest.mark.parametrize("group", [32, 128])
def test_act_order(untuned, mode, group):
    from qmodel_kernels.matmul import quant_matmul

    pw = gpu_layer(4096, 12288, group=group, act_order=True, seed=group)
    w = prepare(pw, mode)
    assert (w.perm is not None) == (mode == "reorder")
    for m in (1, 16, 256):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)
        assert rel_err(quant_matmul(x, w, tuner=untuned), reference(x, pw)) <= UNIT_ROUNDOFF[torch.float16]


def test_cuda_graph_replay_matches_eager(tmp_path):
    """The runtime captures decode steps in CUDA graphs: after a warm-up call (tuning), a
    captured call replays the same kernels and gives the same bits."""
    from qmodel_kernels.matmul import quant_matmul

    tuner = Tuner(TuningSettings(cache_dir=tmp_path), "graph-test")
    pw = gpu_layer(4096, 4096, seed=7)
    w = prepare(pw)
    x = torch.randn(4, 4096, device="cuda", dtype=torch.float16)
    eager = quant_matmul(x, w, tuner=tuner)  # tunes here, outside the capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        quant_matmul(x, w, tuner=tuner)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = quant_matmul(x, w, tuner=tuner)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, quant_matmul(x, w, tuner=tuner))
    assert not torch.equal(captured, eager)  # the replay really used the new x
