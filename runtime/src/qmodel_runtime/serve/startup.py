"""Startup: fetch and verify the artifact, load the model, size the KV cache, warm up.

Runs in a background thread while the HTTP server already answers /health/live (so a large
download does not trip the liveness probe). Any failure leaves the server up and never ready,
with the reason in the log and on /health/ready: a pod that cannot serve must not receive
traffic, and a restart loop would hide the reason.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qmodel_runtime import loader
from qmodel_runtime.engine import Engine, EngineConfig, SamplingParams, runner
from qmodel_runtime.engine.memory import (
    CachePlan,
    CacheSizeError,
    MemoryReport,
    gpu_cache_budget,
    plan_cache,
)
from qmodel_runtime.manifest import ManifestError
from qmodel_runtime.model import ModelConfigError, try_compiled_ops
from qmodel_runtime.serve.config import (
    DEFAULT_CPU_BATCH,
    DEFAULT_GPU_BATCH,
    DEFAULT_MAX_MODEL_LEN,
    ServeConfig,
)
from qmodel_runtime.serve.metrics import Metrics
from qmodel_runtime.storage import StorageError

log = logging.getLogger(__name__)
GRAPH_RESERVE = 256 << 20  # held back for the decode graphs' pool; the real size is measured
_USER_ERRORS = (ManifestError, loader.ArtifactError, ModelConfigError, CacheSizeError, StorageError)


@dataclass
class ServerState:
    config: ServeConfig
    metrics: Metrics
    status: str = "loading"  # loading | ready | failed
    reason: str = ""
    engine: Engine | None = None
    tokenizer: object = None
    max_len: int = 0
    vocab_size: int = 0
    memory: MemoryReport | None = None
    started: float = field(default_factory=time.monotonic)
    stop: Callable[[], None] | None = None  # asks the HTTP server to exit (set by serve())

    @property
    def model_name(self) -> str:
        return self.metrics.model_name

    @property
    def ready(self) -> bool:
        return self.status == "ready" and self.engine is not None and self.engine.alive


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CacheSizeError(f"--device {name} asked for a GPU but torch sees none")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def start_loading(state: ServerState) -> threading.Thread:
    thread = threading.Thread(target=load, args=(state,), name="qmodel-startup", daemon=True)
    thread.start()
    return thread


def load(state: ServerState) -> None:
    """Everything between process start and ready; never raises."""
    try:
        _load(state)
    except _USER_ERRORS as exc:
        _fail(state, str(exc))
    except Exception as exc:  # anything else: still never serve, and say why
        log.exception("startup failed")
        _fail(state, f"{type(exc).__name__}: {exc}")


def _fail(state: ServerState, reason: str) -> None:
    state.status, state.reason = "failed", reason
    log.error("NOT READY: the artifact %s cannot be served: %s", state.config.artifact, reason)
    if state.config.termination_log is not None:
        _exit_with_reason(state, state.config.termination_log, reason)


def _exit_with_reason(state: ServerState, path: Path, reason: str) -> None:
    """In a pod: the reason becomes the container's last termination message, which the operator
    reads into the model's Serving condition; the restart (with back-off) tries again."""
    from qmodel_runtime.jobs.report import one_line, write_termination

    write_termination(path, one_line(reason))
    if state.stop is not None:
        state.stop()


