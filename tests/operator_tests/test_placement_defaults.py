"""The operator-wide placement defaults (the chart's runtime.tolerations / runtime.nodeSelector):
every pod the operator builds gets them, and a model's own nodeSelector wins key by key."""

from __future__ import annotations

import pytest
from operator_tests.support import A100, REF, make_spec, settings

from qmodel_operator import estimator as est
from qmodel_operator import jobs
from qmodel_operator import serving as sv
from qmodel_operator.gpu import gpu_classes
from qmodel_operator.revision import revision
from qmodel_operator.settings import Settings, SettingsError
from qmodel_operator.spec import ModelFacts

GPU = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
SKU = {"key": "sku", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}
OWN = {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}
SMOLLM2 = {
    "architecture": "LlamaForCausalLM", "layers": 30, "hiddenSize": 576, "intermediateSize": 1536,
    "heads": 9, "kvHeads": 3, "headDim": 64, "vocabSize": 49152, "tiedEmbeddings": True,
    "maxPositionEmbeddings": 8192, "parameters": 134515008,
}  # fmt: skip


def _pods(spec, config: Settings) -> dict[str, dict]:
    served = sv.Served("r-0123456789ab", "s3://a/smollm2/r-0123456789ab/", 4, 128, ModelFacts(**SMOLLM2))
    (placement,) = sv.place("smollm2", spec.serving, served, gpu_classes([A100]), est.Budget())
    return {
        "quantize": jobs.build_quantize_job(REF, spec, revision(spec), config, None),
        "cleanup": jobs.build_cleanup_job(REF, spec, config),
        "server": sv.build_deployment(REF, spec, served, placement, config),
    }


def test_defaults_reach_every_pod_and_the_spec_wins_key_by_key():
    config = settings(tolerations=(SKU,), node_selector={"pool": "gpu", "zone": "a"})
    spec = make_spec(
        jobs={"nodeSelector": {"zone": "b"}, "tolerations": [OWN]},
        serving={"nodeSelector": {"zone": "b"}, "tolerations": [OWN]},
    )
    for name, manifest in _pods(spec, config).items():
        pod = manifest["spec"]["template"]["spec"]
        assert pod["tolerations"] == [GPU, SKU, OWN], name
        assert pod["nodeSelector"] == {"pool": "gpu", "zone": "b"}, name


def test_without_defaults_only_the_gpu_toleration_and_no_selector():
    for name, manifest in _pods(make_spec(), settings()).items():
        pod = manifest["spec"]["template"]["spec"]
        assert pod["tolerations"] == [GPU], name
        assert "nodeSelector" not in pod, name


def test_parsed_from_the_environment():
    s = Settings.from_env(
        {
            "QMODEL_OPERATOR_TOLERATIONS": '[{"key": "sku", "operator": "Equal", "value": "gpu", '
            '"effect": "NoSchedule"}]',
            "QMODEL_OPERATOR_NODE_SELECTOR": '{"pool": "gpu"}',
        }
    )
    assert s.tolerations == (SKU,) and s.node_selector == {"pool": "gpu"}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"QMODEL_OPERATOR_TOLERATIONS": '{"key": "sku"}'},
            "TOLERATIONS=.*expected a JSON list of tolerations",
        ),
        ({"QMODEL_OPERATOR_TOLERATIONS": '[{"kee": "sku"}]'}, "keys: effect, key, operator"),
        ({"QMODEL_OPERATOR_NODE_SELECTOR": '{"pool": 1}'}, "NODE_SELECTOR=.*JSON object of node labels"),
        ({"QMODEL_OPERATOR_NODE_SELECTOR": "pool=gpu"}, "NODE_SELECTOR='pool=gpu'"),
    ],
)
def test_bad_values_say_what_is_expected(env, message):
    with pytest.raises(SettingsError, match=message):
        Settings.from_env(env)
