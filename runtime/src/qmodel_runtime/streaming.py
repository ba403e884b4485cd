"""Run a decoder-only model one layer at a time, so the full model never has to fit on the device.

The model is built on the meta device from its config; only the parts outside the decoder
layers (embeddings, final norm, lm_head, rotary tables) are materialized, on the compute
device. Decoder layer i is materialized when it is visited, from tensors read lazily out of
the safetensors files (``safe_open`` gives per-tensor access, so a model larger than RAM
works), and released afterwards. Peak device memory is one layer plus the activations.

Running the model's own forward around the layers keeps this generic across the Llama
family: a stand-in at every layer position records the arguments the model passes to
each layer (attention mask, rotary position embeddings, ...), and another stand-in feeds a
final hidden state back so the model's own final norm and lm_head produce the logits.

A pass over all layers: ``embed`` each chunk of windows -> for each layer ``load_layer``,
``run_layer`` on every chunk, ``release_layer`` -> ``logits``. ``perplexity`` does exactly
that and scores the logits with ``qmodel_runtime.evaluate.window_nll``.
"""

from __future__ import annotations

import json
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from qmodel_runtime.evaluate import PerplexityResult, window_nll
from qmodel_runtime.progress import Progress

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class ModelError(ValueError):
    """The model folder cannot be streamed (missing files, unsupported architecture); the
    message says what to change."""


# --------------------------------------------------------------------------- weights on disk


class SafetensorsWeights:
    """Lazy, per-tensor access to a model folder's safetensors (one file or an index of shards)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.key_file = _key_files(self.folder)

    def keys(self) -> list[str]:
        return list(self.key_file)

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, opening each file once."""
        by_file: dict[str, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.key_file[key], []).append(key)
        out = {}
        for fname, names in by_file.items():
            with safe_open(self.folder / fname, framework="pt") as fh:
                for key in names:
                    out[key] = fh.get_tensor(key)
        return out


def tensors_under(weights, prefix: str) -> dict[str, torch.Tensor]:
    """Every tensor of ``weights`` whose name starts with ``prefix``, keyed by the rest."""
    keys = [k for k in weights.keys() if k.startswith(prefix)]
    return {k[len(prefix) :]: v for k, v in weights.read(keys).items()}


def _key_files(folder: Path) -> dict[str, str]:
    """tensor name -> file name, from the shard index or the single file's header."""
    if (folder / INDEX_FILE).is_file():
        index = json.loads((folder / INDEX_FILE).read_text())
        return dict(index["weight_map"])
    if (folder / SINGLE_FILE).is_file():
        with safe_open(folder / SINGLE_FILE, framework="pt") as fh:
            return {key: SINGLE_FILE for key in fh.keys()}
    found = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    hint = f" (found {', '.join(found[:3])}: convert them to safetensors first)" if found else ""
    raise ModelError(f"{folder} has no {SINGLE_FILE} or {INDEX_FILE}{hint}")


# --------------------------------------------------------------------------- the model skeleton


