"""Server limits and lifecycle on the tiny random model (fast to load, ~ms per token):
admission control (429), a schemathesis run over the OpenAPI schema, SIGTERM, and an
artifact that fails verification."""

from __future__ import annotations

import json
import signal
import threading

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from runtime_tests import serve_support as ss
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode

MODEL = "tiny"
LONG = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 3900, "ignore_eos": True, "stream": True}


def stream_in_background(url: str, body: dict) -> tuple[threading.Thread, dict]:
    """POST a streaming request from a thread; the dict collects status, chunks and the end."""
    result: dict = {"chunks": [], "done": False}

    def run():
        try:
            with httpx.stream("POST", url, json=body, timeout=120) as r:
                result["status"] = r.status_code
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        result["done"] = True
                    elif line.startswith("data: "):
                        result["chunks"].append(json.loads(line[6:]))
        except httpx.HTTPError as exc:
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


@pytest.fixture(scope="module")
def tiny():
    return ss.tiny_int4()


@pytest.fixture(scope="module")
def small_server(tiny):
    """One slot, a queue of one: the second waiting request is refused."""
    with ss.running_server(
        tiny,
        "--max-model-len",
        "4096",
        "--max-batch-size",
        "1",
        "--max-queue",
        "1",
        "--shutdown-grace",
        "1",
        "--threads",
        "1",
    ) as srv:
        yield srv


def test_a_full_queue_answers_429_with_retry_after(small_server):
    srv = small_server
    url = f"{srv.base}/completions"
    stream_in_background(url, LONG)
    ss.wait_until(lambda: srv.metric("qmodel:num_requests_running") == 1, 30, "the first request to run")
    stream_in_background(url, LONG)
    ss.wait_until(lambda: srv.metric("qmodel:num_requests_waiting") == 1, 30, "the second request to wait")
    r = httpx.post(url, json={"model": MODEL, "prompt": "x", "max_tokens": 2}, timeout=30)
    assert r.status_code == 429, r.text
    assert r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "queue_full" and "retry" in r.json()["error"]["message"]
    assert srv.metric("qmodel:request_rejected_total") == 1
    # the two streams run on; the fixture's shutdown (1 s grace) cuts them off


@pytest.fixture(scope="module")
def fuzz_server(tiny):
    """Short context so any generated max_tokens finishes in well under a second."""
    with ss.running_server(tiny, "--max-model-len", "64", "--max-batch-size", "4", "--threads", "1") as srv:
        yield srv


def fuzz_operation(operation, mode: GenerationMode, examples: int) -> int:
    """Call ``operation`` with ``examples`` generated cases; -> how many reached past validation."""
    reached = []

    # derandomize: the same examples on every run, so a pass or a failure repeats
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(data=st.data())
    def run(data):
        case = data.draw(operation.as_strategy(generation_mode=mode))
        # Most generated bodies name a random model (a 404 before any work): aim them at ours
        # so valid ones reach tokenization, sampling and generation.
        if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
            case.body["model"] = MODEL
        response = case.call_and_validate(checks=[not_a_server_error])
        reached.append(response.status_code == 200)

    run()
    return sum(reached)


# Negative cases only for POST: the GET operations take no input to get wrong.
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_generated_input_makes_a_5xx(fuzz_server, mode):
    """Schemathesis over every operation of /openapi.json, valid and invalid bodies; the
    check fails on any 5xx. Some positive cases must be served (not only refused by
    validation): random values of the fields we refuse (n > 1, logprobs, penalties...) make
    most of them 400s, which is right, but generation must be reached too."""
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    paths = {op.path for op in operations}
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health/ready"} <= paths
    served = {
        op.path: fuzz_operation(op, mode, 30 if op.method == "post" else 3)
        for op in operations
        if op.method == "post" or mode == GenerationMode.POSITIVE
    }
    if mode == GenerationMode.POSITIVE:
        assert served["/v1/completions"] >= 2 and served["/v1/chat/completions"] >= 2, served


def _refused(url: str) -> bool:
    try:
        r = httpx.post(url, json={"model": MODEL, "prompt": "x", "max_tokens": 1}, timeout=5)
    except httpx.TransportError:
        return True  # the listener is closed
    return r.status_code == 503  # raced in before it closed: refused by the drain


def test_sigterm_refuses_new_requests_finishes_short_ones_and_cuts_off_long_ones(tiny):
    srv = ss.start_server(
        tiny, "--max-model-len", "4096", "--max-batch-size", "2", "--shutdown-grace", "5", "--threads", "1"
    )
    try:
        url = f"{srv.base}/completions"
        long_thread, long_result = stream_in_background(url, LONG)
        ss.wait_until(lambda: srv.metric("qmodel:num_requests_running") == 1, 30, "the long request to run")
        short_thread, short_result = stream_in_background(url, {**LONG, "max_tokens": 30})
        ss.wait_until(lambda: short_result["chunks"], 30, "the short request to stream")
        srv.proc.send_signal(signal.SIGTERM)
        ss.wait_until(lambda: _refused(url), 4, "new requests to be refused")
        assert srv.proc.poll() is None  # still serving what is in flight, within the grace
        short_thread.join(30)
        long_thread.join(30)
        code = srv.proc.wait(30)
    finally:
        ss.stop_server(srv)
    assert short_result["chunks"][-1]["choices"][0]["finish_reason"] == "length" and short_result["done"]
    # the long one (3900 tokens) cannot finish in 5 s: cut off, with a cleanly terminated stream
    assert long_result["chunks"][-1]["choices"][0]["finish_reason"] == "abort" and long_result["done"]
    assert code == -signal.SIGTERM  # uvicorn re-raises the signal once shut down
    log = srv.log_text()
    assert "no new requests" in log and "cut off" in log


def test_an_artifact_that_fails_verification_never_gets_ready(tiny):
    bad = ss.copy_artifact(tiny, "tampered")
    with open(bad / "model.safetensors", "r+b") as fh:
        fh.seek(-100, 2)
        fh.write(b"\x00" * 8)
    with ss.running_server(bad, "--threads", "1", wait_ready=False) as srv:
        body = ss.wait_until(lambda: _failed(srv), 60, "startup to fail")
        assert "model.safetensors" in body["reason"] and "sha256" in body["reason"]
        assert (
            httpx.get(f"{srv.url}/health/live", timeout=5).status_code == 200
        )  # up, for the reason to be read
        r = httpx.post(f"{srv.base}/completions", json={"model": "tampered", "prompt": "x"}, timeout=5)
        assert r.status_code == 503 and "not ready" in r.json()["error"]["message"]
        assert "NOT READY" in srv.log_text()


def _failed(srv):
    r = httpx.get(f"{srv.url}/health/ready", timeout=5)
    assert r.status_code == 503
    return r.json() if r.json()["status"] == "failed" else None
