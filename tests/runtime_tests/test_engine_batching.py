"""The engine in-process on a tiny random model: continuous batching must not change results.

The model is the "tiny" shape (2 layers, dim 64, GQA, vocab 512) with random weights, its
output layer scaled up x8 so the top logits of a step are well apart: greedy decoding is
then decided by the computation, not by float noise between a batch of 1 and a batch of 6.
"""

from __future__ import annotations

import threading

import pytest
import torch

from qmodel_runtime.engine import Engine, EngineConfig, EngineObserver, SamplingParams
from qmodel_runtime.model import ModelArgs, Transformer

SLOTS, MAX_LEN = 6, 96


class Recorder(EngineObserver):
    def __init__(self):
        self.running: list[int] = []

    def on_step(self, running, waiting, kv_usage):
        self.running.append(running)


def tiny_model(slots=SLOTS, max_len=MAX_LEN) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_name("tiny")).eval().requires_grad_(False)
    model.output.weight.data *= 8
    model.setup_caches(slots, max_len, torch.float32, "cpu")
    return model


def make_engine(tokenizer, prefill_tokens=64, slots=SLOTS, max_queue=32, observer=None) -> Engine:
    cfg = EngineConfig(
        slots=slots, max_len=MAX_LEN, max_queue=max_queue, prefill_tokens=prefill_tokens, device="cpu"
    )
    engine = Engine(tiny_model(slots), tokenizer, cfg, eos_token_ids=(), observer=observer)
    engine.start()
    return engine


def prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [
        torch.randint(0, 512, (int(torch.randint(3, 40, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


def tokens_of(outputs) -> list[int]:
    return [t for o in outputs for t in o.token_ids]


@pytest.fixture(scope="module")
def sequential(smollm2_tokenizer):
    """Each prompt alone on a fresh engine: the reference."""
    engine = make_engine(smollm2_tokenizer)
    try:
        return [
            tokens_of(engine.generate(p, SamplingParams(max_tokens=8 + i % 5, temperature=0.0)))
            for i, p in enumerate(prompts(10))
        ]
    finally:
        engine.shutdown(1.0)


def test_concurrent_requests_match_their_sequential_runs(smollm2_tokenizer, sequential):
    """10 requests on 6 slots, started from threads: they join and leave the batch at
    different steps (different prompt lengths and max_tokens), and 4 must wait for a slot."""
    rec = Recorder()
    engine = make_engine(smollm2_tokenizer, observer=rec)
    results: dict[int, list[int]] = {}

    def run(i, p):
        results[i] = tokens_of(engine.generate(p, SamplingParams(max_tokens=8 + i % 5, temperature=0.0)))

    threads = [threading.Thread(target=run, args=(i, p)) for i, p in enumerate(prompts(10))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        engine.shutdown(1.0)
    assert [results[i] for i in range(10)] == sequential
    assert max(rec.running) == SLOTS  # the batch really filled up
    assert len(set(rec.running)) > 2  # and changed size along the way


def test_chunked_prefill_gives_the_same_tokens(smollm2_tokenizer, sequential):
    engine = make_engine(smollm2_tokenizer, prefill_tokens=5)  # prompts of 3-39 tokens: up to 8 chunks
    try:
        got = [
            tokens_of(engine.generate(p, SamplingParams(max_tokens=8 + i % 5, temperature=0.0)))
            for i, p in enumerate(prompts(10))
        ]
    finally:
        engine.shutdown(1.0)
    assert got == sequential


def test_abort_frees_the_slot_for_the_next_request(smollm2_tokenizer):
    engine = make_engine(smollm2_tokenizer, slots=1)
    started = threading.Event()
    outputs = []

    def emit(out):
        outputs.append(out)
        started.set()

    try:
        engine.submit("long", [1, 2, 3], SamplingParams(max_tokens=MAX_LEN - 4, temperature=0.0), emit)
        assert started.wait(30)
        engine.abort("long")
        # one slot: this can only run once the aborted request has left it
        second = engine.generate([4, 5, 6], SamplingParams(max_tokens=3, temperature=0.0), timeout=30)
    finally:
        engine.shutdown(1.0)
    assert outputs[-1].finish_reason == "abort"
    assert outputs[-1].completion_tokens < MAX_LEN - 4
    assert second[-1].finish_reason == "length" and second[-1].completion_tokens == 3


def test_seeded_sampling_is_reproducible_and_seeds_differ(smollm2_tokenizer):
    engine = make_engine(smollm2_tokenizer)
    p = prompts(1)[0]
    try:
        runs = [
            tokens_of(engine.generate(p, SamplingParams(max_tokens=12, temperature=1.5, seed=s)))
            for s in (1, 1, 2)
        ]
    finally:
        engine.shutdown(1.0)
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_stop_token_and_context_end(smollm2_tokenizer, sequential):
    engine = make_engine(smollm2_tokenizer)
    p = prompts(1)[0]
    try:
        stop_at = sequential[0][3]
        out = engine.generate(p, SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=(stop_at,)))
        # the context is MAX_LEN tokens: a long max_tokens ends at the context with "length"
        long = engine.generate(p, SamplingParams(max_tokens=10_000, temperature=0.0))
    finally:
        engine.shutdown(1.0)
    first = sequential[0].index(stop_at)
    assert tokens_of(out) == sequential[0][: first + 1] and out[-1].finish_reason == "stop"
    assert long[-1].finish_reason == "length" and len(p) + long[-1].completion_tokens == MAX_LEN


def test_shutdown_cuts_off_requests_past_the_grace(smollm2_tokenizer):
    engine = make_engine(smollm2_tokenizer, slots=1)
    outputs = []
    engine.submit("a", [1, 2], SamplingParams(max_tokens=MAX_LEN - 3, temperature=0.0), outputs.append)
    assert engine.shutdown(grace=0.0) is False
    assert outputs[-1].finish_reason == "abort"
    with pytest.raises(Exception, match="shutting down"):
        engine.submit("b", [1], SamplingParams(max_tokens=1), outputs.append)