def _load(state: ServerState) -> None:
    cfg = state.config
    device = pick_device(cfg.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.monotonic()
    folder, verified = loader.fetch_artifact(cfg.artifact, cfg.cache_dir, os.environ)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.cuda.init()
    loaded = loader.load_artifact(folder, device, dtype, verified)
    if device.type == "cuda" and cfg.compile:
        loaded.model.ops = try_compiled_ops(device, dtype)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    max_len = min(
        cfg.max_model_len or min(loaded.args.max_position_embeddings, DEFAULT_MAX_MODEL_LEN),
        loaded.args.max_position_embeddings,
    )
    if cfg.max_model_len and cfg.max_model_len > loaded.args.max_position_embeddings:
        raise CacheSizeError(
            f"--max-model-len {cfg.max_model_len} exceeds the model's "
            f"max_position_embeddings {loaded.args.max_position_embeddings}"
        )
    chunk = cfg.prefill_chunk or (2048 if device.type == "cuda" else 256)
    plan, workspace = size_cache(loaded, cfg, device, dtype, max_len, chunk)
    loaded.model.setup_caches(plan.slots, max_len, dtype, device)
    engine = Engine(
        loaded.model,
        tokenizer,
        EngineConfig(plan.slots, max_len, cfg.max_queue, chunk, str(device)),
        loaded.eos_token_ids,
        state.metrics,
    )
    graphs_bytes = _capture(engine, device, cfg.cuda_graphs)
    engine.start()
    warm_up(engine, tokenizer)
    report = measure(loaded, plan, device, workspace, graphs_bytes)
    state.metrics.set_capacity(report)
    state.engine, state.tokenizer, state.max_len = engine, tokenizer, max_len
    state.vocab_size, state.memory = loaded.args.vocab_size, report
    state.status = "ready"
    state.metrics.ready.labels(state.model_name).set(1)
    log.info("memory: %s", json.dumps(report.as_dict()))
    log.info(
        "ready in %.1fs: %s, %d KV-cache tokens, max batch %d, max_model_len %d, %d quantized layers",
        time.monotonic() - t0,
        state.model_name,
        plan.capacity_tokens,
        plan.slots,
        max_len,
        len(loaded.quantized_layers),
    )


def size_cache(loaded, cfg: ServeConfig, device, dtype, max_len: int, chunk: int) -> tuple[CachePlan, int]:
    """-> (cache plan, measured prefill workspace bytes)."""
    per_token = loaded.args.kv_bytes_per_token(dtype)
    if device.type != "cuda":
        batch = cfg.max_batch_size or DEFAULT_CPU_BATCH
        budget = (
            (cfg.kv_cache_tokens // max_len if cfg.kv_cache_tokens else batch) * (max_len + 1) * per_token
        )
        return plan_cache(budget, per_token, max_len, batch), 0
    workspace = profile_workspace(loaded.model, min(chunk, max_len), dtype, device)
    free, total = torch.cuda.mem_get_info(device)
    budget = gpu_cache_budget(total, free, cfg.gpu_memory_utilization, workspace, GRAPH_RESERVE)
    if cfg.kv_cache_tokens:
        wanted = (cfg.kv_cache_tokens // max_len) * (max_len + 1) * per_token
        if wanted > budget:
            raise CacheSizeError(
                f"--kv-cache-tokens {cfg.kv_cache_tokens} needs {wanted / 2**30:.2f} GiB; "
                f"{max(budget, 0) / 2**30:.2f} GiB is free for the cache"
            )
        budget = wanted
    plan = plan_cache(budget, per_token, max_len, cfg.max_batch_size or DEFAULT_GPU_BATCH)
    log.info(
        "KV cache: %.2f GiB for %d slots x %d tokens (GPU %.1f/%.1f GiB free, workspace %.2f GiB)",
        plan.kv_bytes / 2**30,
        plan.slots,
        max_len,
        free / 2**30,
        total / 2**30,
        workspace / 2**30,
    )
    return plan, workspace


def profile_workspace(model, tokens: int, dtype, device) -> int:
    """Peak bytes a prefill of ``tokens`` tokens allocates beyond the weights (1-slot cache)."""
    model.setup_caches(1, tokens, dtype, device)  # allocated before ``base``: not counted
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    runner.prefill(model, [(0, 0, [0] * tokens)], device)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    for layer in model.layers:
        layer.attention.kv_cache = None
    torch.cuda.empty_cache()
    return max(peak, 0)


def _capture(engine: Engine, device, enabled: bool) -> int:
    if device.type != "cuda" or not enabled:
        return 0
    before = torch.cuda.memory_reserved(device)
    seconds = engine.capture_graphs()
    used = torch.cuda.memory_reserved(device) - before
    log.info(
        "captured %d decode CUDA graphs in %.1fs (%.0f MiB)", len(engine.graphs.graphs), seconds, used / 2**20
    )
    return used


def warm_up(engine: Engine, tokenizer) -> None:
    """One short generation through the whole path (tokenizer, prefill, decode, sampling)."""
    ids = tokenizer("Hello", add_special_tokens=False)["input_ids"] or [0]
    outputs = engine.generate(ids, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    if outputs[-1].finish_reason != "length":
        raise RuntimeError(f"warm-up generation ended with {outputs[-1].finish_reason}")


def measure(loaded, plan: CachePlan, device, workspace: int, graphs: int) -> MemoryReport:
    """What the process really holds, by component (GPU: from the allocator and the driver)."""
    kv = plan.kv_bytes
    if device.type != "cuda":
        return MemoryReport(
            "cpu",
            loaded.weight_bytes,
            kv,
            0,
            0,
            0,
            loaded.weight_bytes + kv,
            plan.capacity_tokens,
            plan.slots,
            plan.max_len,
        )
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    used = total - free
    context = used - torch.cuda.memory_reserved(device)
    return MemoryReport(
        torch.cuda.get_device_name(device),
        loaded.weight_bytes,
        kv,
        workspace,
        graphs,
        context,
        used,
        plan.capacity_tokens,
        plan.slots,
        plan.max_len,
    )
