"""Faults: a quantize pod that crashes or is OOM-killed, an S3 server restarted mid-upload, a GPU
node removed while serving.

The Job and node faults run on a test bed of their own (``bed``: KWOK nodes only) with the real
operator process; the S3 fault runs the artifact upload as the quantize Job does, as a process
(``python -m qmodel_runtime.storage upload``), against a real versitygw that is killed and
restarted under it. The runtime's refusal of a corrupted artifact is covered where it lives
(tests/runtime_tests/test_loader_artifact.py, storage/test_storage_s3_faults.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kubernetes import client
from operator_tests.k8s_support import (
    FAIL_LABEL,
    MESSAGE_ANNOTATION,
    RUN_SECONDS_ANNOTATION,
    Models,
    wait_for,
    with_result,
)
from operator_tests.support import job as job_state
from operator_tests.support import make_spec, observed, spec_body
from operator_tests.support import settings as operator_settings
from reliability_tests.chaos_support import Bed, running_bed

from qmodel_operator import lifecycle
from qmodel_operator.observed import PodOutcome
from qmodel_operator.results import kill_note
from qmodel_runtime import manifest as mf
from qmodel_runtime.storage import NotFoundError, StorageSettings, download, revisions
from testbed.kwok import EXIT_CODE_ANNOTATION, REASON_ANNOTATION
from testbed.nodes import A100_80GB, NodeSet
from testbed.s3server import S3Server, s3_bucket, s3_server  # noqa: F401  (fixtures)

# A100s run the quantize Jobs; the "D" class (one GPU a node) serves, and loses a node.
D_PRODUCT = "TESTBED-GPU-D"
NODE_SETS = (A100_80GB, NodeSet("gpud", count=2, gpus=1, gpu_product=D_PRODUCT, gpu_memory_mib=16384))


@pytest.fixture(scope="module")
def bed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    yield from running_bed(request, tmp_path_factory, NODE_SETS)


CRASH = "RuntimeError: CUDA error: an illegal memory access was encountered"


# --- (a) the quantize pod fails: bounded retries, then Failed with the reason -------------------


def _failing(exit_code: str, message: str | None = None, reason: str | None = None) -> dict:
    annotations = {EXIT_CODE_ANNOTATION: exit_code, RUN_SECONDS_ANNOTATION: "200ms"}
    if message is not None:
        annotations[MESSAGE_ANNOTATION] = message
    if reason is not None:
        annotations[REASON_ANNOTATION] = reason
    jobs = {"podLabels": {FAIL_LABEL: "true"}, "podAnnotations": annotations, "backoffLimit": 1}
    return spec_body(jobs=jobs)


FAILURES = {
    # name: (spec, text the Quantized condition and the Warning Event must carry)
    "crash": (_failing("1", CRASH), CRASH),
    "oom": (_failing("137", reason="OOMKilled"), "ran out of memory (OOMKilled, exit code 137)"),
    "killed": (_failing("137"), "killed by SIGKILL (exit code 137), most often for memory"),
}


@pytest.mark.k8s
@pytest.mark.slow
def test_failing_quantize_pod_is_retried_then_the_model_fails_with_the_reason(bed: Bed) -> None:
    models = bed.models(bed.namespace("fault-job"))
    for name, (spec, _) in FAILURES.items():
        models.create(name, spec)
    for name, (_, text) in FAILURES.items():
        # backoffLimit 1: the Job controller runs a second pod ~10 s after the first fails.
        wait_for(models.phase_is(name, "Failed"), f"{name}: phase Failed", 120, bed.operator)
        (job,) = [j for j in models.jobs() if j.metadata.labels["qmodel.dev/model"] == name]
        assert job.status.failed == 2, f"{name}: {job.status.failed} failed pods, backoffLimit 1 allows 2"
        assert len(models.pods(f"job-name={job.metadata.name}")) == 2  # no third try
        quantized = models.condition(name, "Quantized")
        assert quantized["status"] == "False" and quantized["reason"] == "JobFailed"
        assert "failed after 2 attempts (spec.jobs.backoffLimit 1)" in quantized["message"]
        assert text in quantized["message"], quantized["message"]
        assert models.condition(name, "Ready")["reason"] == "Failed"
        (event,) = [e for e in models.events(name) if e.reason == "JobFailed"]
        assert event.type == "Warning" and text in event.message
    # Failed is final: the operator created no other Job for these revisions.
    assert len(models.jobs()) == len(FAILURES)


def _pod(message: str | None, exit_code: int, reason: str) -> PodOutcome:
    return PodOutcome(found=True, message=message, exit_code=exit_code, reason=reason)


def _failed_message(pod: PodOutcome, failed: int = 2) -> str:
    spec = make_spec(jobs={"backoffLimit": failed - 1})
    rev = lifecycle.revision_of(spec)
    world = observed(spec, jobs=(job_state("m-q-1", rev, state="failed", failed=failed),), pod=pod)
    status = lifecycle.decide(world, operator_settings()).status
    return next(c.message for c in status.conditions if c.type == "Quantized")


def test_failure_message_counts_attempts_and_explains_kills() -> None:
    assert _failed_message(_pod(CRASH, 1, "Error")).startswith(
        f"Job m-q-1 failed after 2 attempts (spec.jobs.backoffLimit 1): {CRASH}; fix the cause"
    )
    assert "after 1 attempt (spec.jobs.backoffLimit 0)" in _failed_message(_pod(CRASH, 1, "Error"), 1)
    oom = _failed_message(_pod(None, 137, "OOMKilled"))
    assert ": the container ran out of memory (OOMKilled, exit code 137); raise spec.jobs" in oom
    # With FallbackToLogsOnError the log's last line comes along, after what happened.
    tail = _failed_message(_pod("gptq 4-bit: 15/30 layers\n", 137, "OOMKilled"))
    assert "(OOMKilled, exit code 137); raise spec.jobs.resources.limits.memory; last output: gptq" in tail
    assert "SIGKILL (exit code 137)" in _failed_message(_pod(None, 137, "Error"))


def test_kill_note_only_for_kills() -> None:
    assert kill_note(1, "Error") is None and kill_note(0, "Completed") is None
    assert kill_note(None, None) is None
    assert "OOMKilled" in kill_note(137, "OOMKilled") and "OOMKilled" in kill_note(None, "OOMKilled")
    assert "SIGKILL" in kill_note(137, "Error")


# --- (b) the S3 server restarted during an upload -----------------------------------------------

PART_MIB = 5  # S3's smallest part: many parts, so the restart lands between two of them
WEIGHTS_MIB = 120


def _artifact(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}\n')
    (folder / "model.safetensors").write_bytes(os.urandom(WEIGHTS_MIB << 20))
    mf.write_manifest(folder, {"revision": "r-fault"})
    return folder


def _upload(server: S3Server, folder: Path, uri: str, **env: str) -> subprocess.Popen:
    """The quantize Job's upload step as its own process, one part in flight at a time."""
    env = {
        **os.environ,
        **server.env(),
        "QMODEL_STORAGE_PART_MIB": str(PART_MIB),
        "QMODEL_STORAGE_THREADS": "1",
        **env,
    }
    argv = [sys.executable, "-m", "qmodel_runtime.storage", "-q", "upload", str(folder), uri]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _parts_arrived(server: S3Server, bucket: str, mark: int, parts: int) -> bool:
    return len(server.requests("UploadPart", bucket, since=mark)) >= parts


