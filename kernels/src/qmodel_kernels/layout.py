"""The packed int4 (and 2/3/8-bit) weight layout: the one module that owns it.

The layout is the GPTQ "v1" checkpoint format that Hugging Face transformers/optimum,
AutoGPTQ and vLLM load. For a Linear layer y = x @ W with W of shape [K, N]
(K = in_features, N = out_features; W is the transpose of ``nn.Linear.weight``):

- ``qweight`` int32 [K * bits / 32, N]: the integer codes q[k, n] in [0, 2^bits), packed
  along K as one little-endian bit stream per column: code k occupies bits
  [k*bits, (k+1)*bits) of the stream, word j holds stream bits [32j, 32j+32), low bits
  first. For 2/4/8 bits a word holds 32/bits whole codes; for 3 bits, 32 codes fill three
  words and codes 10 and 21 straddle a word boundary (AutoGPTQ's 3-bit layout).
- ``qzeros`` int32 [G, N * bits / 32]: the zero points minus one ("v1" stores z - 1),
  packed the same way but along N.
- ``scales`` fp16 [G, N].
- ``g_idx`` int32 [K]: the group of each input row. Without act-order g_idx[k] = k // group
  size; with act-order (desc_act) rows are quantized in another order and g_idx records
  which group's scale/zero each row uses.

G = ceil(K / group_size) (a partial last group is allowed), or 1 for group_size -1
(per output channel). Dequantization: W[k, n] = scales[g, n] * (q[k, n] - z[g, n]) with
g = g_idx[k] and z the stored zero plus one.

Loaders disagree on how to add the one back (per field, or to the whole packed word with
carries); they agree when no stored field is -1, i.e. no zero is 0. ``pack`` therefore
refuses a zero of 0 (see ``check_zeros``): quantizers keep zeros in [1, 2^bits - 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
_WORD = 32


@dataclass(frozen=True)
class PackedWeight:
    """One quantized Linear in checkpoint layout (tensors as stored in safetensors)."""

    qweight: torch.Tensor  # int32 [K*bits/32, N]
    qzeros: torch.Tensor  # int32 [G, N*bits/32]
    scales: torch.Tensor  # fp16 [G, N]
    g_idx: torch.Tensor  # int32 [K]
    bits: int
    group_size: int  # -1: one group per output channel

    @property
    def in_features(self) -> int:
        return self.g_idx.numel()

    @property
    def out_features(self) -> int:
        return self.scales.shape[1]

    @property
    def num_groups(self) -> int:
        return self.scales.shape[0]

    def tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The checkpoint entries, named as GPTQ loaders expect (``<prefix>.qweight`` ...)."""
        dot = f"{prefix}." if prefix else ""
        return {
            f"{dot}qweight": self.qweight,
            f"{dot}qzeros": self.qzeros,
            f"{dot}scales": self.scales,
            f"{dot}g_idx": self.g_idx,
        }


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def num_groups(in_features: int, group_size: int) -> int:
    """Groups along K: ceil(K / group_size), a partial last group included; 1 for -1."""
    if group_size == -1:
        return 1
    if group_size < 1:
        raise ValueError(f"group_size must be -1 (per channel) or positive, got {group_size}")
    return math.ceil(in_features / group_size)


def default_g_idx(in_features: int, group_size: int, device=None) -> torch.Tensor:
    """g_idx without act-order: row k belongs to group k // group_size."""
    k = torch.arange(in_features, dtype=torch.int32, device=device)
    if group_size == -1:
        return torch.zeros_like(k)
    return k // group_size


