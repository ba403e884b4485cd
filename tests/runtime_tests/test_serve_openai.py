"""The server end to end with the official ``openai`` client: SmolLM2-135M int4 on CPU.

One server process for the module (loading takes ~10-60 s on 2 busy cores). ``--threads 1``:
on a shared 2-core machine torch's 2 OpenMP threads spin against other processes and a
decode step got 3-100x slower in our measurements (21 ms vs 0.07 ms for one small attention
call at load 12); one thread is steady.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
import torch
from runtime_tests import serve_support as ss
from safetensors.torch import load_file

from qmodel_kernels import layout

MODEL = "smollm2"
MAX_LEN = 512
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Photosynthesis is the process by which"]


@pytest.fixture(scope="module")
def artifact():
    return ss.int4_smollm2()


@pytest.fixture(scope="module")
def server(artifact):
    with ss.running_server(
        artifact,
        "--max-model-len",
        str(MAX_LEN),
        "--max-batch-size",
        "32",
        "--max-queue",
        "64",
        "--threads",
        "1",
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base, api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def dequantized_hf(artifact):
    """Hugging Face's Llama with the artifact's weights dequantized by the layout module's
    reference: the same model as the server's, through an independent implementation."""
    from transformers import AutoConfig, AutoModelForCausalLM

    state = load_file(artifact / "model.safetensors")
    qc = json.loads((artifact / "config.json").read_text())["quantization_config"]
    weights = {}
    for name, tensor in state.items():
        if name.endswith(".qweight"):
            prefix = name.removesuffix(".qweight")
            parts = {k: state[f"{prefix}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
            pw = layout.from_tensors(parts, qc["bits"], qc["group_size"])
            weights[f"{prefix}.weight"] = layout.dequantize_ref(pw, torch.float32).t().contiguous()
        elif not name.endswith((".qzeros", ".scales", ".g_idx")):
            weights[name] = tensor.float()
    config = AutoConfig.from_pretrained(artifact)
    config.__dict__.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    return model.eval()


def greedy(client, prompt, n=16, **kw):
    return client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0, **kw)


# --------------------------------------------------------------------------- correctness


def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_int4_greedy_equals_the_dequantized_reference(client, dequantized_hf, smollm2_tokenizer, prompt):
    ids = smollm2_tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = dequantized_hf.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=2)
    ref_ids = ref[0, ids.shape[1] :].tolist()
    out = greedy(client, prompt)
    assert out.choices[0].text == smollm2_tokenizer.decode(ref_ids, skip_special_tokens=True)
    assert out.usage.completion_tokens == len(ref_ids)
    assert out.usage.prompt_tokens == ids.shape[1]
    assert out.usage.total_tokens == ids.shape[1] + len(ref_ids)


