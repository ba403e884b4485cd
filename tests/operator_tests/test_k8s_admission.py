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


# --- what a Job or Deployment may not carry: refused here, not at reconcile time ---------------

LABEL_KEYS = "keys must be label keys"
TOLERATE = "spec.jobs.tolerations[0]"
CHILD_CASES = [
    ("label-key", spec_body(serving={"nodeSelector": {"ü": "x"}}), f"nodeSelector {LABEL_KEYS}"),
    ("label-prefix", spec_body(jobs={"podLabels": {"a.-b/x": "y"}}), f"podLabels {LABEL_KEYS}"),
    ("label-long-name", spec_body(jobs={"nodeSelector": {"k" * 64: "y"}}), f"nodeSelector {LABEL_KEYS}"),
    (
        "label-long-prefix",
        spec_body(serving={"podLabels": {"a" * 254 + "/k": "y"}}),
        f"podLabels {LABEL_KEYS}",
    ),
    (
        "label-value",
        spec_body(serving={"podLabels": {"team": "a b"}}),
        "spec.serving.podLabels.team: Invalid value",
    ),
    (
        "label-value-long",
        spec_body(jobs={"nodeSelector": {"k": "v" * 64}}),
        "spec.jobs.nodeSelector.k: Too long",
    ),
    (
        "annotation-key",
        spec_body(jobs={"podAnnotations": {"a b": ""}}),
        "podAnnotations keys must be qualified",
    ),
    (
        "toleration-no-key",
        spec_body(jobs={"tolerations": [{"key": "", "operator": "Equal"}]}),
        f"{TOLERATE}: Invalid value: a toleration without a key must have operator Exists",
    ),
    (
        "toleration-exists-value",
        spec_body(jobs={"tolerations": [{"key": "k", "operator": "Exists", "value": "v"}]}),
        "a toleration with operator Exists must have no value",
    ),
    (
        "toleration-seconds",
        spec_body(jobs={"tolerations": [{"key": "k", "operator": "Exists", "tolerationSeconds": 5}]}),
        "tolerationSeconds applies to effect NoExecute only",
    ),
    (
        "toleration-operator",
        spec_body(jobs={"tolerations": [{"key": "k", "operator": "In"}]}),
        f'{TOLERATE}.operator: Unsupported value: "In"',
    ),
    (
        "toleration-key",
        spec_body(jobs={"tolerations": [{"key": "ü", "operator": "Exists"}]}),
        f"{TOLERATE}.key",
    ),
    (
        "toleration-key-prefix",
        spec_body(jobs={"tolerations": [{"key": "a" * 254 + "/k", "operator": "Exists"}]}),
        "a toleration key's prefix (before '/') must be a DNS subdomain",
    ),
    (
        "toleration-value",
        spec_body(jobs={"tolerations": [{"key": "k", "value": "a/b"}]}),
        f"{TOLERATE}.value",
    ),
    ("secret", spec_body(source={"uri": "s3://models/m/", "credentialsSecret": "a.-b"}), "credentialsSecret"),
    ("secret-dots", spec_body(artifacts={"credentialsSecret": "a..b"}), "spec.artifacts.credentialsSecret"),
    (
        "negative",
        spec_body(jobs={"resources": {"requests": {"cpu": "-1m"}}}),
        "spec.jobs.resources.requests.cpu",
    ),
    (
        "negative-int",
        spec_body(serving={"resources": {"limits": {"memory": -1}}}),
        "greater than or equal to 0",
    ),
    (
        "exponent",
        spec_body(jobs={"resources": {"limits": {"memory": ".2e-7907297307251171"}}}),
        "spec.jobs.resources.limits.memory",
    ),
    ("exponent-decimal", spec_body(jobs={"resources": {"limits": {"cpu": "1e1.5"}}}), "limits.cpu"),
    (
        "resource-name",
        spec_body(jobs={"resources": {"limits": {"gpu": 1}}}),
        "resource names must be cpu, memory",
    ),
    (
        "resource-kubernetes-io",
        spec_body(serving={"resources": {"requests": {"kubernetes.io/x": 1}}}),
        "resource names must be",
    ),
    (
        "extended-request-alone",
        spec_body(jobs={"resources": {"requests": {"example.com/widget": 1}}}),
        "a request for one needs a limit of the same amount",
    ),
    (
        "extended-request-differs",
        spec_body(
            serving={"resources": {"requests": {"hugepages-2Mi": "4Mi"}, "limits": {"hugepages-2Mi": "8Mi"}}}
        ),
        "hugepages and extended resources cannot be overcommitted",
    ),
    (
        "request-over-limit",
        spec_body(jobs={"resources": {"requests": {"memory": "2Gi"}, "limits": {"memory": "1.5Gi"}}}),
        "a request may not exceed its limit",
    ),
    (
        "extended-fraction",
        spec_body(serving={"resources": {"limits": {"example.com/widget": "1500m"}}}),
        "extended resources (such as nvidia.com/gpu) are counted in whole units",
    ),
    (
        "hugepages-multiple",
        spec_body(jobs={"resources": {"limits": {"hugepages-2Mi": "3Mi"}}}),
        "a hugepages-<size> amount must be a whole multiple of its page size",
    ),
    ("uri-control", spec_body(source={"uri": "s3://models/a\x01b/"}), "spec.source.uri: Invalid value"),
    ("uri-del", spec_body(artifacts={"uri": "file:///a\x7fb/"}), "spec.artifacts.uri: Invalid value"),
    ("served-name", spec_body(serving={"servedModelName": "a\x1bb"}), "spec.serving.servedModelName"),
    ("product", spec_body(serving={"gpu": {"products": ["NVIDIA A100/80GB"]}}), "products[0]: Invalid value"),
]


