"""Layer-by-layer execution: the same numbers as the whole model, one layer materialized at a time."""

from __future__ import annotations

import pytest
import torch
from runtime_tests.gptq_support import one_thread, quantize_collecting, save_tiny_model

from qmodel_runtime import evaluate, streaming
from qmodel_runtime.checkpoint import CheckpointWriter, open_quantized
from qmodel_runtime.quantizer import QuantConfig
from qmodel_runtime.sequential import linear_stages

pytestmark = pytest.mark.usefixtures("one_thread")
__all__ = ["one_thread"]  # the fixture, imported for pytest

ARCHS = ["llama", "mistral", "qwen2"]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("archs")
    return {arch: save_tiny_model(root / arch, arch=arch, layers=2) for arch in ARCHS}


@pytest.fixture(scope="module")
def windows():
    return torch.randint(0, 256, (6, 48), generator=torch.Generator().manual_seed(1))


def full_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_streamed_perplexity_equals_the_whole_model(tiny_models, windows, arch):
    streamed = streaming.perplexity(streaming.StreamedModel.open(tiny_models[arch]), windows, batch_size=4)
    whole = evaluate.perplexity(full_model(tiny_models[arch]), windows, batch_size=4)
    # Same fp32 ops in the same order (chunks of 4, then 2): equal up to summation order.
    assert streamed.perplexity == pytest.approx(whole.perplexity, rel=1e-6)
    assert streamed.tokens == whole.tokens == 6 * 47


def test_layers_are_released_after_each_visit(tiny_models, windows):
    sm = streaming.StreamedModel.open(tiny_models["llama"])
    assert all(p.is_meta for p in sm.layers.parameters())  # nothing loaded up front
    seen = []
    original = sm.release_layer

    def spy(i):
        # while layer i is in use, every other layer is still unmaterialized
        others = [p for j, layer in enumerate(sm.layers) if j != i for p in layer.parameters()]
        seen.append(all(p.is_meta for p in others))
        original(i)

    sm.release_layer = spy
    streaming.perplexity(sm, windows, batch_size=4)
    assert seen == [True, True]
    assert all(p.is_meta for p in sm.layers.parameters())


def test_sharded_source_streams_like_a_single_file(tmp_path, windows):
    single = save_tiny_model(tmp_path / "single", layers=2, seed=3)
    sharded = save_tiny_model(tmp_path / "sharded", layers=2, seed=3, max_shard_size="60KB")
    assert (sharded / streaming.INDEX_FILE).is_file()
    a = streaming.perplexity(streaming.StreamedModel.open(single), windows)
    b = streaming.perplexity(streaming.StreamedModel.open(sharded), windows)
    assert a.nll_sum == b.nll_sum


def test_tied_embeddings_are_tied_after_loading(tmp_path, windows):
    folder = save_tiny_model(tmp_path / "tied", tied=True)
    sm = streaming.StreamedModel.open(folder)
    assert sm.model.get_output_embeddings().weight is sm.model.get_input_embeddings().weight
    whole = evaluate.perplexity(full_model(folder), windows)
    assert streaming.perplexity(sm, windows).perplexity == pytest.approx(whole.perplexity, rel=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_linear_stages_are_found_by_watching_a_forward_pass(tiny_models, windows, arch):
    sm = streaming.StreamedModel.open(tiny_models[arch])
    inputs = sm.embed(windows[:1])
    stages = linear_stages(sm.load_layer(0), 0, inputs)
    assert stages == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_quantizes_and_reads_back(tiny_models, windows, tmp_path, arch):
    cfg = QuantConfig(bits=4, group_size=32, sym=False)
    writer = CheckpointWriter(tmp_path, tiny_models[arch], "model.layers", cfg)
    _, results = quantize_collecting(tiny_models[arch], windows, cfg, writer)
    writer.write_files()
    quantized = streaming.perplexity(open_quantized(tmp_path), windows)
    baseline = streaming.perplexity(streaming.StreamedModel.open(tiny_models[arch]), windows)
    assert len(results) == 14
    # 4-bit g32 on a random model moves perplexity by well under 5% (measured < 1%).
    assert quantized.perplexity == pytest.approx(baseline.perplexity, rel=0.05)
    if arch == "qwen2":  # q/k/v biases are kept beside the packed tensors
        from safetensors import safe_open

        with safe_open(tmp_path / "model.safetensors", "pt") as fh:
            assert "model.layers.0.self_attn.q_proj.bias" in fh.keys()


def test_a_folder_without_safetensors_is_refused_with_a_hint(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(streaming.ModelError, match="convert them to safetensors"):
        streaming.SafetensorsWeights(tmp_path)


def test_activations_stay_on_the_device_only_when_they_fit():
    gpu = torch.device("cuda")
    assert streaming.activation_store(gpu, needed_bytes=10 << 30, free_bytes=40 << 30) == gpu
    assert streaming.activation_store(gpu, needed_bytes=30 << 30, free_bytes=40 << 30) == torch.device("cpu")
    assert streaming.activation_store(torch.device("cpu"), 1 << 40, None) == torch.device("cpu")


def test_compute_dtype_follows_device_and_checkpoint():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert streaming.compute_dtype(cpu, torch.bfloat16) == torch.float32
    assert streaming.compute_dtype(gpu, torch.bfloat16) == torch.bfloat16
    assert streaming.compute_dtype(gpu, torch.float32) == torch.float16


@pytest.mark.gpu
def test_streamed_perplexity_on_cuda_matches_cpu(tiny_models, windows):
    cpu = streaming.perplexity(streaming.StreamedModel.open(tiny_models["llama"], "cpu"), windows)
    gpu = streaming.perplexity(streaming.StreamedModel.open(tiny_models["llama"], "cuda"), windows)
    # fp16 layers on the GPU against fp32 on the CPU: a random tiny model's perplexity agrees to
    # well under 1% (fp16 keeps 11 bits; these activations are O(1)).
    assert gpu.perplexity == pytest.approx(cpu.perplexity, rel=1e-2)


def test_rtn_rounds_the_stored_weights_without_running_the_model(tiny_models, windows, monkeypatch):
    from qmodel_runtime import sequential
    from qmodel_runtime.quantizer import rtn

    def no_forward(*_args, **_kwargs):
        raise AssertionError("RTN must not run the model")

    monkeypatch.setattr(sequential, "embed_all", no_forward)
    cfg = QuantConfig(bits=3, group_size=32, sym=False, method="rtn")
    _, results = quantize_collecting(tiny_models["llama"], windows, cfg)
    weights = streaming.SafetensorsWeights(tiny_models["llama"])
    assert len(results) == 14
    for name, qw in results.items():
        ref = rtn(weights.read([f"{name}.weight"])[f"{name}.weight"], cfg)
        assert torch.equal(qw.codes, ref.codes) and torch.equal(qw.scales, ref.scales)
