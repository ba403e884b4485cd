"""Invalid QuantizedModels are refused by the real API server, with the CRD's own message.

No operator runs here: schema validation and CEL rules are the API server's job, so a bad
manifest never reaches a reconcile (and never burns a GPU).
"""

from __future__ import annotations

import json

import pytest
import yaml
from kubernetes.client.exceptions import ApiException
from operator_tests.support import REPO, spec_body

pytestmark = pytest.mark.k8s
EXAMPLES = REPO / "crds" / "examples"


def _refusal(models, name: str, spec: dict) -> str:
    with pytest.raises(ApiException) as info:
        models.create(name, spec)
    assert info.value.status == 422, info.value.body
    return json.loads(info.value.body)["message"]


CASES = [
    ("bits", spec_body(quantization={"bits": 5}), "spec.quantization.bits: Unsupported value: 5"),
    ("group-zero", spec_body(quantization={"groupSize": 0}), "groupSize must be -1 (per output channel)"),
    ("group-low", spec_body(quantization={"groupSize": -2}), "should be greater than or equal to -1"),
    (
        "static-groups",
        spec_body(quantization={"staticGroups": True}),
        "staticGroups requires descAct",
    ),
    (
        "rtn-act-order",
        spec_body(quantization={"method": "rtn", "descAct": True}),
        "descAct and staticGroups apply to method gptq only",
    ),
    (
        "damp-zero",
        spec_body(quantization={"dampPercent": 0}),
        "spec.quantization.dampPercent: Invalid value: 0",
    ),
    (
        "negative-threshold",
        spec_body(validation={"maxPerplexityIncreasePercent": -1}),
        "spec.validation.maxPerplexityIncreasePercent: Invalid value: -1",
    ),
    ("source-scheme", spec_body(source={"uri": "http://models/smollm2/"}), "spec.source.uri: Invalid value"),
    ("dataset", spec_body(validation={"dataset": "wikitext"}), "spec.validation.dataset: Invalid value"),
    ("no-artifacts", {"source": {"uri": "s3://models/smollm2/"}}, "spec.artifacts: Required value"),
    ("delete-policy", spec_body(artifacts={"deletePolicy": "Keep"}), 'Unsupported value: "Keep"'),
    (
        "no-progress",
        spec_body(serving={"strategy": {"maxSurge": 0, "maxUnavailable": 0}}),
        "maxSurge and maxUnavailable cannot both be 0",
    ),
    ("two-gpus", spec_body(serving={"gpu": {"count": 2}}), "spec.serving.gpu.count: Invalid value: 2"),
    (
        "reserved-label",
        spec_body(serving={"podLabels": {"qmodel.dev/model": "other"}}),
        "podLabels may not use the qmodel.dev/ or app.kubernetes.io/ prefixes",
    ),
    ("placement", spec_body(serving={"placement": "everywhere"}), 'Unsupported value: "everywhere"'),
]


@pytest.mark.parametrize(("case", "spec", "message"), CASES, ids=[c[0] for c in CASES])
def test_invalid_spec_is_refused_with_the_crd_message(models, case, spec, message):
    assert message in _refusal(models, f"bad-{case}", spec)
    assert models.get(f"bad-{case}") is None


def test_names_that_cannot_name_children_are_refused(models):
    long = "m" * 46  # the Job name <name>-q-<12 hex> must stay within 63 characters
    assert "metadata.name must be at most 45 characters" in _refusal(models, long, spec_body())


def test_artifacts_uri_is_immutable(models):
    models.create("immutable", spec_body())
    with pytest.raises(ApiException) as info:
        models.patch_spec("immutable", {"artifacts": {"uri": "s3://elsewhere/qmodel/"}})
    assert info.value.status == 422
    assert "artifacts.uri is immutable" in json.loads(info.value.body)["message"]
    # Everything else stays editable.
    models.patch_spec("immutable", {"validation": {"maxPerplexityIncreasePercent": 5.0}})


def test_defaults_are_filled_in_by_the_api_server(models):
    created = models.create("defaults", spec_body())
    spec = created["spec"]
    assert spec["quantization"]["bits"] == 4 and spec["quantization"]["groupSize"] == 128
    assert spec["quantization"]["calibration"] == {
        "dataset": "wiki-vital",
        "samples": 128,
        "sequenceLength": 2048,
        "seed": 0,
    }
    assert spec["validation"]["maxPerplexityIncreasePercent"] == 2.0
    assert spec["artifacts"]["deletePolicy"] == "Retain"
    assert spec["serving"]["strategy"] == {"maxSurge": 0, "maxUnavailable": 1}


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_examples_are_accepted(models, example):
    body = yaml.safe_load((EXAMPLES / example).read_text())
    models.custom.create_namespaced_custom_object(
        "qmodel.dev", "v1alpha1", models.ns, "quantizedmodels", body, dry_run="All"
    )
