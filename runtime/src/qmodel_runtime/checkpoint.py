"""The quantized checkpoint: GPTQ v1 safetensors that Hugging Face, optimum and vLLM load.

Folder layout (design.md, "The artifact")::

    config.json                  the source config + quantization_config, dtype float16
    quantize_config.json         the same settings, for older loaders
    model.safetensors            or model-0000i-of-0000n.safetensors + model.safetensors.index.json
    tokenizer files, generation_config.json, ...   copied from the source folder
    qmodel-manifest.json         written LAST by ``write_manifest`` (qmodel_runtime.manifest)

Per quantized Linear ``<name>``: ``<name>.qweight``, ``.qzeros``, ``.scales``, ``.g_idx``
(packed by ``qmodel_kernels.layout``, the one module that owns the layout) and ``.bias``
when the Linear has one. Every other tensor (embeddings, norms, lm_head) is stored in
fp16, as GPTQ loaders expect. Layers arrive one at a time and shards are written as soon
as they are full, so the packed model never has to be held in memory at once.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from qmodel_kernels import layout
from qmodel_runtime import manifest
from qmodel_runtime.quantizer import QuantConfig, QuantizedWeight
from qmodel_runtime.streaming import INDEX_FILE, SINGLE_FILE, SafetensorsWeights, StreamedModel, tensors_under

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 4 << 30  # 4 GiB: what Hugging Face's hub tooling handles comfortably
PACKED = ("qweight", "qzeros", "scales", "g_idx")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")
_WRITTEN = {"config.json", "quantize_config.json", INDEX_FILE, manifest.MANIFEST_NAME}
_FP16_MAX = torch.finfo(torch.float16).max


class ShardWriter:
    """Safetensors shards of at most ``max_bytes`` each, written as tensors arrive."""

    def __init__(self, folder: Path, max_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        self.folder, self.max_bytes = Path(folder), max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[dict[str, int]] = []  # per written shard: tensor name -> bytes
        self.total_bytes = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            size = tensor.numel() * tensor.element_size()
            if self.pending and self.pending_bytes + size > self.max_bytes:
                self._flush()
            self.pending[name] = tensor.detach().to("cpu").contiguous()
            self.pending_bytes += size
            self.total_bytes += size

    def _flush(self) -> None:
        save_file(self.pending, self.folder / self._partial(len(self.shards)), metadata={"format": "pt"})
        self.shards.append({k: v.numel() * v.element_size() for k, v in self.pending.items()})
        self.pending, self.pending_bytes = {}, 0

    @staticmethod
    def _partial(i: int) -> str:
        return f".partial-{i:05d}.safetensors"  # hidden: never listed in a manifest

    def close(self) -> list[str]:
        """Final names (one file, or shards plus the index); -> the files written."""
        if self.pending or not self.shards:
            self._flush()
        n = len(self.shards)
        names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, name in enumerate(names):
            (self.folder / self._partial(i)).replace(self.folder / name)
        if n == 1:
            return names
        weight_map = {key: name for name, shard in zip(names, self.shards, strict=True) for key in shard}
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return [*names, INDEX_FILE]


def _fp16(name: str, tensor: torch.Tensor) -> torch.Tensor:
    if not tensor.is_floating_point():
        return tensor
    peak = float(tensor.abs().max()) if tensor.numel() else 0.0
    if peak > _FP16_MAX:
        raise ValueError(f"{name} holds {peak:.3g}, beyond fp16's range: GPTQ checkpoints store it in fp16")
    return tensor.to(torch.float16)


class CheckpointWriter:
    """Collects a model's quantized layers (``add_layer`` is a ``sequential.LayerSink``) and
    the rest of its tensors, then config files (``write_files``) and the manifest
    (``write_manifest``, after the checkpoint has been evaluated)."""

    def __init__(
        self,
        folder: Path,
        source: Path,
        layers_prefix: str,
        cfg: QuantConfig,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    ):
        self.folder, self.source, self.prefix, self.cfg = Path(folder), Path(source), layers_prefix, cfg
        self.folder.mkdir(parents=True, exist_ok=True)
        self.weights = SafetensorsWeights(self.source)
        self.shards = ShardWriter(self.folder, max_shard_bytes)
        self.layers_done: set[int] = set()

    def add_layer(self, index: int, results: dict[str, QuantizedWeight]) -> None:
        """Packed Linears of decoder layer ``index`` plus its other tensors (norms, biases)."""
        prefix = f"{self.prefix}.{index}."
        tensors = {}
        for name, qw in results.items():
            tensors.update(qw.pack().tensors(prefix + name))
        replaced = {f"{name}.weight" for name in results}
        for key, value in tensors_under(self.weights, prefix).items():
            if key not in replaced:
                tensors[prefix + key] = _fp16(prefix + key, value)
        self.shards.add(tensors)
        self.layers_done.add(index)

    def write_files(self) -> None:
        """Everything outside the layers, the config files and the side files (no manifest yet:
        the checkpoint can now be read back and evaluated)."""
        missing = sorted(set(range(self._num_layers())) - self.layers_done)
        if missing:
            raise RuntimeError(f"layers {missing[:5]} were never added; the checkpoint would be incomplete")
        inner = f"{self.prefix}."
        rest = [k for k in self.weights.keys() if not k.startswith(inner)]
        self.shards.add({k: _fp16(k, v) for k, v in self.weights.read(rest).items()})
        self.shards.close()
        write_configs(self.folder, self.source, self.cfg)
        copy_side_files(self.source, self.folder)

    def write_manifest(self, metadata: dict | None = None) -> tuple[dict, str]:
        """``qmodel-manifest.json``, LAST; -> (manifest, its digest)."""
        return manifest.write_manifest(self.folder, metadata)

    def _num_layers(self) -> int:
        config = json.loads((self.source / "config.json").read_text())
        return int(config.get("num_hidden_layers", max(self.layers_done, default=-1) + 1))


def write_configs(folder: Path, source: Path, cfg: QuantConfig) -> None:
    """config.json (the source's, as written, plus quantization_config) and quantize_config.json."""
    config = json.loads((Path(source) / "config.json").read_text())
    qconfig = cfg.hf_quantization_config()
    config["quantization_config"] = qconfig
    config["dtype"] = config["torch_dtype"] = "float16"  # "torch_dtype": the key older loaders read
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (folder / "quantize_config.json").write_text(json.dumps(qconfig, indent=2, sort_keys=True) + "\n")


def copy_side_files(source: Path, folder: Path) -> list[str]:
    """Tokenizer files, generation_config.json, chat template, license...: every top-level
    file of the source that is not weights or a config we write ourselves."""
    copied = []
    for path in sorted(Path(source).iterdir()):
        name = path.name
        if not path.is_file() or name.startswith(".") or name in _WRITTEN or name.endswith(_WEIGHT_SUFFIXES):
            continue
        shutil.copyfile(path, folder / name)
        copied.append(name)
    return copied


# --------------------------------------------------------------------------- reading it back


def read_quantization_config(folder: Path) -> dict:
    config = json.loads((Path(folder) / "config.json").read_text())
    qc = config.get("quantization_config")
    if not qc or qc.get("quant_method") != "gptq":
        raise ValueError(f"{folder}/config.json has no GPTQ quantization_config")
    return qc


class DequantizedWeights:
    """A GPTQ v1 checkpoint seen as plain tensors: ``<name>.weight`` [out, in] rebuilt from
    the packed tensors through ``layout.dequantize_ref`` (what a loader computes). Lets
    ``StreamedModel`` evaluate exactly the checkpoint that was written."""

    def __init__(self, folder: Path):
        self.inner = SafetensorsWeights(folder)
        qc = read_quantization_config(folder)
        self.bits, self.group_size = int(qc["bits"]), int(qc["group_size"])
        names = set(self.inner.keys())
        self.quantized = {k[: -len(".qweight")] for k in names if k.endswith(".qweight")}

    def keys(self) -> list[str]:
        packed = {f"{q}.{p}" for q in self.quantized for p in PACKED}
        plain = [k for k in self.inner.keys() if k not in packed]
        return plain + [f"{q}.weight" for q in sorted(self.quantized)]

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        want = [
            k for k in keys if k.removesuffix(".weight") not in self.quantized or not k.endswith(".weight")
        ]
        out = self.inner.read(want)
        for key in keys:
            base = key.removesuffix(".weight")
            if key.endswith(".weight") and base in self.quantized:
                raw = self.inner.read([f"{base}.{p}" for p in PACKED])
                packed = layout.from_tensors(
                    {p: raw[f"{base}.{p}"] for p in PACKED}, self.bits, self.group_size
                )
                out[key] = layout.dequantize_ref(packed).t().contiguous()
        return out


def open_quantized(folder: Path, device: torch.device | str = "cpu") -> StreamedModel:
    """The checkpoint in ``folder`` as a streamed model with dequantized weights (for perplexity)."""
    return StreamedModel.open(folder, device, weights=DequantizedWeights(folder))
