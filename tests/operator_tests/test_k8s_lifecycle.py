"""The operator process against the test bed's real control plane and KWOK GPU nodes.

KWOK runs no containers: a quantize Job's pod succeeds on its node and the test bed turns the
pod annotation ``testbed.qmodel.dev/termination-message`` into the container's termination
message, which is how these tests hand the operator a Job result (set through the spec's own
``jobs.podAnnotations``). Deployment pods on KWOK nodes become Ready at once.
"""

from __future__ import annotations

import pytest
from operator_tests.k8s_support import FAIL_LABEL, RUN_SECONDS_ANNOTATION, wait_for, with_result
from operator_tests.support import spec_body

from qmodel_operator.revision import revision
from qmodel_operator.spec import QuantizedModelSpec

pytestmark = pytest.mark.k8s

A100_MIB = 81920


def _rev(spec: dict) -> str:
    return revision(QuantizedModelSpec.model_validate(spec))


def _ready(models, name, qm_operator, timeout=60.0):
    """Wait until the model is Ready for its latest spec (observedGeneration caught up)."""

    def converged():
        qm = models.get(name) or {}
        status = qm.get("status") or {}
        done = (
            status.get("phase") == "Ready"
            and status.get("observedGeneration") == qm["metadata"]["generation"]
        )
        return qm if done else None

    return wait_for(converged, f"{name} Ready", timeout, qm_operator)


def test_apply_creates_the_job_on_a_fitting_gpu_node(models, qm_operator, k8s_api):
    # 40 GiB rules out the L4 class (22.5 GiB): only the A100 nodes may run this Job.
    spec = with_result(
        spec_body(), "placed", gpu={"minMemoryMiB": 40960}, annotations={RUN_SECONDS_ANNOTATION: "30s"}
    )
    models.create("placed", spec)
    (job,) = wait_for(models.jobs, "the quantize Job", operator=qm_operator)
    assert job.metadata.name == f"placed-q-{_rev(spec)[2:]}"
    assert job.metadata.owner_references[0].kind == "QuantizedModel"
    container = job.spec.template.spec.containers[0]
    assert container.resources.limits["nvidia.com/gpu"] == "1"
    assert container.command == ["python", "-m", "qmodel_runtime.jobs.quantize"]
    assert any(e.name == "QMODEL_JOB_INPUT" for e in container.env)
    pod = wait_for(
        lambda: [p for p in models.pods(f"job-name={job.metadata.name}") if p.spec.node_name],
        "a scheduled pod",
    )[0]
    node = models.core.read_node(pod.spec.node_name)
    assert int(node.metadata.labels["nvidia.com/gpu.memory"]) >= 40960
    wait_for(models.phase_is("placed", "Quantizing"), "phase Quantizing", operator=qm_operator)


def test_passing_result_deploys_and_becomes_ready(models, qm_operator, k8s_cluster):
    spec = with_result(spec_body(), "good")
    models.create("good", spec)
    qm = _ready(models, "good", qm_operator)
    status = qm["status"]
    assert status["validation"]["passed"] is True and status["validation"]["baselinePerplexity"] == 14.09
    assert status["serving"]["revision"] == _rev(spec) == status["revision"]
    assert status["serving"]["endpoint"] == f"http://good.{models.ns}.svc:8000/v1"
    (deployment,) = models.deployments()
    (service,) = models.services()
    assert deployment.metadata.owner_references[0].name == "good"
    assert service.spec.selector == {"qmodel.dev/model": "good", "app.kubernetes.io/component": "server"}
    assert deployment.spec.strategy.rolling_update.max_surge == 0
    args = deployment.spec.template.spec.containers[0].args
    assert args[args.index("--artifact") + 1] == status["artifact"]["uri"]
    ready = models.condition("good", "Ready")
    assert ready["status"] == "True" and ready["observedGeneration"] == qm["metadata"]["generation"]
    assert {"JobSucceeded", "GatePassed", "ArtifactStored", "Serving", "Ready"} <= models.event_reasons(
        "good"
    )
    table = k8s_cluster.kubectl("get", "qm", "-n", models.ns, "-o", "wide").stdout
    print(table)  # the README's example
    header, row = table.splitlines()[:2]
    assert header.split()[:5] == ["NAME", "READY", "PHASE", "BITS", "PPL+%"]
    assert row.split()[:5] == ["good", "True", "Ready", "4", "1.4904"]


