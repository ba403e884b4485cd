"""``Int4Linear``: a GPTQ-packed Linear, and ``replace_linear``, the module swap.

The module holds the checkpoint tensors as buffers named as in GPTQ v1 checkpoints
(qweight, qzeros, scales, g_idx, bias), so ``load_state_dict`` takes a checkpoint's
entries as they are, also into a model built on the meta device (``assign=True``).

forward(x) picks a backend per call:
- CUDA, fp16/bf16 x, 2/4/8-bit: the Triton kernels (qmodel_kernels.matmul). The kernel form
  is built once, at the first such call: act-order layers get their rows sorted by group
  in place (``perm`` records the order; ``state_dict()`` still returns checkpoint order).
- otherwise (CPU, fp32 x, 3-bit): the PyTorch reference, x @ dequant(W). On CPU the
  dequantized weight is cached per module in x's dtype (``dense_cache``): dequantizing
  costs several times the matmul itself, and SmolLM2-135M's cache is ~0.4 GB in fp32.
  On a GPU nothing is cached (the point is to keep 4-bit weights in memory), so this
  path dequantizes at every call.

The Triton modules are imported at the first kernel call, not with this module: whether
Triton compiles or interprets kernels (TRITON_INTERPRET) is fixed when they are imported,
and merely building a model must not fix it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from qmodel_kernels import layout
from qmodel_kernels.quant_weight import ACT_ORDER_MODES, ACTIVATION_DTYPES, KERNEL_BITS, QuantWeight, prepare

BACKENDS = ("auto", "triton", "reference")
PACKED_KEYS = ("qweight", "qzeros", "scales", "g_idx")


class Int4Linear(nn.Module):
    """y = x @ dequant(W) + bias for a GPTQ v1 layer (2, 3, 4 or 8 bits despite the name)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int = 4,
        group_size: int = 128,
        bias: bool = False,
        *,
        device=None,
        bias_dtype: torch.dtype = torch.float16,
        act_order: str = "reorder",
        backend: str = "auto",
        dense_cache: bool | None = None,
    ) -> None:
        super().__init__()
        if act_order not in ACT_ORDER_MODES or backend not in BACKENDS:
            raise ValueError(
                f"act_order must be one of {ACT_ORDER_MODES} and backend one of {BACKENDS}; "
                f"got {act_order!r}, {backend!r}"
            )
        groups = layout.num_groups(in_features, group_size)
        make = torch.empty if torch.device(device or "cpu").type == "meta" else torch.zeros
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        self.act_order, self.backend, self.dense_cache = act_order, backend, dense_cache
        shapes = {
            "qweight": (layout.packed_length(in_features, bits), out_features),
            "qzeros": (groups, layout.packed_length(out_features, bits)),
        }
        self.register_buffer("qweight", make(shapes["qweight"], dtype=torch.int32, device=device))
        self.register_buffer("qzeros", make(shapes["qzeros"], dtype=torch.int32, device=device))
        self.register_buffer("scales", make(groups, out_features, dtype=torch.float16, device=device))
        self.register_buffer("g_idx", layout.default_g_idx(in_features, group_size, device))
        self.register_buffer("bias", make(out_features, dtype=bias_dtype, device=device) if bias else None)
        # int32 [K]: kernel row i is checkpoint row perm[i] (act-order sorted at first kernel call)
        self.register_buffer("perm", None, persistent=False)
        self._kernel_weight: tuple[tuple, QuantWeight] | None = None
        self._dense: tuple[tuple, torch.Tensor] | None = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_packed(cls, pw: layout.PackedWeight, bias: torch.Tensor | None = None, **kwargs) -> Int4Linear:
        """From one layer's ``PackedWeight`` (tensors are used as they are, on their device)."""
        module = cls(
            pw.in_features, pw.out_features, pw.bits, pw.group_size, bias is not None, device="meta", **kwargs
        )
        module.qweight, module.qzeros, module.scales = pw.qweight, pw.qzeros, pw.scales
        module.g_idx = pw.g_idx.to(torch.int32)
        module.bias = bias
        return module

    @classmethod
    def from_checkpoint(
        cls,
        tensors: dict[str, torch.Tensor],
        prefix: str,
        bits: int,
        group_size: int,
        bias: torch.Tensor | None = None,
        **kwargs,
    ) -> Int4Linear:
        """From checkpoint entries ``<prefix>.qweight`` etc.; ``bias`` defaults to ``<prefix>.bias``.

        A missing g_idx (checkpoints written without act-order) means k // group_size.
        """
        missing = [k for k in PACKED_KEYS[:3] if f"{prefix}.{k}" not in tensors]
        if missing:
            raise KeyError(
                f"the checkpoint has no {', '.join(f'{prefix}.{k}' for k in missing)}: a quantized "
                f"layer needs {prefix}.qweight, .qzeros and .scales (and optionally .g_idx, .bias)"
            )
        parts = {k: tensors[f"{prefix}.{k}"] for k in PACKED_KEYS if f"{prefix}.{k}" in tensors}
        if "g_idx" not in parts:
            k = parts["qweight"].shape[0] * 32 // bits
            parts["g_idx"] = layout.default_g_idx(k, group_size, parts["qweight"].device)
        bias = tensors.get(f"{prefix}.bias") if bias is None else bias
        return cls.from_packed(layout.from_tensors(parts, bits, group_size), bias, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}, backend={self.backend}"
        )

    # ------------------------------------------------------------------ checkpoint view

    def _buffers_as_packed(self) -> layout.PackedWeight:
        """The buffers as they are (rows in kernel order once ``perm`` is set)."""
        return layout.PackedWeight(
            self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.group_size
        )

    def packed(self) -> layout.PackedWeight:
        """The layer in checkpoint row order, whatever the kernels did to the buffers."""
        pw = self._buffers_as_packed()
        return pw if self.perm is None else layout.permute_rows(pw, torch.argsort(self.perm.long()))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.perm is not None:  # rows were sorted for the kernels: save checkpoint order
            pw = self.packed()
            destination[prefix + "qweight"], destination[prefix + "g_idx"] = pw.qweight, pw.g_idx

    def _apply(self, fn, recurse=True):
        """``model.to(dtype)``/``.half()`` cast the bias but leave the scales fp16 as stored:
        bf16 scales would lose 3 of fp16's 11 significant bits. Scales follow the device only."""
        scales = self._buffers["scales"]
        self._buffers["scales"] = None  # None buffers are skipped; the key keeps its place
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers["scales"] = scales
        if scales is not None:
            self._buffers["scales"] = scales.to(self.qweight.device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.perm, self._kernel_weight, self._dense = None, None, None  # new tensors: checkpoint order
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._use_kernels(x):
            from qmodel_kernels.matmul import quant_matmul  # at first use: see the module docstring

            return quant_matmul(x, self.kernel_weight(), self.bias)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self._dense_weight(x), bias)

    def _use_kernels(self, x: torch.Tensor) -> bool:
        if self.backend != "auto":
            return self.backend == "triton"
        return x.is_cuda and self.bits in KERNEL_BITS and x.dtype in ACTIVATION_DTYPES

    def _signature(self) -> tuple:
        return tuple((t.device, t.data_ptr()) for t in (self.qweight, self.qzeros, self.scales, self.g_idx))

    def kernel_weight(self) -> QuantWeight:
        """The kernel form, built at the first call and again only when the buffers change."""
        if self._kernel_weight is not None and self._kernel_weight[0] == self._signature():
            return self._kernel_weight[1]
        if self.perm is not None:  # already sorted (e.g. then moved with .to()): rebuild the view only
            qw = QuantWeight(
                self.qweight,
                self.qzeros,
                self.scales,
                None,
                self.perm,
                self.bits,
                self.group_size,
                layout.symmetric_zero(self._buffers_as_packed()) or 0,
            )
        else:
            qw = prepare(self.packed(), self.act_order)
            if qw.perm is not None:  # adopt the sorted rows: the checkpoint-order copy is freed
                self.qweight, self.g_idx, self.perm = qw.qweight, qw.packed().g_idx, qw.perm
        self._kernel_weight = (self._signature(), qw)
        return qw

    def _dense_weight(self, x: torch.Tensor) -> torch.Tensor:
        """W^T [N, K] in x's dtype, for F.linear; cached on CPU unless dense_cache says otherwise."""
        key = (*self._signature(), x.dtype, x.device)
        if self._dense is not None and self._dense[0] == key:
            return self._dense[1]
        weight = layout.dequantize_ref(self._buffers_as_packed(), torch.float32)  # [K, N], kernel row order
        if self.perm is not None:
            weight = weight[torch.argsort(self.perm.long())]
        weight = weight.t().to(x.device, x.dtype).contiguous()
        if self.dense_cache if self.dense_cache is not None else x.device.type == "cpu":
            self._dense = (key, weight)
        return weight


