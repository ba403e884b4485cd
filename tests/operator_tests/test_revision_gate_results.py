"""The revision digest, the gate, and reading the Job's result: small pure pieces."""

from __future__ import annotations

import json

import pytest
from operator_tests.support import make_spec, result_message

from qmodel_operator import gate
from qmodel_operator.results import ResultError, failure_reason, parse_result
from qmodel_operator.revision import revision
from qmodel_operator.spec import Validation

# --- revision ----------------------------------------------------------------------------------


def test_revision_is_pinned():
    # A golden value: changing the digest's inputs or encoding re-quantizes every model in
    # every cluster on upgrade. If this fails on purpose, bump _SCHEME and say so in the README.
    assert revision(make_spec()) == "r-58fba3eea144"


def test_explicit_defaults_give_the_same_revision():
    explicit = make_spec(quantization={"method": "gptq", "bits": 4, "groupSize": 128, "dampPercent": 0.01})
    assert revision(explicit) == revision(make_spec())


@pytest.mark.parametrize(
    "sections",
    [
        {"source": {"uri": "s3://models/other/"}},
        {"quantization": {"bits": 3}},
        {"quantization": {"groupSize": 64}},
        {"quantization": {"descAct": True}},
        {"quantization": {"symmetric": False}},
        {"quantization": {"dampPercent": 0.02}},
        {"quantization": {"trueSequential": False}},
        {"quantization": {"method": "rtn"}},
        {"quantization": {"calibration": {"samples": 64}}},
        {"quantization": {"calibration": {"sequenceLength": 512}}},
        {"quantization": {"calibration": {"seed": 7}}},
        {"quantization": {"calibration": {"dataset": "file:///data/calib.txt"}}},
        {"validation": {"dataset": "s3://texts/held-out.txt"}},
        {"validation": {"sequenceLength": 512}},
        {"validation": {"maxSamples": 100}},
    ],
)
def test_what_changes_the_weights_or_their_measure_changes_the_revision(sections):
    assert revision(make_spec(**sections)) != revision(make_spec())


@pytest.mark.parametrize(
    "sections",
    [
        {"validation": {"maxPerplexityIncreasePercent": 5.0}},
        {"validation": {"maxPerplexity": 20.0}},
        {"source": {"credentialsSecret": "other"}},
        {"artifacts": {"credentialsSecret": "other", "deletePolicy": "Delete"}},
        {"serving": {"replicas": 3, "maxModelLen": 2048, "placement": "spread"}},
        {"jobs": {"backoffLimit": 3, "podAnnotations": {"a": "b"}}},
    ],
)
def test_thresholds_serving_and_placement_keep_the_revision(sections):
    assert revision(make_spec(**sections)) == revision(make_spec())


# --- gate ----------------------------------------------------------------------------------------


def test_gate_passes_within_the_limit_and_says_so():
    verdict = gate.decide(14.09, 14.30, Validation(max_perplexity_increase_percent=2.0))
    assert verdict.passed
    assert verdict.increase_percent == pytest.approx(1.4904, abs=1e-4)
    assert verdict.message == "perplexity 14.09 -> 14.3 (+1.49%) is within the 2% limit"


def test_gate_fails_with_both_numbers_in_the_message():
    verdict = gate.decide(14.09, 16.70, Validation(max_perplexity_increase_percent=2.0))
    assert not verdict.passed
    assert "14.09" in verdict.message and "16.7" in verdict.message
    assert "+18.52%" in verdict.message and "2% limit" in verdict.message


def test_gate_boundary_is_inclusive():
    # 10 -> 10.2 is exactly +2%: within a 2% limit.
    assert gate.decide(10.0, 10.2, Validation(max_perplexity_increase_percent=2.0)).passed
    assert not gate.decide(10.0, 10.2001, Validation(max_perplexity_increase_percent=2.0)).passed


def test_gate_absolute_ceiling():
    limits = Validation(max_perplexity_increase_percent=50.0, max_perplexity=15.0)
    verdict = gate.decide(14.09, 16.70, limits)
    assert not verdict.passed and "maxPerplexity 15" in verdict.message
    assert gate.decide(14.09, 14.5, limits).passed


def test_zero_limit_allows_no_increase_but_an_improvement():
    limits = Validation(max_perplexity_increase_percent=0.0)
    assert not gate.decide(14.0, 14.01, limits).passed
    assert gate.decide(14.0, 13.9, limits).passed


# --- result ------------------------------------------------------------------------------------


def test_parse_result_reads_the_contract_example():
    spec = make_spec()
    result = parse_result(result_message(spec, futureField={"x": 1}))  # unknown keys are ignored
    assert result.revision == revision(spec)
    assert result.baseline_perplexity == 14.09 and result.quantized_perplexity == 14.30
    assert result.artifact.manifest_digest.startswith("sha256:")
    assert result.model.layers == 30 and result.model.tied_embeddings


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("", "left no result"),
        ("Traceback ... not json", "not JSON"),
        (json.dumps({"revision": "r-1"}), "invalid at baselinePerplexity"),
    ],
)
def test_parse_result_says_what_is_wrong(message, expected):
    with pytest.raises(ResultError, match=expected):
        parse_result(message)


def test_perplexity_below_one_is_rejected():
    doc = json.loads(result_message(make_spec()))
    doc["quantizedPerplexity"] = 0.5
    with pytest.raises(ResultError, match="quantizedPerplexity"):
        parse_result(json.dumps(doc))


def test_failure_reason_takes_the_last_line_of_a_log_tail():
    tail = "Traceback (most recent call last):\n  File x\ntorch.OutOfMemoryError: CUDA out of memory\n"
    assert failure_reason(tail) == "torch.OutOfMemoryError: CUDA out of memory"
    assert failure_reason("bits must be one of 2, 3, 4, 8; got 5") == "bits must be one of 2, 3, 4, 8; got 5"
    assert failure_reason(None, exit_code=137) == "exit code 137"
    assert len(failure_reason("x" * 5000)) == 500
