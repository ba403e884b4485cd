"""The examples and the demo's bookkeeping, without a cluster (the e2e tests apply the examples for real)."""

from __future__ import annotations

import pytest
import yaml
from e2e.stack import EXAMPLES
from e2e.watch import Timeline

from qmodel_operator.spec import QuantizedModelSpec

CRD_DEFAULT_GATE = QuantizedModelSpec.model_validate(
    {"source": {"uri": "s3://models/m/"}, "artifacts": {"uri": "s3://artifacts/a/"}}
).validation.max_perplexity_increase_percent


@pytest.mark.parametrize("name", ["smollm2-135m", "smollm2-135m-strict"])
def test_examples_are_valid_models_for_the_chart_s_secret(name):
    body = yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())
    assert body["kind"] == "QuantizedModel" and body["metadata"]["name"] == name
    spec = QuantizedModelSpec.model_validate(body["spec"])
    assert spec.source.uri == "s3://models/smollm2-135m/"  # where the demo uploads the model
    assert spec.artifacts.credentials_secret == "qmodel-s3"  # the chart's s3.secret.name default
    assert spec.serving.max_batch_size is not None  # on CPU the KV cache lives in host memory


def test_strict_variant_keeps_the_crd_default_gate():
    strict = yaml.safe_load((EXAMPLES / "smollm2-135m-strict.yaml").read_text())
    main = yaml.safe_load((EXAMPLES / "smollm2-135m.yaml").read_text())
    assert strict["spec"]["validation"]["maxPerplexityIncreasePercent"] == CRD_DEFAULT_GATE == 2.0
    assert main["spec"]["validation"]["maxPerplexityIncreasePercent"] > CRD_DEFAULT_GATE
    assert strict["spec"]["source"] == main["spec"]["source"]
    assert strict["spec"]["validation"]["maxSamples"] == main["spec"]["validation"]["maxSamples"]


def test_timeline_durations_are_the_gaps_between_phases():
    timeline = Timeline("m", phases={"Pending": 0.5, "Quantizing": 2.0, "Deploying": 190.0, "Ready": 217.0})
    assert timeline.durations() == [
        ("Pending", 1.5),
        ("Quantizing", 188.0),
        ("Deploying", 27.0),
        ("Ready", 0.0),
    ]
    assert not timeline.seen("Ready") and timeline.seen("Rejected")
