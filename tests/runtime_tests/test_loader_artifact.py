"""Artifact -> model: verification first, packed layers fused exactly, clear refusals."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from runtime_tests import serve_support as ss
from safetensors.torch import load_file

from qmodel_kernels import Int4Linear, layout
from qmodel_runtime import loader, manifest
from qmodel_runtime.storage import StorageSettings, upload
from testbed.s3server import s3_bucket, s3_server  # noqa: F401  (fixtures)


def random_packed(k: int, n: int, bits: int, group: int, seed: int) -> layout.PackedWeight:
    g = torch.Generator().manual_seed(seed)
    groups = layout.num_groups(k, group)
    codes = torch.randint(0, 2**bits, (k, n), generator=g)
    zeros = torch.randint(1, 2**bits, (groups, n), generator=g)
    scales = torch.rand(groups, n, generator=g) + 0.01
    return layout.pack(codes, zeros, scales, layout.default_g_idx(k, group), bits, group)


@pytest.mark.parametrize(
    ("bits", "widths"), [(4, (64, 16, 16)), (3, (32, 64)), (8, (8, 24, 4)), (2, (16, 48))]
)
def test_fusing_packed_layers_is_exact(bits, widths):
    parts = [random_packed(96, n, bits, 32, seed=i) for i, n in enumerate(widths)]
    fused = loader.fuse_packed(parts)
    expected = torch.cat([layout.dequantize_ref(p) for p in parts], dim=1)
    assert torch.equal(layout.dequantize_ref(fused), expected)


def test_fusing_refuses_layers_with_different_groups():
    with pytest.raises(loader.ArtifactError, match="disagree"):
        loader.fuse_packed([random_packed(64, 8, 4, 32, 0), random_packed(64, 8, 4, 64, 1)])


@pytest.fixture(scope="module")
def tiny():
    return ss.tiny_int4()


def test_loaded_layers_equal_the_checkpoint_dequantized(tiny):
    loaded = loader.load_artifact(tiny, "cpu", torch.float32)
    state = load_file(tiny / "model.safetensors")

    def deq(prefix):
        t = {k: state[f"{prefix}.{k}"] for k in loader.PACKED_KEYS}
        return layout.dequantize_ref(layout.from_tensors(t, 4, 32))

    attn = "model.layers.1.self_attn"
    wqkv = loaded.model.layers[1].attention.wqkv
    assert isinstance(wqkv, Int4Linear)
    expected = torch.cat([deq(f"{attn}.{p}_proj") for p in "qkv"], dim=1)  # [K, N]
    assert torch.equal(layout.dequantize_ref(wqkv.packed()), expected)
    x = torch.randn(3, 64)
    assert torch.allclose(wqkv(x), x @ expected, atol=1e-5)
    assert torch.equal(loaded.model.tok_embeddings.weight, state["model.embed_tokens.weight"].float())
    assert loaded.model.output.weight is loaded.model.tok_embeddings.weight  # tied
    assert len(loaded.quantized_layers) == 2 * 4  # wqkv, wo, w13, w2 in each layer
    assert loaded.eos_token_ids == (2,)
    # weights = the checkpoint's packed tensors (one g_idx per fused layer) + fp32 embeddings/norms
    packed = sum(t.nbytes for n, t in state.items() if n.endswith((".qweight", ".qzeros", ".scales")))
    g_idx = 2 * (64 + 64 + 64 + 128) * 4  # per layer: wqkv, wo, w13 read K=64, w2 reads K=128
    dense = sum(t.numel() * 4 for n, t in state.items() if "proj" not in n)
    assert loaded.weight_bytes == packed + g_idx + dense


def test_quantized_qwen2_with_bias_matches_hf_dequantized(tmp_path):
    """Packed q/k/v with biases fuse into one layer and give HF's logits on the same weights."""
    import transformers as tf

    torch.manual_seed(0)
    hf = tf.Qwen2ForCausalLM(
        tf.Qwen2Config(
            vocab_size=300,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=False,
        )
    )
    for layer in hf.model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            proj.bias.data.normal_(0, 0.5)
    hf.save_pretrained(tmp_path / "src")
    art = ss.quantize_folder(tmp_path / "src", tmp_path / "qwen" / "r1", group_size=32)
    state = load_file(art / "model.safetensors")
    ref_state = {}
    for name, t in state.items():
        if name.endswith(".qweight"):
            p = name.removesuffix(".qweight")
            pw = layout.from_tensors({k: state[f"{p}.{k}"] for k in loader.PACKED_KEYS}, 4, 32)
            ref_state[f"{p}.weight"] = layout.dequantize_ref(pw).t()
        elif not name.endswith((".qzeros", ".scales", ".g_idx")):
            ref_state[name] = t.float()
    hf.load_state_dict(ref_state)
    ids = torch.randint(0, 300, (1, 30))
    with torch.no_grad():
        ref = hf.eval()(ids).logits
    model = loader.load_artifact(art, "cpu", torch.float32).model
    model.setup_caches(1, 64, torch.float32, "cpu")
    with torch.inference_mode():
        ours = model(ids, torch.arange(30)[None], 30)
    assert (ours - ref).abs().max().item() < 1e-3  # fp32 both; see test_model_llama.py


