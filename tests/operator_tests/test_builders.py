"""The pure manifest builders: quantize Job, clean-up Job, runtime Deployment and Service."""

from __future__ import annotations

import json

import pytest
import yaml
from operator_tests.support import A100, L4, REF, REPO, SMOLLM2, make_spec, settings

from qmodel_operator import estimator as est
from qmodel_operator import jobs
from qmodel_operator import serving as sv
from qmodel_operator.gpu import gpu_classes, gpu_node
from qmodel_operator.podspec import merge_resources
from qmodel_operator.revision import revision
from qmodel_operator.spec import ModelFacts, QuantizedModelSpec, Resources, quantity_value


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container["env"]}


def _expressions(pod_spec: dict) -> list[dict]:
    terms = pod_spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    return terms["nodeSelectorTerms"][0]["matchExpressions"]


# --- quantize Job ------------------------------------------------------------------------------


def test_job_input_follows_the_contract():
    spec = make_spec(validation={"maxPerplexity": 20.0})
    rev = revision(spec)
    doc = jobs.build_job_input(REF, spec, rev)
    assert doc["apiVersion"] == "qmodel.dev/v1alpha1" and doc["kind"] == "QuantizeJobInput"
    assert doc["model"] == {"namespace": "ml", "name": "smollm2"}
    assert doc["revision"] == rev
    assert doc["source"] == {"uri": "s3://models/smollm2-135m/"}  # no credentials in the document
    assert doc["artifacts"] == {"uri": "s3://artifacts/qmodel/"}
    assert doc["quantization"]["groupSize"] == 128 and doc["quantization"]["calibration"]["samples"] == 128
    assert doc["validation"]["maxPerplexity"] == 20.0
    assert "maxSamples" not in doc["validation"]  # null is left out, the Job's default applies
    assert "secret" not in json.dumps(doc).lower()


def test_quantize_job_gpu_placement_resources_and_ownership():
    spec = make_spec(
        jobs={
            "resources": {"requests": {"memory": "24Gi"}},
            "gpu": {"products": ["NVIDIA-A100-SXM4-80GB"]},
            "nodeSelector": {"pool": "gpu"},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
            "podAnnotations": {"testbed.qmodel.dev/termination-message": "{}"},
            "podLabels": {"team": "ml"},
            "backoffLimit": 2,
            "activeDeadlineSeconds": 3600,
        }
    )
    rev = revision(spec)
    job = jobs.build_quantize_job(REF, spec, rev, settings(), min_gpu_memory_mib=16384)
    meta, job_spec = job["metadata"], job["spec"]
    assert meta["name"] == f"smollm2-q-{rev[2:]}" and len(meta["name"]) <= 63
    assert meta["ownerReferences"][0] | {} == {
        "apiVersion": "qmodel.dev/v1alpha1", "kind": "QuantizedModel", "name": "smollm2",
        "uid": REF.uid, "controller": True, "blockOwnerDeletion": True,
    }  # fmt: skip
    assert job_spec["backoffLimit"] == 2 and job_spec["activeDeadlineSeconds"] == 3600
    pod = job_spec["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["python", "-m", "qmodel_runtime.jobs.quantize"]
    assert container["image"] == "registry.local/qmodel-runtime:test"
    # Defaults merged under the spec: memory from the spec, cpu from the operator; one GPU.
    assert container["resources"]["requests"] == {"cpu": "2", "memory": "24Gi", "nvidia.com/gpu": 1}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert _expressions(pod) == [
        {"key": "nvidia.com/gpu.memory", "operator": "Gt", "values": ["16383"]},
        {"key": "nvidia.com/gpu.product", "operator": "In", "values": ["NVIDIA-A100-SXM4-80GB"]},
    ]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    assert pod["nodeSelector"] == {"pool": "gpu"}
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    template_meta = job_spec["template"]["metadata"]
    assert template_meta["annotations"] == {"testbed.qmodel.dev/termination-message": "{}"}
    assert template_meta["labels"]["team"] == "ml"
    assert template_meta["labels"]["qmodel.dev/revision"] == rev


def test_quantize_job_credentials_are_secret_references_only():
    spec = make_spec()
    job = jobs.build_quantize_job(REF, spec, revision(spec), settings(), None)
    env = _env(job["spec"]["template"]["spec"]["containers"][0])
    assert json.loads(env["QMODEL_JOB_INPUT"]["value"]) == jobs.build_job_input(REF, spec, revision(spec))
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION"):
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "artifacts-s3", "key": key, "optional": True}
        source = env[f"QMODEL_SOURCE_{key}"]["valueFrom"]["secretKeyRef"]
        assert source == {"name": "models-s3", "key": key, "optional": True}
    assert all("value" not in e for name, e in env.items() if "AWS" in name)
    # Without an affinity minimum the Job still needs a GPU node (GFD labels present).
    assert _expressions(job["spec"]["template"]["spec"]) == [
        {"key": "nvidia.com/gpu.memory", "operator": "Exists"}
    ]


