"""The GPTQ v1 layout: pack/unpack round trips, known words, load-time conversions, errors."""

from __future__ import annotations

import pytest
import torch
from kernel_tests.helpers import random_layer

from qmodel_kernels import layout

# (K, N) per bits: K and N must fill whole words (16 codes per word pair for 2-bit, 32 for
# 3-bit); the shapes are otherwise odd (not powers of two, partial last groups at 32/128).
SHAPES = {2: (208, 48), 3: (96, 64), 4: (200, 24), 8: (100, 12)}


@pytest.mark.parametrize("bits", layout.SUPPORTED_BITS)
@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_pack_unpack_round_trip(gen, bits, group_size):
    k, n = SHAPES[bits]
    groups = layout.num_groups(k, group_size)
    codes = torch.randint(0, 2**bits, (k, n), generator=gen)
    zeros = torch.randint(1, 2**bits, (groups, n), generator=gen)
    scales = torch.rand(groups, n, generator=gen) + 0.01
    g_idx = layout.default_g_idx(k, group_size)
    pw = layout.pack(codes, zeros, scales, g_idx, bits, group_size)
    assert pw.qweight.shape == (k * bits // 32, n) and pw.qweight.dtype == torch.int32
    assert pw.qzeros.shape == (groups, n * bits // 32) and pw.qzeros.dtype == torch.int32
    got_codes, got_zeros = layout.unpack(pw)
    assert torch.equal(got_codes, codes.int()) and torch.equal(got_zeros, zeros.int())
    expected = (codes - zeros[g_idx.long()]).double() * scales.half()[g_idx.long()].double()
    assert torch.equal(layout.dequantize_ref(pw, torch.float64), expected)
    again = layout.from_tensors(pw.tensors(), bits, group_size)
    assert all(
        torch.equal(a, b) for a, b in zip(again.tensors().values(), pw.tensors().values(), strict=True)
    )


def _word(value: int) -> int:
    """An unsigned 32-bit pattern as the int32 torch stores."""
    return value - 2**32 if value >= 2**31 else value


def test_known_words_4bit():
    codes = torch.arange(16).repeat(2)[:, None].repeat(1, 8) % 16  # column: 0..15, 0..15
    zeros = torch.full((1, 8), 8)  # symmetric 4-bit: zero 8, stored as 7 in every field
    pw = layout.pack(codes, zeros, torch.ones(1, 8), layout.default_g_idx(32, -1), 4, -1)
    assert pw.qweight[:, 0].tolist() == [_word(0x76543210), _word(0xFEDCBA98)] * 2
    assert pw.qzeros.tolist() == [[_word(0x77777777)]]
    assert layout.symmetric_zero(pw) == 8


def test_known_words_8bit_and_2bit():
    assert layout.pack_dim0(torch.tensor([[1], [2], [3], [255]]), 8).tolist() == [[_word(0xFF030201)]]
    assert layout.pack_dim0(torch.tensor([3, 0, 1, 2] + [0] * 12)[:, None], 2).tolist() == [[0b10010011]]
    # qzeros pack along N: symmetric 8-bit zero 128 is stored as 127 = 0x7F in every field
    assert layout.pack_dim1(torch.full((1, 4), 127), 8).tolist() == [[_word(0x7F7F7F7F)]]


def test_3bit_codes_straddle_words():
    """32 codes fill three words; codes 10 and 21 are split across word boundaries."""
    codes = torch.zeros(32, 1, dtype=torch.int64)
    codes[10] = 0b111  # stream bits 30..32: two bits at the top of word 0, one at the bottom of word 1
    codes[21] = 0b101  # stream bits 63..65: bit 31 of word 1, bits 0..1 of word 2
    words = layout.pack_dim0(codes, 3)
    assert words[:, 0].tolist() == [_word(0xC0000000), _word(0x80000001), 0b10]
    assert torch.equal(layout.unpack_dim0(words, 3, 32), codes.int())


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: layout.check_bits(5), "bits must be one of"),
        (lambda: layout.packed_length(100, 3), "multiple of 32 for 3-bit"),
        (lambda: layout.num_groups(64, 0), "group_size must be -1"),
        (lambda: layout.pack_dim0(torch.full((8, 1), 16), 4), "codes out of range for 4-bit"),
        (lambda: layout.check_zeros(torch.tensor([0, 3]), 4), r"zero points must lie in \[1, 15\]"),
        (
            lambda: layout.pack(
                torch.zeros(64, 8), torch.ones(2, 8), torch.ones(1, 8), layout.default_g_idx(64, 32), 4, 32
            ),
            r"must be \[2, 8\]",
        ),
        (
            lambda: layout.from_tensors(
                {**random_layer(torch.Generator(), 64, 8, 4, 32).tensors(), "scales": torch.ones(3, 8)}, 4, 32
            ),
            "scales has shape",
        ),
    ],
)
def test_errors_say_what_is_wrong(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_act_order_permutation_makes_groups_contiguous(gen):
    pw = random_layer(gen, 200, 16, bits=4, group_size=32, act_order=True)
    assert not layout.is_default_g_idx(pw.g_idx, 32)
    perm = layout.act_order_permutation(pw.g_idx)
    sorted_pw = layout.permute_rows(pw, perm)
    assert layout.is_default_g_idx(sorted_pw.g_idx, 32)
    assert torch.equal(layout.dequantize_ref(sorted_pw), layout.dequantize_ref(pw)[perm])
    back = layout.permute_rows(sorted_pw, torch.argsort(perm))
    assert torch.equal(back.qweight, pw.qweight) and torch.equal(back.g_idx, pw.g_idx)


def test_permute_rows_in_column_chunks(gen, monkeypatch):
    """The chunked conversion (bounded memory for 70B layers) equals the one-shot one."""
    pw = random_layer(gen, 64, 40, bits=4, group_size=32, act_order=True)
    perm = layout.act_order_permutation(pw.g_idx)
    whole = layout.permute_rows(pw, perm)
    monkeypatch.setattr(layout, "_CHUNK_ELEMENTS", 64 * 3)  # 3 columns per chunk, 14 chunks
    assert torch.equal(layout.permute_rows(pw, perm).qweight, whole.qweight)


def test_permute_rows_rejects_a_non_permutation(gen):
    pw = random_layer(gen, 64, 8, bits=4, group_size=32)
    with pytest.raises(ValueError, match="permutation of range"):
        layout.permute_rows(pw, torch.zeros(64, dtype=torch.int64))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_symmetric_zero(gen, bits):
    k, n = SHAPES[bits]
    assert layout.symmetric_zero(random_layer(gen, k, n, bits, 32, sym=True)) == 2 ** (bits - 1)
    assert layout.symmetric_zero(random_layer(gen, k, n, bits, 32, sym=False)) is None