def test_failing_result_is_rejected_while_the_last_good_revision_serves(models, qm_operator):
    good = with_result(spec_body(), "gated")
    models.create("gated", good)
    served = _ready(models, "gated", qm_operator)["status"]["serving"]["revision"]
    (before,) = models.deployments()
    # A 3-bit revision whose perplexity rises 18.5%: over the 2% limit.
    bad = with_result(spec_body(quantization={"bits": 3}), "gated", quantized=16.70)
    models.patch_spec("gated", bad)
    wait_for(models.phase_is("gated", "Rejected"), "phase Rejected", operator=qm_operator)
    validated = models.condition("gated", "Validated")
    assert validated["status"] == "False" and validated["reason"] == "GateFailed"
    assert "14.09" in validated["message"] and "16.7" in validated["message"]
    status = models.status("gated")
    assert status["serving"]["revision"] == served != status["revision"]
    (after,) = models.deployments()
    assert after.metadata.name == before.metadata.name
    assert after.metadata.generation == before.metadata.generation  # not touched
    assert after.spec.template.metadata.annotations["qmodel.dev/revision"] == served
    assert len(models.jobs()) == 2  # one per revision
    assert any(e.type == "Warning" and e.reason == "GateFailed" for e in models.events("gated"))
    # Raising the limit re-gates the stored numbers: promoted, without a third Job.
    models.patch_spec("gated", {"validation": {"maxPerplexityIncreasePercent": 25.0}})
    _ready(models, "gated", qm_operator)
    assert models.status("gated")["serving"]["revision"] == _rev(bad)
    assert len(models.jobs()) == 2


def test_serving_only_change_rolls_without_a_new_job(models, qm_operator):
    models.create("rolling", with_result(spec_body(), "rolling"))
    _ready(models, "rolling", qm_operator)
    (job,) = models.jobs()
    models.patch_spec("rolling", {"serving": {"replicas": 2, "maxModelLen": 2048}})
    _ready(models, "rolling", qm_operator)
    assert models.deployments()[0].spec.replicas == 2
    assert [j.metadata.name for j in models.jobs()] == [job.metadata.name]
    args = models.deployments()[0].spec.template.spec.containers[0].args
    assert args[args.index("--max-model-len") + 1] == "2048"
    assert models.status("rolling")["serving"]["readyReplicas"] == 2


# Text the API server holds, that its YAML reader (server-side apply reads the body as YAML)
# refused as Python's default JSON wrote it: a non-BMP character (a surrogate-pair escape), and,
# written raw, C1 controls, DEL, NEL and the Unicode line separators. The fuzz test found it.
ODD_TEXT = "emoji \U0001f600, C1 \x85\x9f, DEL \x7f, separators \u2028\u2029, BOM \ufeff, tab\t."


def test_any_text_the_api_server_holds_reaches_the_children(models, qm_operator):
    serving = {"podAnnotations": {"example.com/note": ODD_TEXT}, "servedModelName": "smol \U0001f600"}
    models.create("odd", with_result(spec_body(serving=serving), "odd"))
    _ready(models, "odd", qm_operator)
    (deployment,) = models.deployments()
    assert deployment.spec.template.metadata.annotations["example.com/note"] == ODD_TEXT
    args = deployment.spec.template.spec.containers[0].args
    assert args[args.index("--served-model-name") + 1] == "smol \U0001f600"


def test_spread_sizes_one_deployment_per_gpu_class(models, qm_operator):
    models.create("spread", with_result(spec_body(serving={"placement": "spread"}), "spread"))
    _ready(models, "spread", qm_operator)
    deployments = {d.metadata.name: d for d in models.deployments()}
    assert sorted(deployments) == ["spread-23034mib", "spread-81920mib"]
    rows = {d["name"]: d for d in models.status("spread")["serving"]["deployments"]}
    assert rows["spread-23034mib"]["kvCacheTokens"] < rows["spread-81920mib"]["kvCacheTokens"]
    assert len(models.services()) == 1


def test_no_fitting_gpu_is_explained(models, qm_operator):
    llama_70b = {
        "layers": 80, "hiddenSize": 8192, "intermediateSize": 28672, "heads": 64, "kvHeads": 8,
        "headDim": 128, "vocabSize": 32000, "tiedEmbeddings": False, "maxPositionEmbeddings": 4096,
    }  # fmt: skip
    # Serving only on L4s (22.5 GiB): a 4-bit 70B model needs 41.4 GiB.
    spec = with_result(
        spec_body(serving={"gpu": {"products": ["NVIDIA-L4"]}}), "big", extra={"model": llama_70b}
    )
    models.create("big", spec)
    serving = wait_for(
        lambda: (c := models.condition("big", "Serving")).get("reason") == "NoFittingGPU" and c,
        "Serving=False NoFittingGPU",
        operator=qm_operator,
    )
    assert serving["message"].startswith(
        "needs 41.4 GiB per GPU for maxModelLen 4096; largest class has 22.5 GiB"
    )
    assert models.condition("big", "Ready")["message"] == serving["message"]
    assert models.status("big")["phase"] == "Deploying" and models.deployments() == []


