"""How big the KV cache can be, and what the process really holds on the GPU.

Sizing (pure): after the weights are loaded and a profile prefill measured the peak activation
workspace, the cache gets what is left of ``total * utilization``; every slot holds
``max_len`` tokens, so the slot count (the maximum batch) is that budget over one slot's bytes.

Measurement: ``MemoryReport`` names every part the operator's estimator predicts (weights,
KV cache, workspace, CUDA graphs, CUDA context) from real allocations, and the device total
the process uses; it goes to the startup log as JSON and to /metrics.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

GIB = 1 << 30


class CacheSizeError(RuntimeError):
    """The model and its cache do not fit; the message says what to change."""


@dataclass(frozen=True)
class CachePlan:
    slots: int  # sequences that can run at once (the maximum batch)
    max_len: int  # tokens per slot (the context length)
    bytes_per_token: int

    @property
    def capacity_tokens(self) -> int:
        return self.slots * self.max_len

    @property
    def kv_bytes(self) -> int:
        # +1 position per slot: the scratch column (see qmodel_runtime.model)
        return self.slots * (self.max_len + 1) * self.bytes_per_token


def plan_cache(budget_bytes: int, bytes_per_token: int, max_len: int, max_batch: int | None) -> CachePlan:
    """The most slots of ``max_len`` tokens that fit in ``budget_bytes`` (at most ``max_batch``)."""
    per_slot = (max_len + 1) * bytes_per_token
    slots = budget_bytes // per_slot if budget_bytes > 0 else 0
    if max_batch is not None:
        slots = min(slots, max_batch)
    if slots < 1:
        raise CacheSizeError(
            f"no room for the KV cache: one sequence of {max_len} tokens needs {per_slot / GIB:.2f} GiB "
            f"but only {max(budget_bytes, 0) / GIB:.2f} GiB is left after the weights and workspace; "
            f"lower --max-model-len or raise --gpu-memory-utilization"
        )
    return CachePlan(int(slots), max_len, bytes_per_token)


def gpu_cache_budget(total: int, free: int, utilization: float, workspace: int, reserve: int) -> int:
    """Bytes for the cache: the share of the device we may use, minus what is already used
    (CUDA context, weights, other processes), the measured workspace and a reserve (graphs)."""
    return int(total * utilization) - (total - free) - workspace - reserve


@dataclass(frozen=True)
class MemoryReport:
    device: str
    weights: int
    kv_cache: int
    workspace: int  # peak activations of the largest prefill chunk, measured
    cuda_graphs: int  # the decode graphs' memory pool
    cuda_context: int  # device memory outside torch's allocator (context, cuBLAS, kernels)
    total: int  # device memory this process uses, as the driver counts it
    kv_cache_tokens: int
    max_batch: int
    max_model_len: int

    def as_dict(self) -> dict:
        return asdict(self)