def packed_length(length: int, bits: int) -> int:
    """Words needed to pack ``length`` codes; the bit stream must end on a word boundary."""
    check_bits(bits)
    if (length * bits) % _WORD:
        need = _WORD // math.gcd(_WORD, bits)
        raise ValueError(
            f"cannot pack {length} {bits}-bit values into whole 32-bit words: "
            f"the packed dimension must be a multiple of {need} for {bits}-bit"
        )
    return length * bits // _WORD


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 holding unsigned 32-bit patterns -> int32 with the same bits."""
    words = words & 0xFFFFFFFF
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _stream_positions(length: int, bits: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    start = torch.arange(length, dtype=torch.int64, device=device) * bits
    return start // _WORD, start % _WORD  # word index, bit offset of each code


def pack_dim0(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes [L, C] in [0, 2^bits) along dim 0 into int32 [L*bits/32, C]."""
    length, cols = codes.shape
    n_words = packed_length(length, bits)
    codes = codes.to(torch.int64)
    if codes.numel() and (codes.min() < 0 or codes.max() >= 2**bits):
        raise ValueError(f"codes out of range for {bits}-bit: [{codes.min()}, {codes.max()}]")
    word, offset = _stream_positions(length, bits, codes.device)
    out = torch.zeros(n_words + 1, cols, dtype=torch.int64, device=codes.device)
    # low part of each code goes to its word; the bits that do not fit spill into the next.
    out.index_add_(0, word, (codes << offset[:, None]) & 0xFFFFFFFF)
    spill = offset + bits > _WORD
    if spill.any():
        high = codes[spill] >> (_WORD - offset[spill])[:, None]
        out.index_add_(0, word[spill] + 1, high)
    return _to_int32(out[:n_words])


