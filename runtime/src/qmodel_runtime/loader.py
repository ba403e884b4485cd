"""Artifact -> model: fetch, verify every digest, build on meta, swap in Int4Linear, load.

The artifact describes itself (design.md "The artifact"): ``config.json`` with an optional
``quantization_config`` (GPTQ v1), safetensors (one file or shards with an index), the
tokenizer, ``qmodel-manifest.json``. A layer is quantized exactly when the checkpoint holds
``<layer>.qweight``; nothing is inferred from file names. No file is read before the whole
folder verified against the manifest.

Hugging Face names map onto ``qmodel_runtime.model`` with q/k/v fused into ``wqkv`` and
gate/up into ``w13``. Packed layers fuse in their packed form (the v1 layout packs along
the input dimension, so output columns concatenate), so the fused layer is exactly the
three checkpoint layers side by side.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from qmodel_kernels import Int4Linear, layout
from qmodel_runtime import manifest as manifest_mod
from qmodel_runtime.model import ModelArgs, Transformer

log = logging.getLogger(__name__)

# our module -> the HF submodules fused into it, in output-column order
FUSED = {
    "attention.wqkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attention.wo": ("self_attn.o_proj",),
    "feed_forward.w13": ("mlp.gate_proj", "mlp.up_proj"),
    "feed_forward.w2": ("mlp.down_proj",),
}
NORMS = {"attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
PACKED_KEYS = ("qweight", "qzeros", "scales", "g_idx")


class ArtifactError(RuntimeError):
    """The artifact cannot be served (missing, unverified, unsupported); the message says why."""


@dataclass(frozen=True)
class QuantConfig:
    bits: int
    group_size: int
    desc_act: bool = False
    sym: bool = True

    @classmethod
    def from_hf(cls, qc: dict) -> QuantConfig:
        method = qc.get("quant_method")
        if method != "gptq":
            raise ArtifactError(f"quantization_config.quant_method is {method!r}; this runtime loads 'gptq'")
        fmt = qc.get("checkpoint_format", "gptq")
        if fmt != "gptq":
            raise ArtifactError(f"checkpoint_format {fmt!r} is not supported; expected the GPTQ v1 'gptq'")
        bits = int(qc.get("bits", 4))
        if bits not in layout.SUPPORTED_BITS:
            raise ArtifactError(f"quantization_config.bits {bits} is not one of {layout.SUPPORTED_BITS}")
        return cls(
            bits, int(qc.get("group_size", 128)), bool(qc.get("desc_act", False)), bool(qc.get("sym", True))
        )


@dataclass
class LoadedModel:
    model: Transformer
    args: ModelArgs
    quant: QuantConfig | None
    folder: Path
    manifest: dict
    eos_token_ids: tuple[int, ...]
    weight_bytes: int
    quantized_layers: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- fetching


def fetch_artifact(uri: str, cache_dir: Path, env: Mapping[str, str]) -> tuple[Path, bool]:
    """A local folder holding the artifact at ``uri`` -> (folder, verified already?).

    Local artifacts (a path, ``file://``, ``pvc://`` mounted in the pod) are read in place and
    verified by ``load_artifact``; ``s3://`` ones are downloaded into ``cache_dir`` by
    ``qmodel_runtime.storage``, which verifies every byte while streaming (and resumes)."""
    from qmodel_runtime import storage

    if "://" not in uri:
        uri = Path(uri).absolute().as_uri()
    settings = storage.StorageSettings.from_env(env)
    parsed = storage.parse_uri(uri, settings.pvc_root).as_prefix()
    if parsed.scheme == "file":
        if not parsed.path.is_dir():
            raise ArtifactError(f"artifact folder {parsed.path} does not exist (from --artifact {uri})")
        return parsed.path, False
    dest = Path(cache_dir) / hashlib.sha256(str(parsed).encode()).hexdigest()[:16]
    log.info("downloading %s into %s", parsed, dest)
    result = storage.download(parsed, dest, settings, storage.log_progress(f"download {parsed}"))
    return result.path, True


# --------------------------------------------------------------------------- reading


def read_config(folder: Path) -> tuple[ModelArgs, QuantConfig | None, dict]:
    path = Path(folder) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"cannot read {path}: {exc}") from exc
    qc = cfg.get("quantization_config")
    return ModelArgs.from_hf_config(cfg), (QuantConfig.from_hf(qc) if qc else None), cfg


def eos_ids(folder: Path, cfg: dict) -> tuple[int, ...]:
    """End-of-sequence ids: generation_config.json's, then config.json's."""
    ids: list[int] = []
    gen = Path(folder) / "generation_config.json"
    sources = [json.loads(gen.read_text())] if gen.is_file() else []
    for source in [*sources, cfg]:
        value = source.get("eos_token_id")
        for i in value if isinstance(value, list) else [value]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return tuple(ids)


class Checkpoint:
    """Name -> tensor over one safetensors file or an indexed set of shards (opened lazily)."""

    def __init__(self, folder: Path):
        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (folder / "model.safetensors").is_file():
            with safe_open(folder / "model.safetensors", "pt") as f:
                weight_map = dict.fromkeys(f.keys(), "model.safetensors")
        else:
            raise ArtifactError(f"{folder} has neither model.safetensors nor model.safetensors.index.json")
        self.folder, self.weight_map, self._open = folder, weight_map, {}

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise ArtifactError(f"the checkpoint has no tensor {name!r}")
        file = self.weight_map[name]
        if file not in self._open:
            self._open[file] = safe_open(self.folder / file, "pt")
        return self._open[file].get_tensor(name)


# --------------------------------------------------------------------------- building


def fuse_packed(parts: list[layout.PackedWeight]) -> layout.PackedWeight:
    """Concatenate packed layers along their outputs (same input, bits, groups and g_idx)."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    for p in parts[1:]:
        if (p.bits, p.group_size) != (first.bits, first.group_size) or not torch.equal(p.g_idx, first.g_idx):
            raise ArtifactError(
                "layers sharing an input disagree on bits, group size or g_idx; cannot fuse them"
            )
    zeros = [layout.unpack_dim1(p.qzeros, p.bits, p.out_features) for p in parts]  # stored zero-1 codes
    return layout.PackedWeight(
        qweight=torch.cat([p.qweight for p in parts], dim=1),
        qzeros=layout.pack_dim1(torch.cat(zeros, dim=1), first.bits),
        scales=torch.cat([p.scales for p in parts], dim=1),
        g_idx=first.g_idx,
        bits=first.bits,
        group_size=first.group_size,
    )


def quantized_linear(pw: layout.PackedWeight, bias: torch.Tensor | None, dtype, device) -> Int4Linear:
    """The module serving one packed layer: Triton kernels on a GPU, the PyTorch reference
    (weights dequantized once and cached) on CPU."""
    pw = layout.PackedWeight(
        pw.qweight.to(device),
        pw.qzeros.to(device),
        pw.scales.to(device),
        pw.g_idx.to(device),
        pw.bits,
        pw.group_size,
    )
    return Int4Linear.from_packed(pw, None if bias is None else bias.to(device, dtype))


def _hf_prefix(i: int, sub: str) -> str:
    return f"model.layers.{i}.{sub}"


def _load_linear(ckpt: Checkpoint, i: int, ours: str, subs: tuple[str, ...], quant, dtype, device):
    """-> (module, quantized?) for one of our Linears from its HF parts."""
    prefixes = [_hf_prefix(i, s) for s in subs]
    biases = [ckpt.get(f"{p}.bias") for p in prefixes if f"{p}.bias" in ckpt]
    if biases and len(biases) != len(prefixes):
        raise ArtifactError(f"layer {i}: only some of {subs} have a bias")
    bias = torch.cat(biases) if biases else None
    if all(f"{p}.qweight" in ckpt for p in prefixes):
        if quant is None:
            raise ArtifactError(f"{prefixes[0]}.qweight is packed but config.json has no quantization_config")
        parts = [
            layout.from_tensors({k: ckpt.get(f"{p}.{k}") for k in PACKED_KEYS}, quant.bits, quant.group_size)
            for p in prefixes
        ]
        return quantized_linear(fuse_packed(parts), bias, dtype, device), True
    weight = torch.cat([ckpt.get(f"{p}.weight") for p in prefixes])
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.to(device, dtype), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.to(device, dtype), requires_grad=False)
    return linear, False


