"""GPU-memory sizing: how many bytes serving (or quantizing) a model takes on one GPU.

Pure and stdlib-only, so the operator can size Deployments from the shape facts the
quantize Job reports, without torch and without reading the checkpoint.

Serving one GPU holds (bytes):
  packed weights     per quantized Linear [K in, N out]: qweight K*N*bits/8, qzeros G*N*bits/8,
                     scales G*N*2, g_idx K*4, with G = ceil(K / group) (1 for group -1)
  unquantized        embeddings V*H*2, lm_head V*H*2 unless tied, norms (2L + 1)*H*2 (fp16)
  KV cache           L * 2 * kv_heads * head_dim * 2 bytes per token, for batch * maxModelLen tokens
  workspace          one prefill of maxModelLen tokens: T*(3H + q + 2kv + 3I)*2, plus fp32 logits
                     and probabilities for the decode batch: B*V*8
  fixed overhead     the CUDA context with cuBLAS/Triton workspaces (``Budget.context_bytes``)
and a GPU class fits when that is at most ``Budget.utilization`` of its memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MIB = 1 << 20
GIB = 1 << 30


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only (Llama-style) transformer, as config.json describes it."""

    layers: int
    hidden_size: int
    intermediate_size: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    tied_embeddings: bool
    max_position_embeddings: int

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> tuple[tuple[str, int, int], ...]:
        """(name, in_features, out_features) of the quantized Linears of one decoder layer."""
        h, i = self.hidden_size, self.intermediate_size
        return (
            ("q_proj", h, self.q_dim),
            ("k_proj", h, self.kv_dim),
            ("v_proj", h, self.kv_dim),
            ("o_proj", self.q_dim, h),
            ("gate_proj", h, i),
            ("up_proj", h, i),
            ("down_proj", i, h),
        )


@dataclass(frozen=True)
class Budget:
    """The constants behind the estimate."""

    dtype_bytes: int = 2  # fp16 activations, KV cache, scales, embeddings and norms
    # CUDA context (~500 MiB with torch 2.x on an H100) + cuBLAS and Triton workspaces and the
    # caching allocator's fragmentation: 1 GiB keeps small models honest on 16 GiB cards.
    context_bytes: int = GIB
    # Leave 10% of the card to the driver, other processes and allocator rounding (vLLM's default).
    utilization: float = 0.90
    max_auto_batch: int = 256
    kv_block_tokens: int = 16  # the KV cache is handed out in blocks of 16 tokens
    default_max_model_len: int = 4096


@dataclass(frozen=True)
class Sizing:
    """How one GPU class serves the model."""

    memory_mib: int
    max_model_len: int
    max_batch_size: int
    kv_cache_tokens: int
    bytes_used: int  # at max_batch_size sequences of max_model_len tokens


def packed_linear_bytes(in_features: int, out_features: int, bits: int, group_size: int) -> int:
    groups = 1 if group_size == -1 else math.ceil(in_features / group_size)
    qweight = math.ceil(in_features * bits / 32) * 4 * out_features
    qzeros = groups * math.ceil(out_features * bits / 32) * 4
    scales = groups * out_features * 2
    g_idx = in_features * 4
    return qweight + qzeros + scales + g_idx


def weight_bytes(shape: ModelShape, bits: int, group_size: int, budget: Budget = Budget()) -> int:
    """Packed Linears of every layer, plus the tensors left in fp16."""
    per_layer = sum(packed_linear_bytes(k, n, bits, group_size) for _, k, n in shape.linears())
    embeddings = shape.vocab_size * shape.hidden_size * budget.dtype_bytes
    lm_head = 0 if shape.tied_embeddings else embeddings
    norms = (2 * shape.layers + 1) * shape.hidden_size * budget.dtype_bytes
    return shape.layers * per_layer + embeddings + lm_head + norms


def kv_bytes_per_token(shape: ModelShape, budget: Budget = Budget()) -> int:
    return shape.layers * 2 * shape.kv_dim * budget.dtype_bytes


def workspace_bytes(shape: ModelShape, tokens: int, batch: int, budget: Budget = Budget()) -> int:
    """Peak transient activations: one prefill of ``tokens`` and the decode batch's fp32 logits."""
    h, i = shape.hidden_size, shape.intermediate_size
    per_token = 3 * h + shape.q_dim + 2 * shape.kv_dim + 3 * i
    logits = batch * shape.vocab_size * 4 * 2  # logits and sampling probabilities, fp32
    return tokens * per_token * budget.dtype_bytes + logits


