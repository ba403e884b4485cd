"""The GPU-memory estimator, against numbers worked out by hand for Llama-2 7B and 70B."""

from __future__ import annotations

import pytest

from qmodel_operator import estimator as est

# config.json of meta-llama/Llama-2-7b-hf and Llama-2-70b-hf.
LLAMA_7B = est.ModelShape(
    layers=32, hidden_size=4096, intermediate_size=11008, heads=32, kv_heads=32, head_dim=128,
    vocab_size=32000, tied_embeddings=False, max_position_embeddings=4096,
)  # fmt: skip
LLAMA_70B = est.ModelShape(
    layers=80, hidden_size=8192, intermediate_size=28672, heads=64, kv_heads=8, head_dim=128,
    vocab_size=32000, tied_embeddings=False, max_position_embeddings=4096,
)  # fmt: skip
SMOLLM2 = est.ModelShape(
    layers=30, hidden_size=576, intermediate_size=1536, heads=9, kv_heads=3, head_dim=64,
    vocab_size=49152, tied_embeddings=True, max_position_embeddings=8192,
)  # fmt: skip


def test_packed_linear_by_hand():
    # q_proj of Llama-2-7B at 4 bits, group 128: K = N = 4096, G = 32.
    qweight = 4096 * 4096 * 4 // 8  # 8,388,608
    qzeros = 32 * 4096 * 4 // 8  # 65,536
    scales = 32 * 4096 * 2  # 262,144
    g_idx = 4096 * 4  # 16,384
    assert est.packed_linear_bytes(4096, 4096, 4, 128) == qweight + qzeros + scales + g_idx == 8_732_672


def test_partial_last_group_and_per_channel():
    # SmolLM2's hidden 576 leaves a partial last group at 128: ceil(576/128) = 5 groups.
    assert est.packed_linear_bytes(576, 576, 4, 128) == 576 * 576 // 2 + 5 * 576 // 2 + 5 * 576 * 2 + 576 * 4
    # -1: one group per output channel.
    assert est.packed_linear_bytes(576, 576, 4, -1) == 576 * 576 // 2 + 576 // 2 + 576 * 2 + 576 * 4
    # 3 bits pack 32 codes into 3 words: K*3/32 words per column.
    assert (
        est.packed_linear_bytes(4096, 4096, 3, 128)
        == 384 * 4 * 4096 + 32 * 384 * 4 + 32 * 4096 * 2 + 4096 * 4
    )


def test_llama_7b_weights_by_hand():
    # Per layer at 4 bits, group 128 (K, N: q,k,v,o 4096x4096; gate, up 4096x11008; down 11008x4096):
    #   qweight  4 * 8,388,608 + 3 * 22,544,384                  = 101,187,584
    #   scales   4 * 262,144 + 2 * 704,512 + 86 groups * 8,192   =   3,162,112
    #   qzeros   4 * 65,536 + 2 * 176,128 + 86 * 2,048           =     790,528
    #   g_idx    4 * 16,384 + 2 * 16,384 + 44,032                =     142,336
    #   layer                                                      = 105,282,560
    # x 32 layers = 3,369,041,920; embeddings and lm_head 2 * 32000 * 4096 * 2 = 524,288,000;
    # norms 65 * 4096 * 2 = 532,480. Total 3,893,862,400 (3.63 GiB; published 4-bit 128g
    # checkpoints of this model are 3.90 GB).
    assert est.weight_bytes(LLAMA_7B, 4, 128) == 3_893_862_400


def test_llama_70b_weights_by_hand():
    # Per layer (q,o 8192x8192; k,v 8192x1024; gate, up 8192x28672; down 28672x8192), group 128:
    #   qweight  2 * 33,554,432 + 2 * 4,194,304 + 2 * 117,440,512 + 117,440,512 = 427,819,008
    #   scales   2 * 1,048,576 + 2 * 131,072 + 2 * 3,670,016 + 224 * 16,384    =  13,369,344
    #   qzeros   2 * 262,144 + 2 * 32,768 + 2 * 917,504 + 224 * 4,096          =   3,342,336
    #   g_idx    4 * 32,768 + 2 * 32,768 + 114,688                             =     311,296
    #   layer                                                                   = 444,841,984
    # x 80 = 35,587,358,720; embeddings + lm_head 2 * 32000 * 8192 * 2 = 1,048,576,000;
    # norms 161 * 8192 * 2 = 2,637,824. Total 36,638,572,544 (34.1 GiB).
    assert est.weight_bytes(LLAMA_70B, 4, 128) == 36_638_572_544


