"""End to end: SmolLM2-135M with every decoder Linear RTN-packed to 4 bits, through Int4Linear.

The packed model must give the same perplexity as the same weights dequantized into plain
fp32 Linears (the issue's bound: 0.5%). Group size 128 leaves a partial last group on
every 576-wide input (576 = 4 x 128 + 64), and the zeros are asymmetric.
- CPU: Int4Linear's PyTorch path on 8 windows x 512 tokens; plus real layers' weights and
  real activations through the Triton kernels (interpreted), GEMV and GEMM.
- GPU: the whole model through the Triton kernels in fp16.
"""

from __future__ import annotations

import copy

import pytest
import torch
from kernel_tests.helpers import DEVICE, UNIT_ROUNDOFF, rel_err
from torch import nn

from qmodel_kernels import Int4Linear, layout, replace_linear

BITS, GROUP = 4, 128
WINDOWS, WINDOW = 8, 512
PPL_TOLERANCE = 0.005  # the "within 0.5%"


def rtn_pack(weight: torch.Tensor, bits: int = BITS, group_size: int = GROUP) -> layout.PackedWeight:
    """Round-to-nearest, asymmetric, per (group, output row): the simplest GPTQ-format packer."""
    w = weight.detach().float().t()  # [K, N]
    k, n = w.shape
    maxq, groups = 2**bits - 1, layout.num_groups(k, group_size)
    padded = torch.full((groups * group_size, n), float("nan"))
    padded[:k] = w  # the partial last group is padded with NaN, ignored by the min/max
    by_group = padded.view(groups, group_size, n)
    lo = torch.where(by_group.isnan(), torch.inf, by_group).amin(1).clamp(max=0)
    hi = torch.where(by_group.isnan(), -torch.inf, by_group).amax(1).clamp(min=0)
    scales = ((hi - lo) / maxq).clamp(min=1e-5).half().float()  # rounded to fp16 before the codes
    zeros = torch.round(-lo / scales).clamp(1, maxq)  # v1 checkpoints never store a zero of 0
    g_idx = layout.default_g_idx(k, group_size)
    codes = torch.clamp(torch.round(w / scales[g_idx.long()]) + zeros[g_idx.long()], 0, maxq)
    return layout.pack(codes.long(), zeros.long(), scales, g_idx, bits, group_size)


def _decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in name}


@pytest.fixture(scope="module")
def smollm2():
    """(fp32 model, eval windows [8, 512])."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qmodel_runtime import assets, data

    path = assets.model_path("smollm2-135m", "float32")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    text = assets.wiki_text("evaluation")[:40_000]  # ~9k tokens: enough for 8 windows of 512
    windows = data.token_windows(data.tokenize(tokenizer, text), WINDOW, limit=WINDOWS)
    assert windows.shape == (WINDOWS, WINDOW)
    return model, windows


@pytest.fixture(scope="module")
def packed(smollm2):
    """Every decoder Linear RTN-packed, by module name."""
    layers = {name: rtn_pack(linear.weight) for name, linear in _decoder_linears(smollm2[0]).items()}
    assert len(layers) == 30 * 7
    return layers


def _dequantized_model(model, packed, dtype=torch.float32):
    ref = copy.deepcopy(model)
    for name, linear in _decoder_linears(ref).items():
        linear.weight.data = layout.dequantize_ref(packed[name], torch.float32).t().contiguous()
    return ref.to(DEVICE, dtype)


def _int4_model(model, packed, dtype=torch.float32, backend="auto"):
    int4 = copy.deepcopy(model)
    replace_linear(
        int4,
        list(packed),
        make=lambda name, lin: Int4Linear.from_packed(packed[name], lin.bias, backend=backend),
    )
    assert sum(isinstance(m, Int4Linear) for m in int4.modules()) == len(packed)
    assert not _decoder_linears(int4)
    return int4.to(DEVICE, dtype)


def _ppl(model, windows) -> float:
    from qmodel_runtime import evaluate

    return evaluate.perplexity(model, windows, batch_size=4, device=DEVICE).perplexity


@pytest.mark.slow
def test_perplexity_matches_dequantized_reference_cpu(smollm2, packed):
    model, windows = smollm2
    if DEVICE != "cpu":
        pytest.skip("the GPU test below covers the kernels end to end")
    ref = _ppl(_dequantized_model(model, packed), windows)
    ours = _ppl(_int4_model(model, packed), windows)
    print(f"perplexity over {WINDOWS}x{WINDOW} tokens: dequantized fp32 {ref:.4f}, Int4Linear {ours:.4f}")
    assert 14 < ref < 30  # RTN 4-bit g128 on wiki text (fp32 baseline ~14.1)
    assert abs(ours / ref - 1) < PPL_TOLERANCE, (ours, ref)


@pytest.mark.gpu
def test_perplexity_through_the_kernels_gpu(smollm2, packed):
    model, windows = smollm2
    ref = _ppl(_dequantized_model(model, packed), windows)
    for dtype in (torch.float16, torch.bfloat16):
        int4 = _int4_model(model, packed, dtype, backend="triton")
        ours = _ppl(int4, windows)
        print(f"perplexity: dequantized fp32 {ref:.4f}, Int4Linear {dtype} through the kernels {ours:.4f}")
        assert abs(ours / ref - 1) < PPL_TOLERANCE, (dtype, ours, ref)


@pytest.mark.parametrize(
    ("layer", "tokens"), [("model.layers.0.self_attn.q_proj", 8), ("model.layers.17.mlp.down_proj", 19)]
)
def test_real_layer_through_the_kernels(kernels, smollm2, layer, tokens):
    """Real weights (outliers and all) and real activations: GEMV at 8 tokens, GEMM at 19."""
    model, windows = smollm2
    seen = {}
    hook = model.get_submodule(layer).register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    try:
        model(windows[:1, :tokens])
    finally:
        hook.remove()
    x = seen["x"][0].to(DEVICE, torch.float16)  # [tokens, K]
    pw = rtn_pack(model.get_submodule(layer).weight)
    module = Int4Linear.from_packed(pw, backend="triton").to(DEVICE)
    y = module(x)
    ref = x.double().cpu() @ layout.dequantize_ref(pw, torch.float64)
    assert rel_err(y.cpu(), ref) <= UNIT_ROUNDOFF[torch.float16]