def test_pvc_uris_are_mounted_where_the_runtime_looks():
    spec = make_spec(source={"uri": "pvc://models/smollm2/"}, artifacts={"uri": "pvc://artifacts/qmodel/"})
    job = jobs.build_quantize_job(REF, spec, revision(spec), settings(), None)
    pod = job["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["readOnly"] for m in pod["containers"][0]["volumeMounts"] if "readOnly" in m}
    assert mounts == {"/mnt/pvc/artifacts": False, "/mnt/pvc/models": True}
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {"models", "artifacts"}


def test_cleanup_job_removes_the_model_prefix_and_is_not_owned():
    spec = make_spec(artifacts={"deletePolicy": "Delete"}, jobs={"podLabels": {"team": "ml"}})
    job = jobs.build_cleanup_job(REF, spec, settings(cleanup_backoff_limit=3))
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == [
        "python",
        "-m",
        "qmodel_runtime.storage",
        "rm",
        "s3://artifacts/qmodel/smollm2/",
    ]
    assert "ownerReferences" not in job["metadata"]
    assert job["spec"]["backoffLimit"] == 3 and job["spec"]["activeDeadlineSeconds"] == 900
    assert "nvidia.com/gpu" not in json.dumps(container["resources"])
    assert _env(container)["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "artifacts-s3"
    assert job["metadata"]["name"] == f"smollm2-cleanup-{REF.uid[:8]}"


# --- serving -----------------------------------------------------------------------------------


def _served(**facts) -> sv.Served:
    return sv.Served("r-0123456789ab", "s3://artifacts/qmodel/smollm2/r-0123456789ab/", 4, 128,
                     ModelFacts.model_validate({**SMOLLM2, **facts}))  # fmt: skip


def test_single_placement_is_sized_to_the_smallest_fitting_class():
    spec = make_spec()
    classes = gpu_classes([A100, L4])
    (placement,) = sv.place("smollm2", spec.serving, _served(), classes, est.Budget())
    assert placement.deployment == "smollm2" and placement.gpu_class.memory_mib == 23034
    manifest = sv.build_deployment(REF, spec, _served(), placement, settings())
    pod = manifest["spec"]["template"]["spec"]
    # Admits the L4 class and every larger one (Gt 23033).
    assert _expressions(pod) == [{"key": "nvidia.com/gpu.memory", "operator": "Gt", "values": ["23033"]}]
    args = pod["containers"][0]["args"]
    assert args[:2] == ["--artifact", "s3://artifacts/qmodel/smollm2/r-0123456789ab/"]
    flags = dict(zip(args[::2], args[1::2], strict=True))
    sizing = placement.sizing
    assert flags["--max-model-len"] == "4096"  # default: min(model context 8192, 4096)
    assert flags["--max-batch-size"] == str(sizing.max_batch_size)
    assert flags["--kv-cache-tokens"] == str(sizing.kv_cache_tokens)
    assert flags["--served-model-name"] == "smollm2"


def test_deployment_probes_strategy_and_no_surge_by_default():
    spec = make_spec(serving={"startupTimeoutSeconds": 600, "replicas": 2})
    (placement,) = sv.place("smollm2", spec.serving, _served(), gpu_classes([A100]), est.Budget())
    manifest = sv.build_deployment(REF, spec, _served(), placement, settings())
    assert manifest["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1},
    }
    assert manifest["spec"]["replicas"] == 2
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    assert container["startupProbe"]["httpGet"]["path"] == "/health/live"
    assert container["startupProbe"]["periodSeconds"] * container["startupProbe"]["failureThreshold"] == 600
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert manifest["metadata"]["ownerReferences"][0]["uid"] == REF.uid
    # The selector is stable across revisions (it is immutable); the revision lives in the template.
    assert manifest["spec"]["selector"]["matchLabels"] == {
        "qmodel.dev/model": "smollm2",
        "qmodel.dev/deployment": "smollm2",
    }
    assert manifest["spec"]["template"]["metadata"]["annotations"]["qmodel.dev/revision"] == "r-0123456789ab"


def test_spread_gives_each_class_its_own_sizing_behind_one_service():
    spec = make_spec(serving={"placement": "spread"})
    placements = sv.place("smollm2", spec.serving, _served(), gpu_classes([A100, L4]), est.Budget())
    assert [p.deployment for p in placements] == ["smollm2-23034mib", "smollm2-81920mib"]
    small, large = (p.sizing for p in placements)
    assert small.kv_cache_tokens < large.kv_cache_tokens
    for placement in placements:
        pod = sv.build_deployment(REF, spec, _served(), placement, settings())["spec"]["template"]["spec"]
        assert _expressions(pod) == [
            {
                "key": "nvidia.com/gpu.memory",
                "operator": "In",
                "values": [str(placement.gpu_class.memory_mib)],
            }
        ]
    service = sv.build_service(REF)
    assert service["spec"]["selector"] == {
        "qmodel.dev/model": "smollm2",
        "app.kubernetes.io/component": "server",
    }
    assert service["spec"]["ports"][0]["port"] == 8000


def test_no_fitting_class_explains_by_how_much():
    from operator_tests.support import LLAMA_70B

    spec = make_spec()
    served = _served(**LLAMA_70B, architecture="LlamaForCausalLM")
    result = sv.place("llama", spec.serving, served, gpu_classes([L4]), est.Budget())
    assert isinstance(result, sv.NoFit) and result.reason == "NoFittingGPU"
    assert result.message.startswith(
        "needs 41.4 GiB per GPU for maxModelLen 4096; largest class has 22.5 GiB"
    )
    assert "NVIDIA-L4" in result.message


def test_max_model_len_beyond_the_model_context_is_refused_in_user_terms():
    spec = make_spec(serving={"maxModelLen": 16384})
    result = sv.place("smollm2", spec.serving, _served(), gpu_classes([A100]), est.Budget())
    assert isinstance(result, sv.NoFit) and result.reason == "MaxModelLenTooLong"
    assert "16384 exceeds the model's context of 8192 tokens" in result.message


def test_gpu_classes_from_gfd_labels():
    labels = {
        "nvidia.com/gpu.memory": "23034",
        "nvidia.com/gpu.product": "NVIDIA-L4",
        "nvidia.com/gpu.count": "1",
    }
    node = {
        "metadata": {"name": "gpu-l4-0", "labels": labels},
        "status": {"allocatable": {"nvidia.com/gpu": "1"}},
    }
    parsed = gpu_node(node)
    assert parsed is not None and parsed.memory_mib == 23034 and parsed.count == 1
    assert gpu_node({"metadata": {"name": "cpu-0", "labels": {}}}) is None
    cordoned = gpu_node({**node, "spec": {"unschedulable": True}})
    assert gpu_classes([cordoned]) == ()
    classes = gpu_classes([A100, L4, parsed])
    assert [(c.memory_mib, c.nodes) for c in classes] == [(23034, 2), (81920, 1)]
    assert gpu_classes([A100, L4], products=["NVIDIA-L4"])[0].memory_mib == 23034
    assert gpu_classes([A100, L4], min_gpus=2) == gpu_classes([A100])


@pytest.mark.parametrize("bad", ["qmodel.dev/revision", "app.kubernetes.io/name"])
def test_reserved_pod_labels_are_refused(bad):
    with pytest.raises(ValueError, match="podLabels may not use"):
        make_spec(serving={"podLabels": {bad: "x"}})


@pytest.mark.parametrize("example", sorted(p.name for p in (REPO / "crds" / "examples").glob("*.yaml")))
def test_examples_parse_and_build(example):
    body = yaml.safe_load((REPO / "crds" / "examples" / example).read_text())
    spec = QuantizedModelSpec.model_validate(body["spec"])
    job = jobs.build_quantize_job(REF, spec, revision(spec), settings(), spec.jobs.gpu.min_memory_mib)
    assert job["spec"]["template"]["spec"]["containers"][0]["env"][0]["name"] == "QMODEL_JOB_INPUT"


# --- resources: the operator's defaults under the spec's ---------------------------------------

DEFAULTS = {"requests": {"cpu": "2", "memory": "16Gi"}, "limits": {"memory": "32Gi"}}


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1.5Gi", 1610612736),
        ("100m", 0.1),
        ("+1500m", 1.5),
        ("1e3", 1000),
        (".5Ki", 512),
        (7, 7),
        ("2E-1", 0.2),
    ],
)
def test_quantity_value_reads_every_suffix(text, value):
    assert float(quantity_value(text)) == pytest.approx(value)


