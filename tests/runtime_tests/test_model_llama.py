"""Our Llama-family model against Hugging Face's reference implementation.

Tolerances: both run in fp32 on CPU with the same weights; they differ only in the order of
float operations (fused q/k/v, SDPA vs eager attention), which moves logits by ~1e-5 of
their scale (measured 5e-5 absolute on logits up to 34 for SmolLM2). 1e-3 absolute (3e-5 of
the scale) leaves room for other CPUs and still fails for any real mistake (a wrong rope,
mask or weight mapping moves logits by whole units).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from qmodel_runtime import loader, manifest
from qmodel_runtime.model import ModelArgs, ModelConfigError, Transformer, rope_inv_freq

ATOL = 1e-3


def ours_from(folder, slots: int = 2, max_len: int = 128) -> Transformer:
    model, *_ = loader.build_model(folder, "cpu", torch.float32)
    model.setup_caches(slots, max_len, torch.float32, "cpu")
    return model


def full_logits(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    """Prefill of every row (row b in slot b) -> [B, T, V]."""
    b, t = ids.shape
    pos = torch.arange(t).expand(b, t)
    with torch.inference_mode():
        return model(ids, pos, t)


@pytest.fixture(scope="module")
def smollm2_ours(smollm2_path):
    return ours_from(smollm2_path, slots=3, max_len=64)


def test_smollm2_prefill_matches_hf(smollm2_ours, smollm2_model):
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = smollm2_model(ids).logits
    ours = full_logits(smollm2_ours, ids)
    assert (ours - ref).abs().max().item() < ATOL


def test_smollm2_decode_with_cache_matches_full_forward(smollm2_ours, smollm2_model):
    """Prefill 10 tokens in slot 2, then decode 6 one at a time: each step's logits equal the
    full forward's logits at that position (the cache holds exactly what attention needs)."""
    ids = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = smollm2_model(ids).logits[0]
    m = smollm2_ours
    with torch.inference_mode():
        out = m(ids[:, :10], torch.arange(10)[None], 10, last=torch.tensor([9]), slots=torch.tensor([2]))
        assert (out[0] - ref[9]).abs().max().item() < ATOL
        for t in range(10, 16):
            # decode over slots [0, 3): slots 0 and 1 idle at the scratch column
            tokens = torch.tensor([[0], [0], [ids[0, t].item()]])
            pos = torch.tensor([[m.max_len], [m.max_len], [t]])
            out = m(tokens, pos, t + 1, last=torch.zeros(3, dtype=torch.long))
            assert (out[2] - ref[t]).abs().max().item() < ATOL, t


def test_chunked_prefill_equals_one_prefill(smollm2_ours):
    ids = torch.randint(0, 49152, (1, 20), generator=torch.Generator().manual_seed(3))
    m = smollm2_ours
    with torch.inference_mode():
        whole = m(ids, torch.arange(20)[None], 20, last=torch.tensor([19]), slots=torch.tensor([0]))
        m(ids[:, :8], torch.arange(8)[None], 8, last=torch.tensor([7]), slots=torch.tensor([1]))
        chunked = m(
            ids[:, 8:], torch.arange(8, 20)[None], 20, last=torch.tensor([11]), slots=torch.tensor([1])
        )
    assert (whole - chunked).abs().max().item() < ATOL


def _save_hf(model, folder, cfg_dict=None):
    model.save_pretrained(folder)
    manifest.write_manifest(folder)
    return folder


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "llama3-rope"])
def test_other_architectures_match_hf(arch, tmp_path):
    """Qwen2 (q/k/v bias), Mistral (sliding window shorter than the prompt), Llama 3.1 rope
    scaling, each as a tiny random model; untied embeddings for Qwen2 and Mistral."""
    import transformers as tf

    torch.manual_seed(0)
    common = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    if arch == "qwen2":
        hf = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, tie_word_embeddings=False))
    elif arch == "mistral":
        hf = tf.MistralForCausalLM(tf.MistralConfig(**common, sliding_window=8, tie_word_embeddings=False))
    else:
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        }
        hf = tf.LlamaForCausalLM(tf.LlamaConfig(**common, rope_parameters=rope, tie_word_embeddings=True))
    if arch == "qwen2":  # random init leaves biases at zero; make them matter
        for layer in hf.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.data.normal_(0, 0.5)
    if arch == "mistral":
        hf.config._attn_implementation = "eager"  # the reference honours sliding_window in eager
    hf.eval()
    folder = _save_hf(hf, tmp_path / arch)
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = hf(ids).logits
    ours = full_logits(ours_from(folder, max_len=64), ids)
    assert (ours - ref).abs().max().item() < ATOL


def test_sliding_window_changes_the_output(tmp_path):
    """Guards the previous test: with a window shorter than the prompt the mask matters."""
    args = ModelArgs.from_name("tiny")
    torch.manual_seed(0)
    full = Transformer(args)
    windowed = Transformer(ModelArgs(**{**args.__dict__, "sliding_window": 4}))
    windowed.load_state_dict(full.state_dict())
    ids = torch.randint(0, args.vocab_size, (1, 12))
    for m in (full, windowed):
        m.setup_caches(1, 32, torch.float32, "cpu")
    a, b = full_logits(full, ids), full_logits(windowed, ids)
    assert torch.allclose(a[:, :4], b[:, :4], atol=ATOL)
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 0.01


def test_rope_llama3_scaling_only_slows_long_wavelengths():
    base = ModelArgs.from_name("tiny")
    scaled = ModelArgs.from_hf_config(
        {
            "model_type": "llama",
            "vocab_size": 512,
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 128,
            "head_dim": 16,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        }
    )
    a, b = rope_inv_freq(base), rope_inv_freq(scaled)
    assert torch.equal(a[0], b[0])  # the highest frequency (shortest wavelength) is kept
    assert torch.allclose(b[-1], a[-1] / 8)  # the lowest is slowed by the factor


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
        ({"num_key_value_heads": 4}, "not a multiple of num_key_value_heads"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling 'yarn' is not supported"),
    ],
)
def test_unsupported_configs_are_refused_with_a_reason(patch, message):
    cfg = {
        "model_type": "llama",
        "vocab_size": 10,
        "hidden_size": 18,
        "num_hidden_layers": 1,
        "num_attention_heads": 6,
        "num_key_value_heads": 3,
        "intermediate_size": 8,
        **patch,
    }
    with pytest.raises(ModelConfigError, match=message):
        ModelArgs.from_hf_config(cfg)


def test_missing_tensor_names_the_tensor(tmp_path, smollm2_path):
    cfg = json.loads((smollm2_path / "config.json").read_text())
    cfg.update(
        num_hidden_layers=1,
        vocab_size=16,
        hidden_size=8,
        intermediate_size=8,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=4,
    )
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file(
        {"model.embed_tokens.weight": torch.zeros(16, 8), "model.norm.weight": torch.ones(8)},
        tmp_path / "model.safetensors",
    )
    with pytest.raises(loader.ArtifactError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight"):
        loader.build_model(tmp_path, "cpu", torch.float32)
