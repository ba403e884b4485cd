"""Int4Linear and replace_linear: loading, the module swap on meta, both backends, state dicts."""

from __future__ import annotations

import pytest
import torch
from kernel_tests.helpers import DEVICE, UNIT_ROUNDOFF, random_layer, rel_err
from torch import nn

from qmodel_kernels import Int4Linear, layout, packed_layer_names, replace_linear


def _reference(x: torch.Tensor, pw: layout.PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    y = x.double() @ layout.dequantize_ref(pw, torch.float64)
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_reference_backend_any_leading_dims(gen, bits):
    """fp32 on CPU: the PyTorch path, equal to the fp64 reference to fp32 accuracy."""
    pw = random_layer(gen, 96, 64, bits, 32, act_order=bits == 4)
    bias = torch.randn(64, generator=gen).half()
    module = Int4Linear.from_packed(pw, bias)
    x = torch.randn(2, 5, 96, generator=gen)
    y = module(x)
    assert y.shape == (2, 5, 64) and y.dtype == torch.float32
    # fp32 products and sums over K = 96: about sqrt(96) * 2^-24 relative; 1e-6 is 17x that
    assert rel_err(y, _reference(x, pw, bias)) < 1e-6


def test_cpu_dense_cache_follows_the_buffers(gen):
    """The dequantized weight is cached on CPU, and rebuilt after new weights are loaded."""
    first, second = random_layer(gen, 64, 32, 4, 32), random_layer(gen, 64, 32, 4, 32)
    module = Int4Linear.from_packed(first)
    x = torch.randn(3, 64, generator=gen)
    module(x)
    cached = module._dense_weight(x)
    assert module._dense_weight(x) is cached  # no second dequantization
    module.load_state_dict(second.tensors(), strict=True)
    assert rel_err(module(x), _reference(x, second, None)) < 1e-6
    uncached = Int4Linear.from_packed(first, dense_cache=False)
    assert uncached._dense_weight(x) is not uncached._dense_weight(x)


@pytest.mark.parametrize("act_order", ["reorder", "g_idx"])
def test_triton_backend_and_act_order_state_dict(kernels, gen, act_order):
    """The kernel path; act-order rows sorted in place, yet state_dict() is checkpoint order."""
    pw = random_layer(gen, 128, 48, 4, 32, act_order=True)
    bias = torch.randn(48, generator=gen).half()
    module = Int4Linear.from_packed(pw, bias, backend="triton", act_order=act_order).to(DEVICE)
    x = torch.randn(3, 128, generator=gen).to(DEVICE, torch.float16)
    y = module(x)
    assert rel_err(y.cpu(), _reference(x.cpu(), pw, bias)) <= UNIT_ROUNDOFF[torch.float16]
    assert (module.perm is not None) == (act_order == "reorder")
    if act_order == "reorder":
        assert not torch.equal(module.qweight.cpu(), pw.qweight)  # rows really were sorted
    state = module.state_dict()
    assert set(state) == {"qweight", "qzeros", "scales", "g_idx", "bias"}
    for name, tensor in pw.tensors().items():
        assert torch.equal(state[name].cpu(), tensor), name
    # a second module loaded from that state dict computes the same
    again = Int4Linear(128, 48, 4, 32, bias=True, backend="triton").to(DEVICE)
    again.load_state_dict(state)
    assert torch.equal(again(x), y)
    # moving a sorted module keeps it consistent (perm travels with the buffers)
    assert torch.equal(module.to(DEVICE)(x), y)
    # the reference path on sorted buffers undoes the sort
    module.backend = "reference"
    assert rel_err(module(x.float()).cpu(), _reference(x.cpu(), pw, bias)) < 1e-6
    module.backend = "triton"
    # loading checkpoint-order tensors into a sorted module drops the old order
    module.load_state_dict(state)
    assert torch.equal(module(x), y)


def test_dtype_casts_keep_fp16_scales(kernels, gen):
    """model.to(bfloat16) casts the bias, never the checkpoint's fp16 scales."""
    pw = random_layer(gen, 64, 32, 4, 32)
    module = Int4Linear.from_packed(pw, torch.randn(32, generator=gen).half(), backend="triton")
    module = module.to(DEVICE, torch.bfloat16)
    assert module.scales.dtype == torch.float16 and module.bias.dtype == torch.bfloat16
    assert module.qweight.dtype == torch.int32 and module.scales.device.type == DEVICE
    assert list(module.state_dict()) == ["qweight", "qzeros", "scales", "g_idx", "bias"]
    x = torch.randn(2, 64, generator=gen).to(DEVICE, torch.bfloat16)
    ref = _reference(x.cpu(), pw, module.bias.cpu())
    assert rel_err(module(x).cpu(), ref) <= UNIT_ROUNDOFF[torch.bfloat16]


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.ModuleDict(
            {"q_proj": nn.Linear(64, 96, bias=True), "o_proj": nn.Linear(96, 64, bias=False)}
        )
        self.norm = nn.LayerNorm(64)

    def forward(self, x):
        return self.attn["o_proj"](self.attn["q_proj"](self.norm(x)))


def test_replace_linear_on_meta_then_load_with_assign(gen):
    """The runtime's way: build on meta, swap by the checkpoint's names, load with assign=True."""
    real = _Block()
    q = random_layer(gen, 64, 96, 4, 32)
    o = random_layer(gen, 96, 64, 4, 32, act_order=True)
    q_bias = torch.randn(96, generator=gen).half()
    checkpoint = {**q.tensors("attn.q_proj"), "attn.q_proj.bias": q_bias, **o.tensors("attn.o_proj")}
    checkpoint |= {f"norm.{k}": v for k, v in real.norm.state_dict().items()}
    with torch.device("meta"):
        model = _Block()
    names = packed_layer_names(checkpoint)
    assert names == ["attn.o_proj", "attn.q_proj"]
    assert replace_linear(model, names, bits=4, group_size=32) == names
    assert model.attn["q_proj"].qweight.is_meta
    missing, unexpected = model.load_state_dict(checkpoint, strict=True, assign=True)
    assert not missing and not unexpected
    x = torch.randn(4, 64, generator=gen)
    h = _reference(real.norm(x), q, q_bias).float()
    assert rel_err(model(x), _reference(h, o, None)) < 1e-5


def test_from_checkpoint(gen):
    pw = random_layer(gen, 64, 32, 4, 64)
    tensors = {**pw.tensors("mlp.up"), "mlp.up.bias": torch.ones(32).half()}
    module = Int4Linear.from_checkpoint(tensors, "mlp.up", bits=4, group_size=64)
    assert module.bias is not None and torch.equal(module.bias, tensors["mlp.up.bias"])
    no_gidx = {k: v for k, v in tensors.items() if not k.endswith("g_idx")}
    module2 = Int4Linear.from_checkpoint(no_gidx, "mlp.up", bits=4, group_size=64)
    assert torch.equal(module2.g_idx, pw.g_idx)
    with pytest.raises(KeyError, match=r"no mlp\.down\.qweight, mlp\.down\.qzeros"):
        Int4Linear.from_checkpoint(tensors, "mlp.down", bits=4, group_size=64)
    with pytest.raises(ValueError, match=r"qzeros has shape \(1, 4\), expected \(2, 4\)"):
        Int4Linear.from_checkpoint(tensors, "mlp.up", bits=4, group_size=32)


def test_replace_linear_errors():
    model = _Block()
    with pytest.raises(ValueError, match=r"no module 'attn\.k'"):
        replace_linear(model, ["attn.k.proj"])
    with pytest.raises(ValueError, match=r"is LayerNorm, not an nn\.Linear"):
        replace_linear(model, ["norm"])
    with pytest.raises(ValueError, match=r"'attn\.v_proj' is missing"):
        replace_linear(model, ["attn.v_proj"])
    with pytest.raises(ValueError, match="backend one of"):
        Int4Linear(64, 32, backend="cuda")


def test_replace_linear_custom_make():
    model = _Block()
    made = []

    def make(name, linear):
        made.append((name, linear.in_features, linear.out_features))
        return nn.Identity()

    replace_linear(model, ["attn.o_proj"], make=make)
    assert made == [("attn.o_proj", 96, 64)] and isinstance(model.attn["o_proj"], nn.Identity)
