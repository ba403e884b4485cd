"""Check a source model before any heavy work, and collect the shape facts the operator needs.

Everything here reads config.json and safetensors headers and builds the model on the meta
device (no weights, no memory), so a model that cannot be quantized is refused in seconds
with a reason the user can act on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from safetensors import SafetensorError
from torch import nn

from qmodel_runtime import streaming
from qmodel_runtime.jobs.spec import InputError
from qmodel_runtime.quantizer import QuantConfig

WORD_BITS = 32


@dataclass(frozen=True)
class ModelInfo:
    """docs/contracts.md, result.model (camelCase in JSON)."""

    architecture: str
    layers: int
    hidden_size: int
    intermediate_size: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    tied_embeddings: bool
    max_position_embeddings: int
    parameters: int

    def to_json(self) -> dict:
        return {_camel(k): v for k, v in asdict(self).items()}


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


def inspect_model(folder: Path, cfg: QuantConfig) -> ModelInfo:
    """ModelInfo of the model in ``folder``; InputError when it is missing files, has an
    architecture we cannot stream, or Linear shapes the chosen bit width cannot pack."""
    from transformers import AutoConfig

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"source {folder} is not a folder; point source.uri at a Hugging Face model folder")
    if not (folder / "config.json").is_file():
        raise InputError(
            f"source {folder} has no config.json; point source.uri at a Hugging Face model folder"
        )
    try:
        weights = streaming.SafetensorsWeights(folder)
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        config.__dict__.pop("quantization_config", None)
        skeleton = streaming.build_skeleton(config, dtype=None)
        _, layers = streaming.find_decoder_layers(skeleton)
    except streaming.ModelError as exc:
        raise InputError(str(exc)) from None
    except (ValueError, KeyError, OSError, TypeError) as exc:  # unknown model_type, bad JSON, a list
        raise InputError(f"source {folder}: cannot read its config: {exc}") from None
    except SafetensorError as exc:  # a truncated or foreign file named *.safetensors
        raise InputError(f"source {folder}: a weights file is not readable safetensors: {exc}") from None
    _check_decoder_only(config, skeleton)
    _check_packable(layers, cfg)
    _check_complete(config, skeleton, set(weights.keys()))
    return _facts(config, skeleton)


def _arch(config) -> str:
    return (getattr(config, "architectures", None) or [config.model_type])[0]


def _check_decoder_only(config, skeleton: nn.Module) -> None:
    """Only a decoder-only causal LM (``...ForCausalLM``) streams as a stack of decoder layers."""
    arch = _arch(config)
    if getattr(config, "is_encoder_decoder", False) or not type(skeleton).__name__.endswith("ForCausalLM"):
        raise InputError(
            f"architecture {arch!r} is not a decoder-only causal language model; qmodel quantizes "
            "Llama-family models (Llama, Mistral, Qwen2, SmolLM, ...)"
        )


def _check_complete(config, skeleton: nn.Module, keys: set[str]) -> None:
    """The checkpoint must hold every tensor the architecture has (tied lm_head aside)."""
    arch = _arch(config)
    tied = set(getattr(skeleton, "_tied_weights_keys", None) or {}) if config.tie_word_embeddings else set()
    missing = sorted(k for k in skeleton.state_dict() if k not in keys and k not in tied)
    if missing:
        raise InputError(
            f"the source checkpoint lacks {len(missing)} tensors a {arch} needs (e.g. {missing[0]}); "
            "is source.uri a complete Hugging Face model folder?"
        )


def load_tokenizer(folder: Path):
    """The source's tokenizer, from its own files only (never the network)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"source {folder} has no usable tokenizer files: {exc}") from None


def _check_packable(layers: nn.ModuleList, cfg: QuantConfig) -> None:
    """GPTQ v1 packs codes along the input dimension and zeros along the output dimension
    into 32-bit words: both must fill whole words (3-bit: multiples of 32)."""
    need = WORD_BITS // _gcd(WORD_BITS, cfg.bits)
    for name, module in layers[0].named_modules():
        if not isinstance(module, nn.Linear):
            continue
        for side, size in (("inputs", module.in_features), ("outputs", module.out_features)):
            if size % need:
                raise InputError(
                    f"{name} has {size} {side}, not a multiple of {need}: {cfg.bits}-bit GPTQ packing "
                    f"cannot store it; choose bits 4 or 8"
                )


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def _facts(config, skeleton: nn.Module) -> ModelInfo:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    seen, parameters = set(), 0
    for p in skeleton.parameters():  # tied weights once
        if id(p) not in seen:
            seen.add(id(p))
            parameters += p.numel()
    return ModelInfo(
        architecture=(getattr(config, "architectures", None) or [type(skeleton).__name__])[0],
        layers=text.num_hidden_layers,
        hidden_size=text.hidden_size,
        intermediate_size=getattr(text, "intermediate_size", 0),
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        vocab_size=text.vocab_size,
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        max_position_embeddings=getattr(text, "max_position_embeddings", 0),
        parameters=parameters,
    )