def test_a_tampered_file_is_refused_naming_it(tiny, tmp_path):
    bad = tmp_path / "m" / "r"
    shutil.copytree(tiny, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_hidden_layers"] = 1
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(manifest.ManifestError, match=r"config\.json: size"):
        loader.load_artifact(bad, "cpu", torch.float32)
    (bad / manifest.MANIFEST_NAME).unlink()
    with pytest.raises(manifest.ManifestError, match=r"has no qmodel-manifest\.json"):
        loader.load_artifact(bad, "cpu", torch.float32)


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"quant_method": "awq"}, "quant_method is 'awq'"),
        ({"checkpoint_format": "gptq_v2"}, "checkpoint_format 'gptq_v2' is not supported"),
        ({"bits": 5}, "bits 5 is not one of"),
        (None, "packed but config.json has no quantization_config"),
    ],
)
def test_unsupported_quantization_is_refused(tiny, tmp_path, patch, message):
    bad = tmp_path / "m" / "r"
    shutil.copytree(tiny, bad)
    cfg = json.loads((bad / "config.json").read_text())
    if patch is None:
        del cfg["quantization_config"]
    else:
        cfg["quantization_config"].update(patch)
    (bad / "config.json").write_text(json.dumps(cfg))
    manifest.write_manifest(bad)
    with pytest.raises(loader.ArtifactError, match=message):
        loader.load_artifact(bad, "cpu", torch.float32)


def test_local_artifacts_are_used_in_place(tiny, tmp_path):
    assert loader.fetch_artifact(str(tiny), tmp_path, {}) == (tiny, False)
    assert loader.fetch_artifact(tiny.as_uri(), tmp_path, {}) == (tiny, False)
    with pytest.raises(loader.ArtifactError, match="does not exist"):
        loader.fetch_artifact(str(tmp_path / "nope"), tmp_path, {})


def test_s3_artifacts_are_downloaded_verified(tiny, tmp_path, s3_server, s3_bucket):  # noqa: F811
    env = s3_server.env()
    uri = f"s3://{s3_bucket}/qmodel/tiny/r-test/"
    upload(tiny, uri, StorageSettings.from_env(env))
    folder, verified = loader.fetch_artifact(uri, tmp_path / "cache", env)
    assert verified and folder.parent == tmp_path / "cache"
    assert (folder / "model.safetensors").read_bytes() == (tiny / "model.safetensors").read_bytes()
    loaded = loader.load_artifact(folder, "cpu", torch.float32, verified=True)
    assert loaded.args.n_layers == 2