@pytest.mark.parametrize(("case", "spec", "message"), CHILD_CASES, ids=[c[0] for c in CHILD_CASES])
def test_what_a_child_may_not_carry_is_refused(models, case, spec, message):
    assert message in _refusal(models, f"bad-{case}", spec)


def test_what_a_child_may_carry_is_accepted_up_to_the_limits(models):
    """The boundaries of each rule above: all of this is valid for a Job and a Deployment."""
    longest = "a" * 63
    prefix = ".".join(["b" * 63] * 3) + "." + "c" * 61  # 253 characters
    labels = {f"{prefix}/{longest}": longest, "A_b.C-1": "", "x": "Y"}
    tolerations = [
        {"operator": "Exists"},  # no key: tolerates everything
        {"key": "example.com/k", "operator": "Exists", "value": "", "effect": ""},
        {"key": f"{prefix}/{longest}", "operator": "Equal", "value": longest, "effect": "NoSchedule"},
        {"key": "k", "value": "v", "effect": "NoExecute", "tolerationSeconds": 0},
    ]
    resources = {
        "requests": {"cpu": "1.5", "memory": "1e9", "ephemeral-storage": ".5Gi", "hugepages-2Mi": "4Mi"},
        # Equal amounts written differently; a limit alone for an extended resource.
        "limits": {"memory": "1G", "hugepages-2Mi": "4194304", "example.com/widget": 2, "cpu": "+1500m"},
    }
    spec = spec_body(
        source={"uri": "s3://models/smollm2/ü€/", "credentialsSecret": "s3.creds-1"},
        artifacts={"credentialsSecret": "a" * 253},
        serving={
            "nodeSelector": labels,
            "podLabels": labels,
            "podAnnotations": {"Example.COM/Owner": "team\tα\n"},
            "tolerations": tolerations,
            "resources": resources,
            "servedModelName": "org/Model name ü",
            "gpu": {"products": ["NVIDIA-A100-SXM4-80GB"]},
        },
        jobs={"nodeSelector": labels, "tolerations": tolerations, "resources": resources},
    )
    created = models.create("boundaries", spec)
    assert created["spec"]["serving"]["nodeSelector"] == labels