def test_kv_cache_per_token_by_hand():
    assert est.kv_bytes_per_token(LLAMA_7B) == 32 * 2 * 32 * 128 * 2 == 524_288  # 0.5 MiB
    assert est.kv_bytes_per_token(LLAMA_70B) == 80 * 2 * 8 * 128 * 2 == 327_680  # GQA: 8 KV heads
    assert est.kv_bytes_per_token(SMOLLM2) == 30 * 2 * 3 * 64 * 2 == 23_040


def test_llama_7b_needs_by_hand():
    # One 4096-token sequence: 1 GiB context + 3,893,862,400 weights + 4096 * 524,288 KV
    # + workspace 4096 * (3*4096 + 4096 + 2*4096 + 3*11008) * 2 + 1 * 32000 * 8
    # = 1,073,741,824 + 3,893,862,400 + 2,147,483,648 + 471,859,200 + 256,000 = 7,587,203,072,
    # / 0.90 utilization = 8,430,225,636 bytes = 7.85 GiB.
    used = est.serving_bytes(LLAMA_7B, 4, 128, 4096, 1)
    assert used == 7_587_203_072
    assert est.required_memory_bytes(LLAMA_7B, 4, 128, 4096, None) == 8_430_225_636
    assert est.gib(8_430_225_636) == "7.9 GiB"


def test_llama_70b_fits_80_gib_but_not_40():
    needed = est.required_memory_bytes(LLAMA_70B, 4, 128, 4096, None)
    assert 40 * est.GIB < needed < 48 * est.GIB  # 41.4 GiB: an A100-40GB is too small
    assert est.size_for_gpu(LLAMA_70B, 4, 128, 40960, 4096, None) is None
    sizing = est.size_for_gpu(LLAMA_70B, 4, 128, 81920, 4096, None)
    assert sizing is not None
    # KV budget: 0.9 * 80 GiB - 1 GiB - weights - workspace(4096 tokens, batch 256)
    usable = int(81920 * est.MIB * 0.9)
    workspace = 4096 * (3 * 8192 + 8192 + 2 * 1024 + 3 * 28672) * 2 + 256 * 32000 * 8
    free = usable - est.GIB - 36_638_572_544 - workspace
    tokens = free // 327_680 // 16 * 16
    assert sizing.kv_cache_tokens == tokens == 117_616
    assert sizing.max_batch_size == tokens // 4096 == 28
    assert sizing.bytes_used <= usable


def test_sizing_grows_with_memory_and_respects_the_batch_cap():
    small = est.size_for_gpu(LLAMA_7B, 4, 128, 23034, 4096, None)  # L4
    large = est.size_for_gpu(LLAMA_7B, 4, 128, 81920, 4096, None)  # A100-80GB
    assert small is not None and large is not None
    assert small.max_batch_size < large.max_batch_size
    assert small.kv_cache_tokens < large.kv_cache_tokens
    # SmolLM2 on 80 GiB could hold far more than 256 sequences: the automatic batch stops there.
    tiny = est.size_for_gpu(SMOLLM2, 4, 128, 81920, 4096, None)
    assert tiny is not None and tiny.max_batch_size == 256


def test_explicit_batch_must_fit_whole():
    # L4 fits 7 Llama-7B sequences of 4096 tokens; asking for 8 does not fit, 7 does.
    assert est.size_for_gpu(LLAMA_7B, 4, 128, 23034, 4096, 7) is not None
    assert est.size_for_gpu(LLAMA_7B, 4, 128, 23034, 4096, 8) is None
    need8 = est.required_memory_bytes(LLAMA_7B, 4, 128, 4096, 8)
    assert need8 > 23034 * est.MIB


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packed_linears_cost_bits_over_16_of_fp16_plus_group_metadata(bits):
    fp16 = sum(k * n for _, k, n in LLAMA_7B.linears()) * LLAMA_7B.layers * 2
    linears = est.weight_bytes(LLAMA_7B, bits, 128) - 524_288_000 - 532_480  # minus embeddings, norms
    # fp16 scales alone add 2 bytes per 128 weights = 1/128 of the fp16 size; zeros and g_idx
    # add at most another 0.5% here.
    assert bits / 16 + 1 / 128 < linears / fp16 < bits / 16 + 1 / 128 + 0.005


def test_quantize_job_is_small_next_to_serving():
    # The Job streams layers: 70B quantizes on a card it could never be served from.
    job = est.quantize_job_bytes(LLAMA_70B, samples=128, sequence_length=2048)
    assert job < 24 * est.GIB < est.required_memory_bytes(LLAMA_70B, 4, 128, 4096, None)
    # Calibration activations dominate and scale with the samples: 128 * 2048 * 8192 * 2 * 2.
    fewer = est.quantize_job_bytes(LLAMA_70B, samples=64, sequence_length=2048)
    assert job - fewer == 64 * 2048 * 8192 * 2 * 2
