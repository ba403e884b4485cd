"""Our Llama-family decoder (Llama, Mistral, Qwen2, SmolLM), written for serving.

gpt-fast style: a frozen config read from the checkpoint's own config.json, tiny modules,
shapes in comments. The model is built on the meta device and loaded with ``assign=True``
(see ``qmodel_runtime.loader``); quantized layers are swapped for ``Int4Linear`` before the
weights arrive. q/k/v and gate/up are fused into one Linear each (``wqkv``, ``w13``) so a
decode step launches 4 matmuls per layer instead of 7.

The KV cache is static and slot-based: every request owns one slot (a row of the cache) for
its whole life, so a batch is a view ``cache[:B]`` and every step has fixed shapes, which is
what CUDA graphs need. Position ``max_len`` of every slot is a scratch column: rows that are
padding (idle slots in a decode batch, right padding in a prefill batch) write there and it
is never read by a real query.

Attention with grouped KV heads never copies K/V: the ``n_rep`` query heads that share a KV
head are folded into the query-length dimension, ``q: [B, Hkv, T*n_rep, D]`` against
``k: [B, Hkv, L, D]``, so a plain SDPA call does the work.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)
ARCHITECTURES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}
ROPE_TYPES = ("default", "linear", "llama3")


class ModelConfigError(ValueError):
    """config.json describes a model this runtime cannot serve; the message says why."""


@dataclass(frozen=True)
class RopeScaling:
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only


@dataclass(frozen=True)
class ModelArgs:
    model_type: str = "llama"
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    head_dim: int = 128
    intermediate_size: int = 11008
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 4096
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None

    @property
    def n_rep(self) -> int:
        return self.n_heads // self.n_kv_heads

    @property
    def qkv_size(self) -> int:
        return (self.n_heads + 2 * self.n_kv_heads) * self.head_dim

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """K and V of one token over every layer."""
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * elem

    @classmethod
    def from_name(cls, name: str) -> ModelArgs:
        """Shapes for benchmarks and tests (random weights): see ``NAMED``."""
        if name not in NAMED:
            raise ModelConfigError(f"unknown model shape {name!r}; known: {', '.join(NAMED)}")
        return NAMED[name]

    @classmethod
    def from_hf_config(cls, cfg: dict) -> ModelArgs:
        """From a Hugging Face config.json (transformers 4.x and 5.x spellings)."""
        model_type = cfg.get("model_type")
        if model_type not in ARCHITECTURES:
            raise ModelConfigError(
                f"model_type {model_type!r} is not supported; this runtime serves "
                f"{', '.join(ARCHITECTURES.values())} ({', '.join(ARCHITECTURES)}) checkpoints"
            )
        if cfg.get("hidden_act", "silu") != "silu":
            raise ModelConfigError(f"hidden_act {cfg['hidden_act']!r} is not supported (only silu)")
        n_heads = int(cfg["num_attention_heads"])
        dim = int(cfg["hidden_size"])
        n_kv = int(cfg.get("num_key_value_heads") or n_heads)
        if n_heads % n_kv:
            raise ModelConfigError(
                f"num_attention_heads {n_heads} is not a multiple of num_key_value_heads {n_kv}"
            )
        theta, scaling = _rope_from_config(cfg)
        qwen = model_type == "qwen2"
        return cls(
            model_type=model_type,
            vocab_size=int(cfg["vocab_size"]),
            dim=dim,
            n_layers=int(cfg["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=int(cfg.get("head_dim") or dim // n_heads),
            intermediate_size=int(cfg["intermediate_size"]),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            qkv_bias=qwen or bool(cfg.get("attention_bias", False)),
            o_bias=(not qwen) and bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            sliding_window=_sliding_window(cfg, qwen),
        )


def _rope_from_config(cfg: dict) -> tuple[float, RopeScaling]:
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ModelConfigError(
            f"rope scaling {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}"
        )
    if rope_type == "default":
        return theta, RopeScaling()
    return theta, RopeScaling(
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
    )


def _sliding_window(cfg: dict, qwen: bool) -> int | None:
    if qwen and not cfg.get("use_sliding_window", False):
        return None  # Qwen2 configs carry a sliding_window that is off unless use_sliding_window
    window = cfg.get("sliding_window")
    if qwen and window and cfg.get("max_window_layers", 0) < cfg["num_hidden_layers"]:
        raise ModelConfigError("Qwen2 with sliding window on only some layers is not supported")
    return int(window) if window else None


NAMED = {
    # Llama-2-7B: the benchmark shape of ../shared/anchors.md.
    "llama-2-7b": ModelArgs(),
    # SmolLM2-135M: the bundled test model.
    "smollm2-135m": ModelArgs(
        vocab_size=49152,
        dim=576,
        n_layers=30,
        n_heads=9,
        n_kv_heads=3,
        head_dim=64,
        intermediate_size=1536,
        rope_theta=100000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    ),
    # A toy for smoke runs: every code path (GQA, tied embeddings) at negligible cost.
    "tiny": ModelArgs(
        vocab_size=512,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        intermediate_size=128,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    ),
}


# --------------------------------------------------------------------------- rotary embedding


def rope_inv_freq(args: ModelArgs) -> Tensor:
    """Inverse frequencies [D/2] in fp32, with linear or llama3 scaling applied."""
    d = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    s = args.rope_scaling
    if s.rope_type == "linear":
        inv_freq = inv_freq / s.factor
    elif s.rope_type == "llama3":
        # Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between.
        low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor
        )
        mid = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
        inv_freq = torch.where((wavelen <= low_wavelen) & (wavelen >= high_wavelen), mid, inv_freq)
    return inv_freq.float()


def rope_table(args: ModelArgs, length: int, device=None) -> Tensor:
    """cos and sin for positions [0, length): [length, 2, D] fp32 (halves repeated, HF's layout)."""
    t = torch.arange(length, dtype=torch.float32, device=device)
    freqs = torch.outer(t, rope_inv_freq(args).to(device))  # [L, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [L, D]
    return torch.stack([emb.cos(), emb.sin()], dim=1)


# --------------------------------------------------------------------------- elementwise ops
# The pointwise work between the matmuls. Eager these are ~40 small kernels per layer; on a
# GPU ``compiled_ops`` fuses each function into one Triton kernel (~12 kernels per layer in
# all), which matters at batch 1: a 7B decode step has ~1.5 ms of int4 weight traffic and
# a graph-launched small kernel costs ~2 us.


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # Normalized in fp32 and cast back before the weight, as the HF reference does.
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def add_rms_norm(x: Tensor, y: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """The residual add and the next norm: -> (x + y, rms_norm(x + y))."""
    h = x + y
    return h, rms_norm(h, weight, eps)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)  # the rotate-half convention of HF checkpoints
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def rope_qk(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    # q: [B, T, H, D], k: [B, T, Hkv, D]; cos, sin: [B, T, 1, D] fp32
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def silu_mul(gate_up: Tensor) -> Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


@dataclass(frozen=True)
class Ops:
    norm: Callable = rms_norm
    add_norm: Callable = add_rms_norm
    rope: Callable = rope_qk
    silu_mul: Callable = silu_mul


EAGER_OPS = Ops()


def compiled_ops() -> Ops:
    """The same functions through torch.compile (dynamic shapes: one compilation serves every
    batch and length). Compilation happens at the first call."""
    compile_ = functools.partial(torch.compile, dynamic=True, fullgraph=True)
    return Ops(compile_(rms_norm), compile_(add_rms_norm), compile_(rope_qk), compile_(silu_mul))


def try_compiled_ops(device, dtype) -> Ops:
    """``compiled_ops`` if they compile and agree with the eager ones on ``device``, else the
    eager ops with a warning: a missing compiler must cost speed, never the server."""
    ops = compiled_ops()
    x = torch.randn(2, 3, 4, 64, device=device, dtype=dtype)
    w = torch.ones(64, device=device, dtype=dtype)
    cos, sin = torch.ones(2, 3, 1, 64, device=device), torch.zeros(2, 3, 1, 64, device=device)
    try:
        ok = torch.allclose(ops.norm(x, w, 1e-5), rms_norm(x, w, 1e-5), atol=1e-2)
        ok &= torch.allclose(ops.add_norm(x, x, w, 1e-5)[1], add_rms_norm(x, x, w, 1e-5)[1], atol=1e-2)
        ok &= torch.allclose(ops.rope(x, x, cos, sin)[0], x)
        ok &= torch.allclose(ops.silu_mul(x), silu_mul(x), atol=1e-2)
    except Exception as exc:  # noqa: BLE001  torch.compile raises many types (backend, lowering, no compiler)
        log.warning(
            "torch.compile is unavailable (%s: %s); using eager elementwise ops", type(exc).__name__, exc
        )
        return EAGER_OPS
    if not ok:
        log.warning("compiled elementwise ops disagree with eager ones; using eager ops")
        return EAGER_OPS
    return ops


@dataclass(frozen=True)
class Step:
    """What every layer needs to know about the batch being run."""

    rope: Tensor  # [B, T, 2, D] cos and sin at each position
    pos: Tensor  # [B, T]
    mask: Tensor  # [B, 1, T*n_rep, L] bool
    attn_len: int  # L
    slots: Tensor | None  # [B] cache slot of each row; None: row b is slot b
    ops: Ops


# --------------------------------------------------------------------------- modules


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, ops: Ops = EAGER_OPS) -> Tensor:
        return ops.norm(x, self.weight, self.eps)


class KVCache(nn.Module):
    """Static K/V for ``slots`` sequences of up to ``max_len`` tokens (+1 scratch column)."""

    def __init__(self, slots: int, n_kv_heads: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (slots, n_kv_heads, max_len + 1, head_dim)
        # zeros, not empty: masked positions still meet V in a matmul, and 0 * NaN is NaN.
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(
        self, pos: Tensor, k: Tensor, v: Tensor, slots: Tensor | None, attn_len: int
    ) -> tuple[Tensor, Tensor]:
        """Write k, v [B, T, Hkv, D] at positions pos [B, T]; -> keys, values [B, Hkv, L, D].
        Row b is slot b (a view, no copy: the decode path), or slot ``slots[b]`` (a gather)."""
        rows = slots if slots is not None else torch.arange(pos.shape[0], device=pos.device)
        rows = rows[:, None].expand_as(pos)
        self.k[rows, :, pos] = k
        self.v[rows, :, pos] = v
        if slots is None:
            return self.k[: pos.shape[0], :, :attn_len], self.v[: pos.shape[0], :, :attn_len]
        return self.k[slots, :, :attn_len], self.v[slots, :, :attn_len]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.wqkv = nn.Linear(args.dim, args.qkv_size, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=args.o_bias)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, step: Step) -> Tensor:
        a = self.args
        bsz, seqlen, _ = x.shape  # x: [B, T, dim]
        kv_size = a.n_kv_heads * a.head_dim
        q, k, v = self.wqkv(x).split([a.n_heads * a.head_dim, kv_size, kv_size], dim=-1)
        q = q.view(bsz, seqlen, a.n_heads, a.head_dim)
        k = k.view(bsz, seqlen, a.n_kv_heads, a.head_dim)
        v = v.view(bsz, seqlen, a.n_kv_heads, a.head_dim)
        q, k = step.ops.rope(q, k, step.rope[:, :, 0, None], step.rope[:, :, 1, None])
        keys, values = self.kv_cache.update(step.pos, k, v, step.slots, step.attn_len)  # [B, Hkv, L, D]
        # fold the n_rep query heads of each KV head into the query length: [B, Hkv, T*n_rep, D]
        # (views, no copies, when T = 1)
        q = q.view(bsz, seqlen, a.n_kv_heads, a.n_rep, a.head_dim).transpose(1, 2)
        q = q.reshape(bsz, a.n_kv_heads, seqlen * a.n_rep, a.head_dim)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=step.mask)  # [B, Hkv, T*n_rep, D]
        y = y.view(bsz, a.n_kv_heads, seqlen, a.n_rep, a.head_dim).transpose(1, 2)
        return self.wo(y.reshape(bsz, seqlen, a.n_heads * a.head_dim))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w13 = nn.Linear(args.dim, 2 * args.intermediate_size, bias=args.mlp_bias)  # gate, up
        self.w2 = nn.Linear(args.intermediate_size, args.dim, bias=args.mlp_bias)  # down

    def forward(self, x: Tensor, ops: Ops = EAGER_OPS) -> Tensor:
        return self.w2(ops.silu_mul(self.w13(x)))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: Tensor, step: Step) -> Tensor:
        ops, norm = step.ops, self.ffn_norm
        h, normed = ops.add_norm(x, self.attention(self.attention_norm(x, ops), step), norm.weight, norm.eps)
        return h + self.feed_forward(normed, ops)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.max_len = 0
        self.ops = EAGER_OPS
        self.register_buffer("rope", torch.empty(0), persistent=False)

    def tie_weights(self) -> None:
        if self.args.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def setup_caches(self, slots: int, max_len: int, dtype: torch.dtype, device) -> None:
        """Allocate the KV cache (``slots`` x ``max_len`` tokens) and the rotary table."""
        self.max_len = max_len
        self.rope = rope_table(self.args, max_len + 1, device)  # +1: the scratch column
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(
                slots, self.args.n_kv_heads, max_len, self.args.head_dim, dtype, device
            )

    def attention_mask(self, pos: Tensor, attn_len: int) -> Tensor:
        """Boolean [B, 1, T*n_rep, L]: query at position p sees keys 0..p (within the window)."""
        keys = torch.arange(attn_len, device=pos.device)
        allowed = keys[None, None, :] <= pos[:, :, None]  # [B, T, L]
        if self.args.sliding_window:
            allowed &= keys[None, None, :] > pos[:, :, None] - self.args.sliding_window
        return allowed.repeat_interleave(self.args.n_rep, dim=1)[:, None]

    def forward(
        self,
        tokens: Tensor,
        pos: Tensor,
        attn_len: int,
        last: Tensor | None = None,
        slots: Tensor | None = None,
    ) -> Tensor:
        """tokens, pos: [B, T]; row b uses cache slot ``slots[b]`` (default: slot b); keys at
        positions [0, attn_len) are visible. -> logits [B, V] fp32 at column ``last[b]`` of each
        row, or [B, T, V] when ``last`` is None."""
        step = Step(self.rope[pos], pos, self.attention_mask(pos, attn_len), attn_len, slots, self.ops)
        x = self.tok_embeddings(tokens)  # [B, T, dim]
        for layer in self.layers:
            x = layer(x, step)
        if last is not None:
            x = x[torch.arange(x.shape[0], device=x.device), last]  # [B, dim]
        return self.output(self.norm(x, self.ops)).float()