@pytest.mark.slow
def test_s3_restart_mid_upload_never_shows_a_partial_revision(
    s3_server: S3Server,  # noqa: F811
    s3_bucket: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    folder = _artifact(tmp_path / "artifact")
    uri, model = f"s3://{s3_bucket}/qmodel/m/r-fault/", f"s3://{s3_bucket}/qmodel/m/"
    settings = StorageSettings.from_env(s3_server.env())

    # The Job's first try gets no retries: the server dies under it, the process exits with a reason.
    mark = len(s3_server.log_lines())
    first = _upload(s3_server, folder, uri, QMODEL_STORAGE_RETRIES="1")
    wait_for(lambda: _parts_arrived(s3_server, s3_bucket, mark, 2) or first.poll() is not None, "parts")
    s3_server.stop()
    _, err = first.communicate(timeout=60)
    assert first.returncode == 2 and err.strip().splitlines()[-1].startswith(f"error: {uri}"), err
    s3_server.start()
    assert revisions(model, settings) == []
    with pytest.raises(NotFoundError, match=r"has no qmodel-manifest\.json"):
        download(uri, tmp_path / "early", settings)

    # The Job's retry, with the default retries: the server restarts in the middle of it too.
    mark = len(s3_server.log_lines())
    second = _upload(s3_server, folder, uri)
    wait_for(lambda: _parts_arrived(s3_server, s3_bucket, mark, 3), "parts of the second upload")
    s3_server.stop()
    assert second.poll() is None, "the upload finished before the restart: make the file larger"
    s3_server.start()
    seen = []
    while second.poll() is None:  # until the manifest lands, readers see no revision
        seen.append(revisions(model, settings))
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    assert seen and all(r == [] for r in seen[:-1])
    result = json.loads(out)
    assert result["manifestDigest"] == mf.digest((folder / mf.MANIFEST_NAME).read_bytes())
    assert [r.name for r in revisions(model, settings)] == ["r-fault"]
    got = download(uri, tmp_path / "cache", settings)
    assert sorted(got.fetched) == sorted(mf.load_manifest((folder / mf.MANIFEST_NAME).read_bytes())["files"])


# --- (d) a GPU node removed while serving -------------------------------------------------------


def _server_pods(models: Models, name: str) -> list:
    return models.pods(f"qmodel.dev/model={name},app.kubernetes.io/component=server")


def _ready_on(models: Models, name: str, node: str) -> bool:
    for pod in _server_pods(models, name):
        ready = any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or ())
        if pod.spec.node_name == node and ready and not pod.metadata.deletion_timestamp:
            return True
    return False