def compute_dtype(device: torch.device, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
    """fp32 on CPU (half-precision matmuls are slow there); on a GPU the checkpoint's half
    dtype, fp16 when it was stored in fp32 (the GPTQ reference runs layers in fp16)."""
    if device.type == "cpu":
        return torch.float32
    if checkpoint_dtype in (torch.float16, torch.bfloat16):
        return checkpoint_dtype
    return torch.float16


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList holding the decoder layers (``model.layers`` in the Llama family)."""
    count = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count and count > 0:
            if any(isinstance(m, nn.Linear) for m in module[0].modules()):
                return name, module
    raise ModelError(
        f"{type(model).__name__}: no list of {count} decoder layers with Linear layers found; "
        "only decoder-only transformers (Llama, Mistral, Qwen2, SmolLM, ...) can be quantized"
    )


def build_skeleton(config, dtype: torch.dtype) -> nn.Module:
    """The causal-LM module tree on the meta device (no memory), or ModelError."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (ValueError, KeyError, ImportError) as exc:
        raise ModelError(
            f"architecture {_arch(config)!r} is not a causal language model we can load: {exc}"
        ) from exc


def _arch(config) -> str:
    return (getattr(config, "architectures", None) or [config.model_type])[0]


class StreamedModel:
    """A causal LM whose decoder layers visit ``device`` one at a time."""

    def __init__(self, model: nn.Module, weights, device: torch.device, dtype: torch.dtype):
        self.model, self.weights, self.device, self.dtype = model, weights, device, dtype
        self.config = model.config
        self.prefix, self.layers = find_decoder_layers(model)
        self._materialize_outside_layers()

    @classmethod
    def open(cls, folder: Path, device: torch.device | str = "cpu", weights=None) -> StreamedModel:
        """Stream the HF model in ``folder``; ``weights`` overrides where tensors come from
        (``qmodel_runtime.checkpoint.DequantizedWeights`` for a quantized artifact)."""
        from transformers import AutoConfig

        folder, device = Path(folder), torch.device(device)
        if not (folder / "config.json").is_file():
            raise ModelError(f"{folder} has no config.json: is it a Hugging Face model folder?")
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        config.__dict__.pop("quantization_config", None)  # we load dequantized tensors ourselves
        dtype = compute_dtype(device, getattr(config, "dtype", None))
        weights = weights if weights is not None else SafetensorsWeights(folder)
        model = build_skeleton(config, dtype)
        return cls(model.eval(), weights, device, dtype)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def _materialize_outside_layers(self) -> None:
        inner = f"{self.prefix}."
        tensors = self.weights.read([k for k in self.weights.keys() if not k.startswith(inner)])
        with _layers_replaced(self.layers, [nn.Identity() for _ in self.layers]):
            result = self.model.load_state_dict(tensors, strict=False, assign=True)
            self.model.tie_weights()
            missing = [k for k, p in self.model.named_parameters() if p.is_meta]
            if missing:
                raise ModelError(f"the checkpoint lacks {', '.join(missing[:5])}")
            if result.unexpected_keys:
                log.warning(
                    "ignoring %d unexpected tensors, e.g. %s",
                    len(result.unexpected_keys),
                    result.unexpected_keys[0],
                )
            self._init_buffers(self.model)
            self.model.to(self.device, self.dtype)

    def _init_buffers(self, modules: nn.Module, device: torch.device | str = "cpu") -> None:
        """Non-persistent buffers (rotary inverse frequencies) are not in checkpoints: the
        model's own initializer computes them (what transformers does after a meta-device load)."""
        for module in modules.modules():
            names = module._non_persistent_buffers_set
            if not names or next(module.parameters(recurse=False), None) is not None:
                continue  # _init_weights would also re-initialize loaded parameters
            for name in names:
                module._buffers[name] = torch.empty_like(module._buffers[name], device=device)
            self.model._init_weights(module)
        if any(b.is_meta for b in modules.buffers()):
            raise ModelError(f"{_arch(self.config)}: cannot initialize its non-persistent buffers")

    def load_layer(self, index: int) -> nn.Module:
        """Decoder layer ``index`` materialized on the device from the weights."""
        layer = self.layers[index]
        layer.to_empty(device=self.device)
        tensors = tensors_under(self.weights, f"{self.prefix}.{index}.")
        try:
            layer.load_state_dict(tensors, strict=True)
        except RuntimeError as exc:
            raise ModelError(f"layer {index} does not match the checkpoint: {exc}") from exc
        self._init_buffers(layer, self.device)
        return layer.eval()

    def release_layer(self, index: int) -> None:
        self.layers[index].to("meta")

    def embed(self, ids: torch.Tensor) -> LayerInputs:
        """Token ids [B, T] -> the first layer's input and every layer's call arguments."""
        calls: list[tuple[tuple, dict]] = []
        recorders = [_Recorder(calls, last=i == self.num_layers - 1) for i in range(self.num_layers)]
        for rec, layer in zip(recorders, self.layers, strict=True):
            rec.copy_attributes(layer)
        with _layers_replaced(self.layers, recorders):
            try:
                self.model(ids.to(self.device), use_cache=False)
            except _Stop as stop:
                return LayerInputs(stop.hidden, calls)
        raise ModelError("the model's forward never reached its decoder layers")

    def logits(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The last layer's output [B, T, H] -> logits [B, T, V] through the model's own head."""
        replay = [_Replay(hidden if i == 0 else None) for i in range(self.num_layers)]
        for rep, layer in zip(replay, self.layers, strict=True):
            rep.copy_attributes(layer)
        with _layers_replaced(self.layers, replay):
            return self.model(ids.to(self.device), use_cache=False).logits


@dataclass
class LayerInputs:
    """One chunk of windows between layers: the hidden state and each layer's call arguments."""

    hidden: torch.Tensor  # [B, T, H]
    calls: list[tuple[tuple, dict]]  # per layer: (extra positional args, keyword args)


def run_layer(layer: nn.Module, index: int, inputs: LayerInputs) -> torch.Tensor:
    args, kwargs = inputs.calls[index]
    out = layer(inputs.hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


# --------------------------------------------------------------------------- stand-in layers


class _Stop(Exception):
    def __init__(self, hidden: torch.Tensor | None = None):
        super().__init__("stop the forward pass here")
        self.hidden = hidden


class _StandIn(nn.Module):
    # Attributes some models read from their layers while looping over them.
    _COPIED = ("attention_type", "layer_idx", "is_sliding")

    def copy_attributes(self, layer: nn.Module) -> None:
        for name in self._COPIED:
            if hasattr(layer, name):
                setattr(self, name, getattr(layer, name))


class _Recorder(_StandIn):
    """Records the arguments of its layer's call and passes the hidden state through."""

    def __init__(self, calls: list, last: bool):
        super().__init__()
        self.calls, self.last = calls, last

    def forward(self, hidden_states, *args, **kwargs):
        self.calls.append((args, kwargs))
        if self.last:  # every layer recorded: skip the final norm and the lm_head
            raise _Stop(hidden_states)
        return hidden_states


class _Replay(_StandIn):
    """The first layer's slot returns a stored hidden state; the others pass it through."""

    def __init__(self, hidden: torch.Tensor | None):
        super().__init__()
        self.hidden = hidden

    def forward(self, hidden_states, *args, **kwargs):
        return self.hidden if self.hidden is not None else hidden_states


@contextmanager
def _layers_replaced(layers: nn.ModuleList, modules: list[nn.Module]):
    saved = list(layers)
    for i, m in enumerate(modules):
        layers[i] = m
    try:
        yield
    finally:
        for i, m in enumerate(saved):
            layers[i] = m


# --------------------------------------------------------------------------- activations


def activation_store(device: torch.device, needed_bytes: int, free_bytes: int | None) -> torch.device:
    """Keep activations on the device when they and a layer's working set fit (half of free
    memory), else in CPU memory, moved over chunk by chunk."""
    if device.type == "cpu" or free_bytes is None:
        return device
    return device if needed_bytes <= free_bytes // 2 else torch.device("cpu")


def free_device_memory(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return free


def embed_all(sm: StreamedModel, windows: torch.Tensor, batch_size: int) -> list[LayerInputs]:
    """The first layer's inputs for all windows, in chunks, stored where they fit."""
    hidden = sm.config.hidden_size
    needed = windows.numel() * hidden * torch.finfo(sm.dtype).bits // 8
    store = activation_store(sm.device, needed, free_device_memory(sm.device))
    if store != sm.device:
        log.info("activations (%.1f GiB) kept in CPU memory", needed / 2**30)
    chunks = []
    for ids in windows.split(batch_size):
        inputs = sm.embed(ids)
        inputs.hidden = inputs.hidden.to(store)
        chunks.append(inputs)
    return chunks


def forward_layer(sm: StreamedModel, layer: nn.Module, index: int, chunks: list[LayerInputs]) -> None:
    """Replace every chunk's hidden state by ``layer``'s output."""
    for inputs in chunks:
        store = inputs.hidden.device
        on_device = LayerInputs(inputs.hidden.to(sm.device), inputs.calls)
        inputs.hidden = run_layer(layer, index, on_device).to(store)


@torch.no_grad()
def perplexity(sm: StreamedModel, windows: torch.Tensor, batch_size: int = 8, desc: str = "perplexity"):
    """Perplexity over ``windows`` [n, T] with the layers streamed (same number as
    ``evaluate.perplexity`` on the whole model)."""
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [n, T] with T >= 2, got {tuple(windows.shape)}")
    n, length = windows.shape
    progress = Progress(desc, sm.num_layers + 1, unit="layers")
    chunks = embed_all(sm, windows, batch_size)
    for i in range(sm.num_layers):
        layer = sm.load_layer(i)
        forward_layer(sm, layer, i, chunks)
        sm.release_layer(i)
        progress.update(1)
    nll_sum = 0.0
    for inputs, ids in zip(chunks, windows.split(batch_size), strict=True):
        for h, w in zip(inputs.hidden.split(1), ids.split(1), strict=True):  # bounds [T, V] logits
            nll_sum += float(window_nll(sm.logits(h.to(sm.device), w), w).double().sum())
    tokens = n * (length - 1)
    ppl = math.exp(nll_sum / tokens)
    progress.update(1, note=f"ppl {ppl:.3f}")
    return PerplexityResult(ppl, nll_sum, tokens, n, progress.seconds)
