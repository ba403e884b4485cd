"""GPTQ's quality on the real model, in CI on CPU: SmolLM2-135M, calibration 64 windows x 512
tokens (seed 0) of wiki-vital's calibration split, evaluation the first 100 windows x 512 of its
evaluation split (fp32 baseline 14.09).

Bars from the issue: a well-known third-party GPTQ implementation measured 16.89 (4-bit, group
64, asymmetric) and 29.40 (3-bit) at exactly these settings; RTN measured 18.55 and 47.95.
GPTQ runs as the quantize Job runs it, with the clipping search (``GPTQ_CLIP_STEPS``), and with
act-order (``desc_act``): on this model GPTQ in natural column order lands near RTN (measured
18.34 at 4-bit), act-order well below it (runtime/benchmarks/README.md). RTN is the plain
min/max grid, as in the third-party figures.
Each model variant is quantized and evaluated once per session (~2.5 minutes per evaluation
on 2 cores), through the same path as the quantize Job: a GPTQ v1 checkpoint on disk, read
back and evaluated with its layers streamed.
"""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file

from qmodel_runtime import data, streaming
from qmodel_runtime.checkpoint import open_quantized
from qmodel_runtime.quantizer import GPTQ_CLIP_STEPS, QuantConfig
from qmodel_runtime.sequential import quantize_checkpoint

pytestmark = pytest.mark.slow

CALIBRATION_WINDOWS, WINDOW, SEED = 64, 512, 0
THIRD_PARTY = {4: 16.9, 3: 29.4}


@pytest.fixture(scope="module")
def calibration(wiki_calib_ids):
    return data.calibration_windows(wiki_calib_ids, CALIBRATION_WINDOWS, WINDOW, SEED)


@pytest.fixture(scope="module")
def quantized(smollm2_path, calibration, smollm2_eval_windows, tmp_path_factory):
    """Perplexity and checkpoint folder of each (method, bits) variant, computed on first use."""
    cache: dict[tuple[str, int], tuple[float, object]] = {}

    def get(method: str, bits: int):
        if (method, bits) not in cache:
            folder = tmp_path_factory.mktemp(f"{method}{bits}")
            gptq = method == "gptq"
            cfg = QuantConfig(
                bits=bits, group_size=64, sym=False, method=method, desc_act=gptq,
                clip_steps=GPTQ_CLIP_STEPS if gptq else 0,
            )  # fmt: skip
            quantize_checkpoint(smollm2_path, folder, cfg, calibration, batch_size=8)
            result = streaming.perplexity(
                open_quantized(folder), smollm2_eval_windows, batch_size=8, desc=f"{method} {bits}-bit"
            )
            cache[method, bits] = (result.perplexity, folder)
        return cache[method, bits]

    return get


@pytest.mark.parametrize("bits", [4, 3])
def test_gptq_matches_the_third_party_and_beats_rtn(quantized, smollm2_baseline_ppl, bits):
    gptq, _ = quantized("gptq", bits)
    rtn, _ = quantized("rtn", bits)
    assert smollm2_baseline_ppl.perplexity < gptq <= THIRD_PARTY[bits]
    assert gptq < rtn


def test_no_zero_point_is_stored_as_minus_one(quantized):
    """Every qzeros word of the 3-bit checkpoint (where the third-party one had 8 such fields):
    no 3-bit field of the packed stream is all ones (a zero of 0 stored as zero-1 = -1)."""
    _, folder = quantized("gptq", 3)
    tensors = load_file(folder / "model.safetensors")
    qzeros = [t for name, t in tensors.items() if name.endswith(".qzeros")]
    assert len(qzeros) == 30 * 7
    for words in qzeros:
        # 32 fields per 3 words, read as one little-endian bit stream per row
        rows = words.view(np.uint32).astype(np.uint64)
        for row in rows:
            stream = sum(int(w) << (32 * j) for j, w in enumerate(row))
            fields = [(stream >> (3 * i)) & 7 for i in range(len(row) * 32 // 3)]
            assert 7 not in fields