def unpack_dim0(words: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of ``pack_dim0``: int32 [length*bits/32, C] -> int32 codes [length, C]."""
    n_words = packed_length(length, bits)
    if words.shape[0] != n_words:
        raise ValueError(f"expected {n_words} packed rows for {length} codes, got {words.shape[0]}")
    w = words.to(torch.int64) & 0xFFFFFFFF
    w = torch.cat([w, torch.zeros_like(w[:1])])  # a zero word so spills can always index +1
    word, offset = _stream_positions(length, bits, words.device)
    low = w[word] >> offset[:, None]
    high = w[word + 1] << (_WORD - offset)[:, None]  # only matters where the code straddles
    return ((low | high) & (2**bits - 1)).to(torch.int32)


def pack_dim1(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack along dim 1 (qzeros): [R, L] -> int32 [R, L*bits/32]."""
    return pack_dim0(codes.t(), bits).t().contiguous()


def unpack_dim1(words: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    return unpack_dim0(words.t(), bits, length).t().contiguous()


def check_zeros(zeros: torch.Tensor, bits: int) -> None:
    """Zero points must lie in [1, 2^bits - 1] so that every loader reads them alike."""
    if zeros.numel() and (zeros.min() < 1 or zeros.max() > 2**bits - 1):
        raise ValueError(
            f"zero points must lie in [1, {2**bits - 1}] for {bits}-bit GPTQ v1 checkpoints "
            f"(a zero of 0 is stored as -1 and loaders disagree on it); got "
            f"[{int(zeros.min())}, {int(zeros.max())}]"
        )


def pack(
    codes: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    group_size: int,
) -> PackedWeight:
    """Build the checkpoint tensors.

    codes: int [K, N] in [0, 2^bits); zeros: int [G, N] (the real zero, not minus one);
    scales: float [G, N]; g_idx: int [K] with values in [0, G).
    """
    check_bits(bits)
    k, n = codes.shape
    groups = num_groups(k, group_size)
    if zeros.shape != (groups, n) or scales.shape != (groups, n):
        raise ValueError(
            f"zeros {tuple(zeros.shape)} and scales {tuple(scales.shape)} must be [{groups}, {n}] "
            f"for K={k}, group_size={group_size}"
        )
    if g_idx.shape != (k,):
        raise ValueError(f"g_idx must have shape [{k}], got {tuple(g_idx.shape)}")
    if g_idx.numel() and (g_idx.min() < 0 or g_idx.max() >= groups):
        raise ValueError(f"g_idx values must lie in [0, {groups})")
    check_zeros(zeros, bits)
    return PackedWeight(
        qweight=pack_dim0(codes, bits),
        qzeros=pack_dim1(zeros.to(torch.int64) - 1, bits),
        scales=scales.to(torch.float16).contiguous(),
        g_idx=g_idx.to(torch.int32).contiguous(),
        bits=bits,
        group_size=group_size,
    )


def unpack(pw: PackedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (codes int32 [K, N], zeros int32 [G, N]) with the v1 "minus one" undone."""
    k, n = pw.in_features, pw.out_features
    codes = unpack_dim0(pw.qweight, pw.bits, k)
    zeros = unpack_dim1(pw.qzeros, pw.bits, n) + 1
    return codes, zeros


def dequantize_ref(pw: PackedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W [K, N] = scales[g_idx] * (codes - zeros[g_idx]), in ``dtype``: the reference path."""
    codes, zeros = unpack(pw)
    g = pw.g_idx.long()
    w = (codes - zeros[g]).to(torch.float32) * pw.scales[g].to(torch.float32)
    return w.to(dtype)


def from_tensors(tensors: dict[str, torch.Tensor], bits: int, group_size: int) -> PackedWeight:
    """Wrap the four checkpoint tensors of one layer (keys without prefix), checking shapes."""
    qweight, qzeros, scales, g_idx = (tensors[k] for k in ("qweight", "qzeros", "scales", "g_idx"))
    k, n = g_idx.numel(), scales.shape[1]
    expected = {
        "qweight": (packed_length(k, bits), n),
        "qzeros": (num_groups(k, group_size), packed_length(n, bits)),
        "scales": (num_groups(k, group_size), n),
    }
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(
                f"{name} has shape {tuple(tensors[name].shape)}, expected {shape} for a "
                f"{bits}-bit layer with in_features={k}, out_features={n}, group_size={group_size}"
            )
    return PackedWeight(qweight, qzeros, scales, g_idx.to(torch.int32), bits, group_size)


# --------------------------------------------------------------------------- load-time conversions
# Kernels read the checkpoint layout as stored, with two conversions done once at load:
# act-order rows sorted into contiguous groups (``permute_rows``), and symmetric zeros
# recognised so a kernel need not read qzeros (``symmetric_zero``).

# Elements of one column chunk in ``permute_rows``: unpacking works in int64, so 2^24
# elements bound the temporaries to ~0.5 GB even for a 28672 x 57344 layer.
_CHUNK_ELEMENTS = 1 << 24


def is_default_g_idx(g_idx: torch.Tensor, group_size: int) -> bool:
    """True when row k uses group k // group_size (no act-order, or act-order with static groups)."""
    return bool(torch.equal(g_idx.to(torch.int32), default_g_idx(g_idx.numel(), group_size, g_idx.device)))


def act_order_permutation(g_idx: torch.Tensor) -> torch.Tensor:
    """Rows sorted by group (stable): int64 [K] such that ``g_idx[perm]`` is non-decreasing."""
    return torch.sort(g_idx.to(torch.int64), stable=True).indices


def permute_rows(pw: PackedWeight, perm: torch.Tensor) -> PackedWeight:
    """The same layer with its input rows reordered: new row i is old row ``perm[i]``.

    y = x @ W equals x[:, perm] @ W[perm], so a kernel fed the permuted x computes the same
    output. With ``perm = act_order_permutation(g_idx)`` an act-order layer whose groups are
    all full (as GPTQ writes them) gets ``g_idx[perm] == default_g_idx``: contiguous groups.
    """
    k, n = pw.in_features, pw.out_features
    perm = perm.to(device=pw.qweight.device, dtype=torch.int64)
    if perm.shape != (k,) or not torch.equal(torch.sort(perm).values, torch.arange(k, device=perm.device)):
        raise ValueError(f"perm must be a permutation of range({k}), got shape {tuple(perm.shape)}")
    chunk = max(1, _CHUNK_ELEMENTS // max(k, 1))
    qweight = torch.empty_like(pw.qweight)
    for start in range(0, n, chunk):
        cols = slice(start, min(start + chunk, n))
        codes = unpack_dim0(pw.qweight[:, cols], pw.bits, k)
        qweight[:, cols] = pack_dim0(codes[perm], pw.bits)
    return replace(pw, qweight=qweight, g_idx=pw.g_idx[perm].contiguous())


def symmetric_zero(pw: PackedWeight) -> int | None:
    """2^(bits-1) when every zero point equals it (symmetric quantization), else None.

    For 4-bit that is the stored word 0x77777777 everywhere (zero 8, stored minus one).
    """
    zero = 2 ** (pw.bits - 1)
    zeros = unpack_dim1(pw.qzeros, pw.bits, pw.out_features) + 1
    return zero if bool((zeros == zero).all()) else None
