"""Tiny decoder-only models saved as Hugging Face folders, for the quantizer's tests.

Random weights, real architectures (the transformers classes), real files: the streaming,
quantization and checkpoint code sees exactly what it sees with a downloaded model.
Every Linear dimension is a multiple of 32 so all bit widths (3-bit included) can pack.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from qmodel_runtime import assets
from qmodel_runtime.quantizer import QuantConfig, QuantizedWeight
from qmodel_runtime.sequential import quantize_model
from qmodel_runtime.streaming import StreamedModel

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def tiny_config(arch: str = "llama", layers: int = 2, vocab: int = 256, tied: bool = False):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
    )
    classes = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}
    return classes[arch](**common)


def save_tiny_model(
    folder: Path,
    arch: str = "llama",
    layers: int = 2,
    vocab: int = 256,
    tied: bool = False,
    seed: int = 0,
    tokenizer: bool = False,
    max_shard_size: str | None = None,
) -> Path:
    """A random model of ``arch`` saved to ``folder``; with ``tokenizer`` (vocab 49152) the
    bundled SmolLM2 tokenizer files are copied beside it."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, layers, vocab, tied), dtype=torch.float32)
    with torch.no_grad():  # weights at the scale of a trained model's, and non-zero biases
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    if tokenizer:
        source = assets.model_path()
        for name in TOKENIZER_FILES:
            shutil.copyfile(source / name, Path(folder) / name)
    return Path(folder)


def quantize_collecting(source: Path, windows: torch.Tensor, cfg: QuantConfig, writer=None):
    """Quantize ``source``; -> {full linear name: QuantizedWeight}, also feeding ``writer``."""
    sm = StreamedModel.open(source)
    results: dict[str, QuantizedWeight] = {}

    def sink(index: int, layer_results: dict[str, QuantizedWeight]) -> None:
        results.update({f"{sm.prefix}.{index}.{k}": v for k, v in layer_results.items()})
        if writer is not None:
            writer.add_layer(index, layer_results)

    quantize_model(sm, windows, cfg, sink, batch_size=4)
    return sm, results


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread: on shared CPUs, two threads spend most of a
    64 x 64 matmul waiting for each other (measured 17.6 ms vs 0.16 ms per call under load)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