def _blocks(tokens: int, budget: Budget) -> int:
    return math.ceil(tokens / budget.kv_block_tokens) * budget.kv_block_tokens


def serving_bytes(
    shape: ModelShape, bits: int, group_size: int, max_model_len: int, batch: int, budget: Budget = Budget()
) -> int:
    """Everything one GPU holds when ``batch`` sequences each reach ``max_model_len`` tokens."""
    return (
        budget.context_bytes
        + weight_bytes(shape, bits, group_size, budget)
        + batch * _blocks(max_model_len, budget) * kv_bytes_per_token(shape, budget)
        + workspace_bytes(shape, max_model_len, batch, budget)
    )


def required_memory_bytes(
    shape: ModelShape,
    bits: int,
    group_size: int,
    max_model_len: int,
    max_batch_size: int | None,
    budget: Budget = Budget(),
) -> int:
    """The smallest GPU (total memory) that serves the model: utilization taken into account."""
    used = serving_bytes(shape, bits, group_size, max_model_len, max_batch_size or 1, budget)
    return math.ceil(used / budget.utilization)


def size_for_gpu(
    shape: ModelShape,
    bits: int,
    group_size: int,
    memory_mib: int,
    max_model_len: int,
    max_batch_size: int | None,
    budget: Budget = Budget(),
) -> Sizing | None:
    """Batch and KV-cache tokens for a GPU of ``memory_mib``; None when the model does not fit.

    The KV cache gets all memory left after weights, workspace and overhead. An automatic batch
    is as many sequences as can all reach max_model_len at once (at most ``max_auto_batch``).
    """
    usable = int(memory_mib * MIB * budget.utilization)
    cap = max_batch_size or budget.max_auto_batch
    fixed = budget.context_bytes + weight_bytes(shape, bits, group_size, budget)
    free = usable - fixed - workspace_bytes(shape, max_model_len, cap, budget)
    per_token = kv_bytes_per_token(shape, budget)
    kv_tokens = max(free, 0) // per_token // budget.kv_block_tokens * budget.kv_block_tokens
    batch = min(cap, kv_tokens // _blocks(max_model_len, budget))
    if batch < 1 or (max_batch_size is not None and batch < max_batch_size):
        return None
    used = fixed + kv_tokens * per_token + workspace_bytes(shape, max_model_len, batch, budget)
    return Sizing(memory_mib, max_model_len, batch, kv_tokens, used)


def quantize_job_bytes(
    shape: ModelShape, samples: int, sequence_length: int, budget: Budget = Budget()
) -> int:
    """GPU bytes for the quantize Job, which streams one decoder layer at a time through the GPU.

    One layer's weights in fp32, the Hessians of its four input spaces (q/k/v share one, gate/up
    share one) plus a factorization copy of the largest, the calibration activations entering
    and leaving the layer (fp16), one window's fp32 forward with eager attention scores, and the
    lm_head with one window's logits for the perplexity evaluation.
    """
    h, i, q = shape.hidden_size, shape.intermediate_size, shape.q_dim
    layer = sum(k * n for _, k, n in shape.linears()) * 4
    hessians = (2 * h * h + q * q + i * i) * 4 + max(h, q, i) ** 2 * 4
    activations = 2 * samples * sequence_length * h * budget.dtype_bytes
    forward = sequence_length * (3 * h + q + 2 * shape.kv_dim + 3 * i) * 4
    scores = shape.heads * sequence_length * sequence_length * 4
    evaluation = shape.vocab_size * h * 4 + sequence_length * shape.vocab_size * 4
    return budget.context_bytes + layer + hessians + activations + forward + scores + evaluation


def default_max_model_len(shape: ModelShape, budget: Budget = Budget()) -> int:
    return min(shape.max_position_embeddings, budget.default_max_model_len)


def gib(num_bytes: int) -> str:
    """``21.3 GiB``: how sizes appear in conditions."""
    return f"{num_bytes / GIB:.1f} GiB"


def mib_to_gib(memory_mib: int) -> str:
    value = memory_mib / 1024
    return f"{value:.0f} GiB" if value == int(value) else f"{value:.1f} GiB"