@pytest.mark.k8s
@pytest.mark.slow
def test_gpu_node_removed_while_serving_is_reported_and_the_pod_moves(bed: Bed) -> None:
    core = client.CoreV1Api(bed.api)
    spare = "gpud-1"
    core.patch_node(spare, {"spec": {"unschedulable": True}})  # the only other D node: cordoned
    models = bed.models(bed.namespace("fault-node"))
    serving = spec_body(serving={"gpu": {"products": [D_PRODUCT]}})
    spec = with_result(serving, "served", gpu={"products": [A100_80GB.gpu_product]})
    models.create("served", spec)
    wait_for(lambda: _ready_on(models, "served", "gpud-0"), "a ready server pod on gpud-0", 60, bed.operator)
    wait_for(models.phase_is("served", "Ready"), "phase Ready", 60, bed.operator)

    core.delete_node("gpud-0")
    t0 = time.monotonic()
    serving = wait_for(
        lambda: (c := models.condition("served", "Serving")).get("reason") == "NoGPUNodes" and c,
        "Serving=False NoGPUNodes",
        30,
        bed.operator,
    )
    assert serving["status"] == "False" and D_PRODUCT in serving["message"]
    assert models.status("served")["phase"] == "Deploying"
    assert models.condition("served", "Ready")["status"] == "False"
    assert len(models.deployments()) == 1  # held, not torn down: the class may come back

    core.patch_node(spare, {"spec": {"unschedulable": False}})
    # The pod on the vanished node goes when the pod garbage collector gives up on the node (40 s
    # quarantine, checked every 20 s); the ReplicaSet's new pod then lands on the spare.
    wait_for(lambda: _ready_on(models, "served", spare), f"a ready pod on {spare}", 150, bed.operator)
    wait_for(models.phase_is("served", "Ready"), "phase Ready again", 60, bed.operator)
    moved = time.monotonic() - t0
    status = models.status("served")
    assert status["serving"]["readyReplicas"] == 1
    assert models.condition("served", "Serving")["reason"] == "Serving"
    reasons = [e.reason for e in sorted(models.events("served"), key=lambda e: e.metadata.creation_timestamp)]
    assert "NoGPUNodes" in reasons and "Serving" in reasons[reasons.index("NoGPUNodes") :], reasons
    print(f"\nnode removed -> serving again on {spare}: {moved:.1f} s")