def test_streaming_completion_equals_the_plain_one(client):
    plain = greedy(client, PROMPTS[0])
    chunks = list(greedy(client, PROMPTS[0], stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == plain.choices[0].text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [plain.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert sum(1 for c in chunks if c.choices and c.choices[0].text) > 3  # really streamed


def test_chat_completion_streaming_and_not(client, smollm2_tokenizer):
    messages = [{"role": "user", "content": "Name a colour."}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert plain.choices[0].message.role == "assistant"
    assert text == plain.choices[0].message.content and text.strip()
    templated = smollm2_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_tokens = len(smollm2_tokenizer(templated, add_special_tokens=False)["input_ids"])
    assert plain.usage.prompt_tokens == prompt_tokens == chunks[-1].usage.prompt_tokens


def test_stop_strings(client):
    full = greedy(client, PROMPTS[1], n=24).choices[0].text
    stop = full[8:12]  # a stop string that starts mid-output, maybe mid-token
    cut = full[: full.index(stop)]
    out = greedy(client, PROMPTS[1], n=24, stop=[stop, "never appears"])
    assert out.choices[0].text == cut and out.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in greedy(client, PROMPTS[1], n=24, stop=stop, stream=True))
    assert streamed == cut


def test_max_tokens_ends_with_length_and_seeded_sampling_repeats(client):
    out = greedy(client, PROMPTS[2], n=5)
    assert out.usage.completion_tokens == 5 and out.choices[0].finish_reason == "length"
    kw = dict(model=MODEL, prompt=PROMPTS[2], max_tokens=10, temperature=1.0, top_p=0.9)
    a, b = (client.completions.create(seed=42, **kw).choices[0].text for _ in range(2))
    assert a == b


def test_32_concurrent_streams_match_their_sequential_runs(server, client):
    prompts = [f"{i} + {i} = {2 * i}. Fact {i}: the number {i}" for i in range(32)]
    sequential = [greedy(client, p, n=8).choices[0].text for p in prompts]

    async def one(aclient, p):
        stream = await aclient.completions.create(
            model=MODEL, prompt=p, max_tokens=8, temperature=0, stream=True
        )
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def all_at_once():
        async with openai.AsyncOpenAI(
            base_url=server.base, api_key="unused", max_retries=0, timeout=600
        ) as ac:
            return await asyncio.gather(*(one(ac, p) for p in prompts))

    assert asyncio.run(all_at_once()) == sequential
    assert len(set(sequential)) > 8  # independent outputs, not one answer repeated (measured: 16)


# --------------------------------------------------------------------------- bad input


BAD = [
    ("completions", b"{not json", 400, None, "not valid JSON"),
    ("completions", b"[1, 2]", 400, None, "valid dictionary"),
    ("completions", {"model": "gpt-4", "prompt": "x"}, 404, "model", "does not exist"),
    ("completions", {"model": MODEL, "prompt": "x", "max_tokens": MAX_LEN}, 400, "max_tokens", "context"),
    ("completions", {"model": MODEL, "prompt": "x", "temperature": -0.5}, 400, "temperature", "greater than"),
    ("completions", {"model": MODEL, "prompt": "word " * MAX_LEN}, 400, "prompt", "context"),
    ("completions", {"model": MODEL, "prompt": "x", "max_tokens": "ten"}, 400, "max_tokens", "integer"),
    ("completions", {"model": MODEL, "prompt": 42}, 400, "prompt", "valid"),
    ("completions", {"model": MODEL, "prompt": [49152]}, 400, "prompt", "outside the vocabulary"),
    ("completions", {"model": MODEL, "prompt": "x", "n": 2}, 400, "n", "n > 1 is not supported"),
    ("completions", {"model": MODEL, "prompt": "x", "top_p": 0}, 400, "top_p", "greater than 0"),
    ("completions", {"model": MODEL, "prompt": "x", "max_token": 5}, 400, "max_token", "unknown field"),
    ("completions", {"model": MODEL}, 400, "prompt", "required"),
    ("completions", b'{"model": "smollm2", "prompt": "\\ud800"}', 400, "prompt", "cannot be tokenized"),
    ("chat/completions", {"model": MODEL, "messages": []}, 400, "messages", "at least 1"),
    (
        "chat/completions",
        {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]},
        400,
        "messages.0.role",
        "Input should be",
    ),
    (
        "chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**6},
        400,
        "max_tokens",
        "context",
    ),
    (
        "chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [{"a": 1}]},
        400,
        "tools",
        "not supported",
    ),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "message"), BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)]
)
def test_bad_requests_get_a_4xx_with_an_openai_error(server, path, body, status, param, message):
    kw = (
        {"content": body, "headers": {"content-type": "application/json"}}
        if isinstance(body, bytes)
        else {"json": body}
    )
    r = httpx.post(f"{server.base}/{path}", timeout=60, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and message in err["message"], err


def test_the_openai_client_raises_its_own_error_types(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], temperature=3
        )


def test_unknown_route_is_a_json_404(server):
    r = httpx.get(f"{server.url}/v2/nothing", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


# --------------------------------------------------------------------------- operations


def test_a_disconnected_stream_frees_its_slot(server):
    """A stream that could run ~500 tokens (~1 minute here) is dropped after its first
    chunk; the slot must be free within seconds, long before it would have finished."""
    body = {
        "model": MODEL,
        "prompt": "Tell me a long story.",
        "max_tokens": MAX_LEN - 20,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream("POST", f"{server.base}/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()  # kept, not looped over: leaving a for loop would close the stream
        assert next(lines).startswith("data: {")
        ss.wait_until(lambda: server.metric("qmodel:num_requests_running") == 1, 10, "the request to run")
        tokens = server.metric("qmodel:generation_tokens_total")
    # the response is closed here: the client is gone
    ss.wait_until(lambda: server.metric("qmodel:num_requests_running") == 0, 10, "the slot to be freed")
    assert server.metric("qmodel:generation_tokens_total") < tokens + 100  # it stopped, far from 492
    assert "aborted: client gone" in server.log_text()


def test_metrics_count_what_was_served(server, client):
    before = server.metric("qmodel:generation_tokens_total")
    greedy(client, PROMPTS[0], n=7)
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert server.metric("qmodel:generation_tokens_total") == before + 7
    for name in (
        "qmodel:time_to_first_token_seconds_count",
        "qmodel:inter_token_latency_seconds_count",
        "qmodel:e2e_request_latency_seconds_count",
        "qmodel:prompt_tokens_total",
    ):
        assert server.metric(name) > 0, name
    assert server.metric("qmodel:kv_cache_capacity_tokens") == 32 * MAX_LEN
    assert server.metric("qmodel:max_num_seqs") == 32
    assert 'component="weights"' in text and "qmodel:kv_cache_usage_perc" in text


def test_health_endpoints(server):
    assert httpx.get(f"{server.url}/health/live", timeout=10).json() == {"status": "alive"}
    ready = httpx.get(f"{server.url}/health/ready", timeout=10)
    assert ready.status_code == 200
    assert ready.json()["capacity"] == {
        "kv_cache_tokens": 32 * MAX_LEN,
        "max_batch": 32,
        "max_model_len": MAX_LEN,
    }
