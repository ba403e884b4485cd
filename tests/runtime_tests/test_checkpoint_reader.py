"""An independent reader of the saved checkpoint, written from the format description alone
(not from ``qmodel_kernels.layout``), must get exactly the quantizer's dequantized weights.

The GPTQ v1 format, as design.md states it: per quantized Linear with K inputs, N outputs:
- ``qweight`` int32 [K*bits/32, N]: column n is one little-endian bit stream over the words
  qweight[0, n], qweight[1, n], ...; code k occupies stream bits [k*bits, (k+1)*bits)
  (3-bit codes may straddle two words);
- ``qzeros`` int32 [G, N*bits/32]: row g is one such stream over its words, field n holds
  zero[g, n] - 1;
- ``scales`` fp16 [G, N]; ``g_idx`` int32 [K], the group of each input row;
- W[n, k] = scales[g, n] * (code[k, n] - zero[g, n]) with g = g_idx[k].
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from runtime_tests.gptq_support import one_thread, quantize_collecting, save_tiny_model
from safetensors.numpy import load_file

from qmodel_runtime.checkpoint import CheckpointWriter
from qmodel_runtime.quantizer import QuantConfig


def stream_fields(words: list[int], bits: int, count: int) -> list[int]:
    """``count`` fields of ``bits`` bits from 32-bit words, low bits of word 0 first."""
    stream = 0
    for j, word in enumerate(words):
        stream |= (int(word) & 0xFFFFFFFF) << (32 * j)  # Python ints: no overflow
    return [(stream >> (i * bits)) & ((1 << bits) - 1) for i in range(count)]


def read_linear(tensors: dict[str, np.ndarray], prefix: str, bits: int) -> np.ndarray:
    """W [N, K] float32 of the quantized Linear ``prefix``."""
    qweight = tensors[f"{prefix}.qweight"].astype(np.int64)
    qzeros = tensors[f"{prefix}.qzeros"].astype(np.int64)
    scales = tensors[f"{prefix}.scales"].astype(np.float32)
    g_idx = tensors[f"{prefix}.g_idx"].astype(np.int64)
    k, (groups, n) = g_idx.shape[0], scales.shape
    codes = np.array([stream_fields(list(qweight[:, c]), bits, k) for c in range(n)]).T  # [K, N]
    zeros = np.array([stream_fields(list(qzeros[g]), bits, n) for g in range(groups)]) + 1  # [G, N]
    w = scales[g_idx] * (codes - zeros[g_idx]).astype(np.float32)
    return w.T


def stored_zero_fields(tensors: dict[str, np.ndarray], bits: int) -> np.ndarray:
    """Every zero-1 field of every qzeros word in the checkpoint."""
    fields = []
    for name, t in tensors.items():
        if name.endswith(".qzeros"):
            n = t.shape[1] * 32 // bits
            fields += [stream_fields(list(row.astype(np.int64)), bits, n) for row in t]
    return np.concatenate([np.array(f) for f in fields])


pytestmark = pytest.mark.usefixtures("one_thread")
__all__ = ["one_thread"]  # the fixture, imported for pytest


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", layers=2)


@pytest.fixture(scope="module")
def calibration():
    return torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))


CASES = [
    pytest.param(bits, sym, act, 32, id=f"{bits}bit-{'sym' if sym else 'asym'}-{'act' if act else 'noact'}")
    for bits in (2, 3, 4, 8)
    for sym in (True, False)
    for act in (False, True)
] + [
    pytest.param(4, False, True, 48, id="4bit-asym-act-g48-partial"),
    pytest.param(3, False, False, -1, id="3bit-asym-per-channel"),
]


@pytest.mark.parametrize("bits, sym, act, group", CASES)
def test_reader_gets_exactly_the_quantizers_weights(
    tiny_source, calibration, tmp_path, bits, sym, act, group
):
    cfg = QuantConfig(bits=bits, group_size=group, sym=sym, desc_act=act)
    writer = CheckpointWriter(tmp_path, tiny_source, "model.layers", cfg)
    _, results = quantize_collecting(tiny_source, calibration, cfg, writer)
    writer.write_files()
    tensors = load_file(tmp_path / "model.safetensors")
    assert len(results) == 14  # 7 Linears x 2 layers
    for name, qw in results.items():
        got = read_linear(tensors, name, bits)
        assert np.array_equal(got, qw.dequantize().numpy()), name
        assert f"{name}.weight" not in tensors
    fields = stored_zero_fields(tensors, bits)
    assert fields.max() < 2**bits - 1  # no zero of 0 (stored as -1: all ones)
    if sym:
        assert np.all(fields == 2 ** (bits - 1) - 1)  # 4-bit: every word 0x77777777


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_per_field_and_whole_word_loaders_agree(tiny_source, calibration, tmp_path, bits):
    """Loaders undo zero-1 either per field or by adding 0x11111111-style constants to the whole
    word (carries ripple into the next field when a field is all ones). Our zeros avoid that,
    so both give the same zeros for every word of an asymmetric checkpoint."""
    cfg = QuantConfig(bits=bits, group_size=32, sym=False)
    writer = CheckpointWriter(tmp_path, tiny_source, "model.layers", cfg)
    quantize_collecting(tiny_source, calibration, cfg, writer)
    writer.write_files()
    tensors = load_file(tmp_path / "model.safetensors")
    per_word = 32 // bits
    ones = sum(1 << (i * bits) for i in range(per_word))  # 0x11111111 for 4-bit
    for name, t in tensors.items():
        if not name.endswith(".qzeros"):
            continue
        for word in t.astype(np.int64).ravel():
            per_field = [f + 1 for f in stream_fields([int(word)], bits, per_word)]
            whole = stream_fields([(int(word) + ones) & 0xFFFFFFFF], bits, per_word)
            assert per_field == whole, f"{name}: word {int(word) & 0xFFFFFFFF:#010x}"


def test_the_reader_catches_a_wrong_layout():
    """Self-check of the reader: a 3-bit code straddling words reads back correctly, and
    moving one bit changes the result."""
    codes = [5, 3, 7, 1, 6, 2, 0, 4] * 4  # 32 codes, 96 bits: codes 10 and 21 straddle
    stream = sum(c << (3 * i) for i, c in enumerate(codes))
    words = [(stream >> (32 * j)) & 0xFFFFFFFF for j in range(3)]
    assert stream_fields(words, 3, 32) == codes
    words[0] ^= 1 << 31  # the middle bit of code 10 (bits 30-32 of the stream)
    assert stream_fields(words, 3, 32)[10] != codes[10]