def build_model(
    folder: Path, device, dtype, progress=None
) -> tuple[Transformer, ModelArgs, QuantConfig | None, list[str]]:
    """Build on meta, put every layer's real module in place, load the rest with assign=True."""
    args, quant, _ = read_config(folder)
    ckpt = Checkpoint(folder)
    with torch.device("meta"):
        model = Transformer(args)
    quantized: list[str] = []
    for i, layer in enumerate(model.layers):
        for ours, subs in FUSED.items():
            module, is_q = _load_linear(ckpt, i, ours, subs, quant, dtype, device)
            parent, name = ours.split(".")
            setattr(getattr(layer, parent), name, module)
            if is_q:
                quantized.append(f"layers.{i}.{ours}")
        if progress is not None:
            progress.update(1)
    state = {
        "tok_embeddings.weight": ckpt.get("model.embed_tokens.weight"),
        "norm.weight": ckpt.get("model.norm.weight"),
    }
    for i in range(args.n_layers):
        for ours, theirs in NORMS.items():
            state[f"layers.{i}.{ours}.weight"] = ckpt.get(f"{_hf_prefix(i, theirs)}.weight")
    if not args.tie_word_embeddings:
        state["output.weight"] = ckpt.get("lm_head.weight")
    state = {k: v.to(device, dtype) for k, v in state.items()}
    _, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    still_meta = [
        n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta and n != "rope"
    ]
    if still_meta or unexpected:
        raise ArtifactError(
            f"checkpoint does not match config.json: no weights for {still_meta[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    return model.eval().requires_grad_(False), args, quant, quantized


def module_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and persistent buffer (the weights), shared tensors once."""
    seen, total = set(), 0
    tensors = [
        *model.parameters(),
        *(b for n, b in model.named_buffers() if "kv_cache" not in n and n != "rope"),
    ]
    for t in tensors:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def load_artifact(folder: Path, device, dtype, verified: bool = False) -> LoadedModel:
    """Verify ``folder`` against its manifest (unless a download just did), then load it.
    Raises ArtifactError or ManifestError naming what is wrong."""
    folder = Path(folder)
    if verified:
        manifest = manifest_mod.load_manifest((folder / manifest_mod.MANIFEST_NAME).read_bytes())
    else:
        log.info("verifying %s against its manifest", folder)
        manifest = manifest_mod.verify_folder(folder)
    args, quant, cfg = read_config(folder)
    log.info(
        "loading %s (%d layers, dim %d, %s) onto %s as %s",
        args.model_type,
        args.n_layers,
        args.dim,
        f"{quant.bits}-bit g{quant.group_size}" if quant else "unquantized",
        device,
        dtype,
    )
    model, args, quant, quantized = build_model(folder, device, dtype)
    return LoadedModel(
        model, args, quant, folder, manifest, eos_ids(folder, cfg), module_bytes(model), quantized
    )


# --------------------------------------------------------------------------- random weights


def random_packed(
    k: int, n: int, bits: int, group_size: int, device, generator: torch.Generator
) -> layout.PackedWeight:
    """Random codes and zeros in checkpoint layout, scales ~ 1/(4 sqrt(K)) so activations stay
    O(1) through many layers (random int4 codes spread about +-4.6 steps)."""
    groups = layout.num_groups(k, group_size)
    info = torch.iinfo(torch.int32)
    rand = dict(dtype=torch.int32, device=device, generator=generator)
    qweight = torch.randint(info.min, info.max, (layout.packed_length(k, bits), n), **rand)
    zero_word = sum((2 ** (bits - 1) - 1) << (bits * i) for i in range(32 // bits))  # every zero 2^(bits-1)
    qzeros = torch.full(
        (groups, layout.packed_length(n, bits)),
        zero_word - (1 << 32) * (zero_word >= 1 << 31),
        dtype=torch.int32,
        device=device,
    )
    scales = torch.full((groups, n), 1 / (4 * k**0.5), dtype=torch.float16, device=device)
    return layout.PackedWeight(
        qweight, qzeros, scales, layout.default_g_idx(k, group_size, device), bits, group_size
    )


def random_model(
    args: ModelArgs, device, dtype, quant: QuantConfig | None = None, seed: int = 0
) -> Transformer:
    """A model of ``args``' shape with random weights, in the form ``build_model`` gives (fused
    layers; packed ones when ``quant`` is set): for benchmarks and tests of big shapes."""
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        model = Transformer(args)
    for layer in model.layers:
        for ours in FUSED:
            parent, name = ours.split(".")
            meta = getattr(getattr(layer, parent), name)
            k, n = meta.in_features, meta.out_features
            bias = None if meta.bias is None else torch.zeros(n, device=device, dtype=dtype)
            if quant is not None:
                module = quantized_linear(
                    random_packed(k, n, quant.bits, quant.group_size, device, g), bias, dtype, device
                )
            else:
                module = nn.Linear(k, n, bias=bias is not None, device="meta")
                module.weight = nn.Parameter(
                    torch.randn(n, k, device=device, generator=g).div_(k**0.5).to(dtype), requires_grad=False
                )
                if bias is not None:
                    module.bias = nn.Parameter(bias, requires_grad=False)
            setattr(getattr(layer, parent), name, module)
        for norm in (layer.attention_norm, layer.ffn_norm):
            norm.weight = nn.Parameter(torch.ones(args.dim, device=device, dtype=dtype), requires_grad=False)
    model.norm.weight = nn.Parameter(torch.ones(args.dim, device=device, dtype=dtype), requires_grad=False)
    emb = torch.randn(args.vocab_size, args.dim, device=device, generator=g).to(dtype)
    model.tok_embeddings.weight = nn.Parameter(emb, requires_grad=False)
    if args.tie_word_embeddings:
        model.tie_weights()
    else:
        out = torch.randn(args.vocab_size, args.dim, device=device, generator=g).div_(args.dim**0.5).to(dtype)
        model.output.weight = nn.Parameter(out, requires_grad=False)
    return model.eval().requires_grad_(False)