def packed_layer_names(keys: Iterable[str]) -> list[str]:
    """Module names of the quantized layers in a checkpoint: every ``<name>.qweight`` key."""
    return sorted(k[: -len(".qweight")] for k in keys if k.endswith(".qweight"))


def replace_linear(
    model: nn.Module,
    quantized_names: Iterable[str],
    *,
    bits: int = 4,
    group_size: int = 128,
    make: Callable[[str, nn.Linear], nn.Module] | None = None,
) -> list[str]:
    """Swap the named ``nn.Linear`` modules for ``Int4Linear`` (or ``make(name, linear)``).

    Works on a model built on the meta device: the new modules' buffers are created where
    the old weights are, ready for ``model.load_state_dict(checkpoint, assign=True)``.
    -> the names swapped, in order.
    """
    swapped = []
    for name in quantized_names:
        parent_name, _, attr = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
        except AttributeError as exc:
            raise ValueError(
                f"the model has no module {parent_name!r} (from the quantized layer {name!r}); "
                "quantized layer names come from the checkpoint's '<name>.qweight' keys"
            ) from exc
        old = getattr(parent, attr, None)
        if not isinstance(old, nn.Linear):
            raise ValueError(
                f"{name!r} is {type(old).__name__ if old is not None else 'missing'}, not an "
                "nn.Linear: only Linear layers can be swapped for Int4Linear"
            )
        if make is not None:
            new = make(name, old)
        else:
            new = Int4Linear(
                old.in_features,
                old.out_features,
                bits,
                group_size,
                old.bias is not None,
                device=old.weight.device,
                bias_dtype=old.weight.dtype,
            )
        setattr(parent, attr, new)
        swapped.append(name)
    return swapped