def test_quantity_value_refuses_what_is_not_a_quantity():
    with pytest.raises(ValueError, match="is not a Kubernetes quantity"):
        quantity_value("12 GiB")


@pytest.mark.parametrize(
    ("spec", "requests", "limits"),
    [
        # Within the defaults: merged key by key.
        ({"requests": {"memory": "24Gi"}}, {"cpu": "2", "memory": "24Gi"}, {"memory": "32Gi"}),
        # A request over the default limit raises the limit with it.
        ({"requests": {"memory": "64Gi"}}, {"cpu": "2", "memory": "64Gi"}, {"memory": "64Gi"}),
        # A limit under the default request lowers the request with it.
        ({"limits": {"memory": "8Gi"}}, {"cpu": "2", "memory": "8Gi"}, {"memory": "8Gi"}),
        # Equal amounts written differently are no conflict.
        ({"limits": {"memory": "17179869184"}}, {"cpu": "2", "memory": "16Gi"}, {"memory": "17179869184"}),
        ({"requests": {"cpu": "500m"}, "limits": {"cpu": 1}}, {"cpu": "500m", "memory": "16Gi"}, None),
    ],
)
def test_defaults_never_contradict_the_spec(spec, requests, limits):
    merged = merge_resources(DEFAULTS, Resources.model_validate(spec), gpus=1)
    assert merged["requests"] == {**requests, "nvidia.com/gpu": 1}
    expected_limits = limits if limits is not None else {"memory": "32Gi", **spec["limits"]}
    assert merged["limits"] == {**expected_limits, "nvidia.com/gpu": 1}
    for key in merged["requests"].keys() & merged["limits"].keys():
        assert quantity_value(merged["requests"][key]) <= quantity_value(merged["limits"][key])
