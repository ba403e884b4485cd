"""GPU-only checks (skipped without CUDA): CUDA-graph decode, and sizing both ways."""

from __future__ import annotations

import pytest
import torch
from runtime_tests import serve_support as ss

from qmodel_runtime import loader
from qmodel_runtime.engine import SamplingParams, runner
from qmodel_runtime.model import EAGER_OPS, ModelArgs, try_compiled_ops

pytestmark = pytest.mark.gpu


def test_cuda_graph_decode_equals_eager_decode():
    """Bucketed graphs (padded batch, padded attention length) against exact eager steps.
    fp16 logits of O(10) agree to ~1e-2 when only the matmul blocking differs; a wrong row,
    slot or mask changes them by whole units."""
    args = ModelArgs.from_name("smollm2-135m")
    model = loader.random_model(args, "cuda", torch.float16, loader.QuantConfig(4, 64))
    model.ops = try_compiled_ops("cuda", torch.float16)
    assert model.ops is not EAGER_OPS  # the fused path is the one that ships
    model.setup_caches(8, 512, torch.float16, "cuda")
    g = torch.Generator().manual_seed(0)
    lengths = {0: 5, 2: 40, 5: 300}
    for slot, n in lengths.items():
        runner.prefill(model, [(slot, 0, torch.randint(0, 49152, (n,), generator=g).tolist())], "cuda")
    graphs = runner.DecodeGraphs(model, 8, "cuda")
    graphs.capture_all()
    rows = [(slot, 7 + slot, n) for slot, n in lengths.items()]
    eager = runner.decode_eager(model, rows, "cuda").float()
    # the eager step wrote position n of each slot; the graph rewrites the same values there
    graphed = graphs.run(rows).float()
    assert (graphed - eager).abs().max().item() < 5e-2 * eager.abs().max().item()
    assert torch.equal(graphed.argmax(-1), eager.argmax(-1))


def test_measured_memory_is_what_the_operator_estimates(tmp_path):
    """The runtime's measured device memory vs qmodel_operator.estimator for the same settings:
    within 10% (issue 6, "Sizing, both ways")."""
    from qmodel_operator import estimator
    from qmodel_runtime.serve.config import ServeConfig
    from qmodel_runtime.serve.metrics import Metrics
    from qmodel_runtime.serve.startup import ServerState, load

    artifact = ss.int4_smollm2()
    max_len, batch = 2048, 16
    # prefill chunk = max_model_len: the estimator's workspace is one prefill of maxModelLen
    cfg = ServeConfig(
        artifact=str(artifact),
        device="cuda",
        max_model_len=max_len,
        max_batch_size=batch,
        kv_cache_tokens=batch * max_len,
        prefill_chunk=max_len,
    )
    state = ServerState(cfg, Metrics("smollm2"))
    load(state)
    assert state.status == "ready", state.reason
    out = state.engine.generate([1, 2, 3], SamplingParams(max_tokens=8, temperature=0.0))
    assert out[-1].completion_tokens == 8
    report = state.memory
    state.engine.shutdown(0.0)
    a = loader.read_config(artifact)[0]
    shape = estimator.ModelShape(
        layers=a.n_layers,
        hidden_size=a.dim,
        intermediate_size=a.intermediate_size,
        heads=a.n_heads,
        kv_heads=a.n_kv_heads,
        head_dim=a.head_dim,
        vocab_size=a.vocab_size,
        tied_embeddings=a.tie_word_embeddings,
        max_position_embeddings=a.max_position_embeddings,
    )
    predicted = estimator.serving_bytes(shape, 4, 64, max_len, report.max_batch)
    print("measured", report.as_dict(), "predicted", predicted)
    assert report.max_batch == batch
    assert abs(predicted - report.total) <= 0.10 * report.total, (predicted, report.as_dict())