def test_failed_job_fails_the_model_with_the_pods_reason(models, qm_operator):
    reason = "source s3://models/smollm2-135m/ has no config.json"
    spec = spec_body(
        jobs={
            "podLabels": {FAIL_LABEL: "true"},
            "podAnnotations": {"testbed.qmodel.dev/termination-message": reason},
            "backoffLimit": 0,
        }
    )
    models.create("broken", spec)
    wait_for(models.phase_is("broken", "Failed"), "phase Failed", operator=qm_operator)
    quantized = models.condition("broken", "Quantized")
    assert quantized["reason"] == "JobFailed" and reason in quantized["message"]
    assert any(e.type == "Warning" and e.reason == "JobFailed" for e in models.events("broken"))


def test_delete_runs_the_cleanup_job_and_children_go(models, qm_operator):
    spec = with_result(spec_body(artifacts={"deletePolicy": "Delete"}), "doomed")
    models.create("doomed", spec)
    _ready(models, "doomed", qm_operator)
    assert models.get("doomed")["metadata"]["finalizers"] == ["qmodel.dev/artifact-cleanup"]
    models.delete("doomed")
    wait_for(lambda: models.get("doomed") is None, "the model to be gone", operator=qm_operator)
    # The operator posts the Event before it releases the finalizer.
    assert {"CleanupStarted", "CleanupSucceeded"} <= models.event_reasons("doomed")
    wait_for(
        lambda: not models.deployments() and not models.services() and not models.jobs(), "children gone"
    )
    wait_for(lambda: not models.jobs("cleanup"), "the clean-up Job removed")


def test_failing_cleanup_gives_up_with_a_warning(models, qm_operator):
    spec = with_result(spec_body(artifacts={"deletePolicy": "Delete"}), "stuck")
    models.create("stuck", spec)
    _ready(models, "stuck", qm_operator)
    # From now on the Jobs' pods fail (the clean-up Job inherits spec.jobs' pod labels).
    models.patch_spec("stuck", {"jobs": {"podLabels": {FAIL_LABEL: "true"}}})
    models.delete("stuck")
    wait_for(
        lambda: models.get("stuck") is None, "the finalizer to be released", timeout=120, operator=qm_operator
    )
    warning = next(e for e in models.events("stuck") if e.reason == "CleanupFailed")
    assert warning.type == "Warning" and "remove the artifacts by hand" in warning.message


def test_operator_killed_mid_job_creates_no_duplicate_and_converges(models, qm_operator):
    spec = with_result(spec_body(), "survivor", annotations={RUN_SECONDS_ANNOTATION: "8s"})
    models.create("survivor", spec)
    (job,) = wait_for(models.jobs, "the quantize Job", operator=qm_operator)
    qm_operator.kill()
    try:
        # While the operator is down, the Job finishes; a spec change also lands.
        models.patch_spec("survivor", {"serving": {"replicas": 2}})
        wait_for(
            lambda: models.batch.read_namespaced_job(job.metadata.name, models.ns).status.succeeded,
            "the Job to finish",
            60,
        )
    finally:
        qm_operator.start()
    qm = _ready(models, "survivor", qm_operator)
    assert [j.metadata.name for j in models.jobs()] == [job.metadata.name]
    assert qm["status"]["observedGeneration"] == qm["metadata"]["generation"]
    assert models.deployments()[0].spec.replicas == 2
    # The restarted operator counts the outcome it saw once.
    metrics = qm_operator.metrics()
    assert 'qmodel_quantize_jobs_total{outcome="succeeded"}' in metrics
    assert 'qmodel_models{phase="Ready"}' in metrics


def test_namespace_deletion_is_never_blocked_by_the_finalizer(k8s_api, qm_crd, qm_operator):
    import secrets

    from kubernetes import client
    from kubernetes.client.exceptions import ApiException
    from operator_tests.k8s_support import Models

    core = client.CoreV1Api(k8s_api)
    name = f"qm-nsdel-{secrets.token_hex(3)}"
    core.create_namespace({"metadata": {"name": name}})
    try:
        models = Models(k8s_api, name)
        wait_for(lambda: core.list_namespaced_service_account(name).items, "the default ServiceAccount")
        models.create("kept", with_result(spec_body(artifacts={"deletePolicy": "Delete"}), "kept"))
        _ready(models, "kept", qm_operator)
        core.delete_namespace(name)

        def gone() -> bool:
            try:
                core.read_namespace(name)
            except ApiException as e:
                return e.status == 404
            return False

        wait_for(gone, f"namespace {name} to be deleted", timeout=120, operator=qm_operator)
    finally:
        try:
            core.delete_namespace(name)
        except ApiException as e:
            if e.status != 404:
                raise
