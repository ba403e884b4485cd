"""Faults: a quantize pod that crashes or is OOM-killed, an S3 server restarted mid-upload, an
artifact corrupted in storage, a GPU node removed while serving.

The Job, artifact and node faults run on a test bed of their own (``bed``: KWOK nodes, plus a
process node for the one runtime pod that really runs) with the real operator process; the S3
fault runs the artifact upload as the quantize Job does, as a process (``python -m
qmodel_runtime.storage upload``), against a real versitygw that is killed and restarted under it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import replace
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
from operator_tests.support import A100, L4, REF, deployment, make_spec, observed, result_message, spec_body
from operator_tests.support import job as job_state
from operator_tests.support import settings as operator_settings
from operator_tests.test_lifecycle import ready_world
from reliability_tests.chaos_support import Bed, converged, running_bed
from runtime_tests.storage.storage_support import flip_byte

from qmodel_operator import lifecycle, podhealth, reconciler
from qmodel_operator.metrics import Metrics
from qmodel_operator.observed import PodOutcome
from qmodel_operator.podspec import LABEL_DEPLOYMENT
from qmodel_operator.results import kill_note
from qmodel_operator.spec import QuantizedModelSpec
from qmodel_runtime import manifest as mf
from qmodel_runtime.storage import (
    NotFoundError,
    StorageSettings,
    download,
    open_store,
    parse_uri,
    revisions,
    upload,
)
from testbed.kwok import EXIT_CODE_ANNOTATION, REASON_ANNOTATION
from testbed.nodes import A100_80GB, NodeSet
from testbed.processnode.config import ProcessNodeConfig
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
    files = mf.load_manifest((folder / mf.MANIFEST_NAME).read_bytes())["files"]
    seen = []
    while second.poll() is None:  # what a reader sees meanwhile: nothing, then the whole revision
        visible = bool(revisions(model, settings))
        seen.append(visible)
        if visible:
            assert _stored_sizes(uri, settings) == {n: e["size"] for n, e in files.items()}
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    assert seen and not seen[0] and seen == sorted(seen), "hidden until complete, then visible"
    result = json.loads(out)
    assert result["manifestDigest"] == mf.digest((folder / mf.MANIFEST_NAME).read_bytes())
    assert [r.name for r in revisions(model, settings)] == ["r-fault"]
    got = download(uri, tmp_path / "cache", settings)
    assert sorted(got.fetched) == sorted(files)


def _stored_sizes(uri: str, settings: StorageSettings) -> dict[str, int]:
    """The objects under a revision, by name (the manifest itself left out)."""
    target = parse_uri(uri, settings.pvc_root)
    infos = open_store(target, settings).list(target.key)
    return {i.key[len(target.key) :]: i.size for i in infos if not i.key.endswith(mf.MANIFEST_NAME)}


# --- (c) an artifact corrupted in storage: refused, pod not Ready, the Serving condition says why --

CPU_GPU = "TESTBED-CPU-AS-GPU"  # a process node: the runtime pod really runs there


@pytest.mark.k8s
@pytest.mark.slow
def test_corrupted_artifact_is_refused_and_serving_says_why(
    bed: Bed,
    s3_server: S3Server,  # noqa: F811
    s3_bucket: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    models = bed.models(bed.namespace("fault-artifact"))
    models.core.create_namespaced_secret(
        models.ns, {"metadata": {"name": "artifacts-s3"}, "stringData": s3_server.env()}
    )
    spec = spec_body(
        artifacts={"uri": f"s3://{s3_bucket}/qmodel/"},
        serving={"gpu": {"products": [CPU_GPU]}, "maxModelLen": 1024, "maxBatchSize": 1},
    )
    rev = lifecycle.revision_of(QuantizedModelSpec.model_validate(spec))
    uri = f"s3://{s3_bucket}/qmodel/rotten/{rev}/"
    folder = tmp_path / "artifact"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}\n')
    (folder / "model.safetensors").write_bytes(os.urandom(1 << 20))
    _, digest = mf.write_manifest(folder, {"revision": rev})
    upload(folder, uri, StorageSettings.from_env(s3_server.env()))
    # Bit rot after publishing: same size, one byte different.
    flip_byte(s3_server.object_path(s3_bucket, f"qmodel/rotten/{rev}/model.safetensors"), 4096)
    artifact = {"uri": uri, "manifestDigest": digest, "sizeBytes": 1 << 20, "compressionRatio": 3.2}
    jobs_gpu = {"products": [A100_80GB.gpu_product]}  # the Job "runs" on KWOK, the server for real
    spec = with_result(spec, "rotten", gpu=jobs_gpu, extra={"artifact": artifact})
    node = ProcessNodeConfig(
        name="gpu-proc", pod_cidr="127.203.0.0/16", taint=False, gpu_taint=True, gpus=1, gpu_product=CPU_GPU
    )
    bed.cluster.start_process_node(node)
    t0 = time.monotonic()
    try:
        models.create("rotten", spec)
        # The runtime starts (imports torch), fetches, finds the object corrupt, exits with the reason;
        # the operator reads it from the restarting pod's last state.
        serving = wait_for(
            lambda: (
                f"{uri}model.safetensors" in (c := models.condition("rotten", "Serving")).get("message", "")
                and c
            ),
            "the Serving condition to give the runtime's reason",
            180,
            bed.operator,
        )
        print(f"\napply -> the reason in Serving: {time.monotonic() - t0:.1f} s: {serving['message']}")
        (pod,) = _server_pods(models, "rotten")
        assert not any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or ())
        assert models.status("rotten")["phase"] == "Deploying"
        assert models.condition("rotten", "Ready")["status"] == "False"
    finally:
        bed.cluster.stop_process_node(node.name)
    assert serving["status"] == "False" and serving["reason"] == "PodsNotReady"
    # Which check catches it depends on the store: the S3 response checksum (versitygw keeps one
    # per object) before the manifest's sha256 does; either way the runtime names the object.
    refused = rf"pod {pod.metadata.name} (restarted \d+ times?, )?exited with code 1: {re.escape(uri)}model"
    assert re.search(refused + r"\.safetensors: .*(did not match|the manifest says)", serving["message"])


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
    # The pod left on gpud-0 is still Ready in the API server (its Deployment says 1/1), but the
    # operator does not count it: nothing serves.
    assert models.status("served")["serving"]["readyReplicas"] == 0

    core.patch_node(spare, {"spec": {"unschedulable": False}})
    # The pod on the vanished node goes when the pod garbage collector gives up on the node (40 s
    # quarantine, checked every 20 s); the ReplicaSet's new pod then lands on the spare. Until
    # then the D class is back, but the operator says why the model is not Ready again.
    stranded = wait_for(
        lambda: "no longer a GPU node" in (c := models.condition("served", "Serving"))["message"] and c,
        "Serving naming the pod left on gpud-0",
        30,
        bed.operator,
    )
    assert stranded["reason"] == "PodsNotReady" and "on node gpud-0" in stranded["message"], stranded
    assert models.status("served")["phase"] == "Deploying"
    wait_for(lambda: _ready_on(models, "served", spare), f"a ready pod on {spare}", 150, bed.operator)
    wait_for(lambda: converged(models.get("served"), "Ready"), "Ready again, 1/1", 60, bed.operator)
    moved = time.monotonic() - t0
    assert models.condition("served", "Serving")["reason"] == "Serving"
    reasons = [e.reason for e in sorted(models.events("served"), key=lambda e: e.metadata.creation_timestamp)]
    assert "NoGPUNodes" in reasons and "Serving" in reasons[reasons.index("NoGPUNodes") :], reasons
    print(f"\nnode removed -> serving again on {spare}: {moved:.1f} s")


# --- the pure parts: why pods are not ready, and when the reconciler looks ---------------------


def _pod_body(name: str, ready: bool = False, **status: object) -> dict:
    conditions = [{"type": "Ready", "status": "True" if ready else "False"}, *status.pop("conditions", [])]
    return {"metadata": {"name": name}, "status": {"conditions": conditions, **status}}


def _crashed(code: int, message: str | None, reason: str = "Error", restarts: int = 2) -> dict:
    term = {"exitCode": code, "reason": reason, **({"message": message} if message else {})}
    waiting = {"reason": "CrashLoopBackOff", "message": "back-off 20s restarting failed container"}
    return {"restartCount": restarts, "state": {"waiting": waiting}, "lastState": {"terminated": term}}


def test_pod_problems_say_why_a_pod_is_not_ready() -> None:
    refused = (
        "model.safetensors: sha256 of s3://b/m/r/model.safetensors is 0f1e..., the manifest says 9a8b..."
    )
    crashed = _pod_body("m-1", containerStatuses=[_crashed(1, refused)])
    assert podhealth.pod_problem(crashed) == f"pod m-1 restarted 2 times, exited with code 1: {refused}"
    oom = _pod_body("m-1", containerStatuses=[_crashed(137, None, "OOMKilled", restarts=1)])
    assert podhealth.pod_problem(oom).startswith(
        "pod m-1 restarted 1 time, exited with code 137: the container"
    )
    pending = _pod_body(
        "m-2", conditions=[{"type": "PodScheduled", "status": "False", "message": "0/3 nodes are available"}]
    )
    assert podhealth.pod_problem(pending) == "pod m-2 not scheduled: 0/3 nodes are available"
    pull = {"state": {"waiting": {"reason": "ImagePullBackOff", "message": "pull access denied"}}}
    assert podhealth.pod_problem(_pod_body("m-3", containerStatuses=[pull])) == (
        "pod m-3 ImagePullBackOff: pull access denied"
    )
    starting = {"state": {"waiting": {"reason": "ContainerCreating"}}}
    assert podhealth.pod_problem(_pod_body("m-4", containerStatuses=[starting])) is None
    assert podhealth.pod_problem(_pod_body("m-5", ready=True, containerStatuses=[_crashed(1, "x")])) is None
    assert podhealth.pods_problem([pending, crashed, _pod_body("m-6")]) == (
        f"pod m-1 restarted 2 times, exited with code 1: {refused} (and 1 more pods)"
    )
    assert podhealth.pods_problem([]) is None


def test_serving_condition_carries_the_pod_problem_while_pods_are_short() -> None:
    spec = make_spec()
    rev = lifecycle.revision_of(spec)
    done = job_state(f"smollm2-q-{rev[2:]}", rev, state="complete")
    pod = PodOutcome(found=True, message=result_message(spec))
    problem = "pod smollm2-1 restarted 1 time, exited with code 1: sha256 mismatch"
    for ready, expected in ((0, True), (1, False)):
        world = observed(
            spec, jobs=(done,), pod=pod, deployments=(deployment("smollm2", rev, None, ready=ready),)
        )
        assert lifecycle.server_pods_needed(world) is expected
        world = replace(world, server_problem=problem)
        serving = next(c for c in lifecycle.decide(world, operator_settings()).status.conditions
                       if c.type == "Serving")  # fmt: skip
        assert (problem in serving.message) is expected, serving.message
    assert not lifecycle.server_pods_needed(replace(world, deleting=True))


# --- the pure parts and the reconciler: a pod left on a vanished node does not serve ------------


def _server_pod_body(name: str, node: str | None, ready: bool = True, deleting: bool = False) -> dict:
    pod = _pod_body(name, ready)
    pod["metadata"]["labels"] = {LABEL_DEPLOYMENT: "smollm2"}
    if deleting:
        pod["metadata"]["deletionTimestamp"] = "2026-11-23T18:00:00Z"
    pod["spec"] = {"nodeName": node} if node else {}
    return pod


def test_a_ready_pod_whose_node_is_gone_is_stranded() -> None:
    pods = [
        _server_pod_body("m-b", "gone"),
        _server_pod_body("m-a", "gone"),
        _server_pod_body("m-c", L4.name),  # on a GPU node that is still there
        _server_pod_body("m-d", "gone", ready=False),  # not counted ready anyway
        _server_pod_body("m-e", "gone", deleting=True),  # terminating: not counted either
        _server_pod_body("m-f", None, ready=False),  # not scheduled
    ]
    stranded = podhealth.stranded(pods, [A100.name, L4.name])
    assert [p["metadata"]["name"] for p in stranded] == ["m-a", "m-b"]
    assert podhealth.stranded_problem(stranded) == (
        "pod m-a is on node gone, which is no longer a GPU node of the cluster; it is not serving, "
        "and Kubernetes deletes it when its pod garbage collector gives up on the node (and 1 more pods)"
    )
    assert podhealth.stranded(pods, ["gone", L4.name]) == []
    assert podhealth.stranded_problem([]) is None


def test_a_stranded_pod_does_not_count_as_serving() -> None:
    world, plan = ready_world()
    assert plan.status.phase == "Ready"
    (dep,) = world.deployments
    assert lifecycle.server_pods_needed(world, nodes_lost=True)
    assert not lifecycle.server_pods_needed(world)  # all ready, no node lost: no pod read
    here = next(n.name for n in world.gpu_nodes if n.memory_mib == L4.memory_mib)
    kept, stranded = lifecycle.with_server_pods(world, [_server_pod_body(f"{dep.name}-1", here)])
    assert stranded == 0 and kept == world  # on a node that is still there: nothing changes

    # One replica, left on a vanished node: nothing serves. Two, one of them left: rolling out.
    for replicas, reason in ((1, "PodsNotReady"), (2, "RollingOut")):
        world, plan = ready_world(make_spec(serving={"replicas": replicas}))
        (dep,) = world.deployments
        full = {"replicas": replicas, "ready_replicas": replicas, "updated_replicas": replicas}
        world = replace(world, deployments=(replace(dep, available_replicas=replicas, **full),))
        assert lifecycle.decide(world, operator_settings()).status.phase == "Ready"
        pods = [_server_pod_body(f"{dep.name}-1", "gpu-gone-0"), _server_pod_body(f"{dep.name}-2", here)]
        seen, stranded = lifecycle.with_server_pods(world, pods[:replicas])
        assert stranded == 1 and seen.deployments[0].ready_replicas == replicas - 1
        decided = lifecycle.decide(seen, operator_settings()).status
        serving = decided.condition("Serving")
        assert (decided.phase, serving.reason) == ("Deploying", reason), serving.message
        assert f"pod {dep.name}-1 is on node gpu-gone-0, which is no longer a GPU node" in serving.message
        assert f"{replicas - 1}/{replicas} pods ready" in serving.message
        assert decided.serving.ready_replicas == replicas - 1
        assert lifecycle.server_pods_needed(seen)  # short of ready pods: looked at again later


class _ServingApi:
    """A stand-in for KubeApi (the decision is what is under test; the e2e test above runs it on a
    real API server): serves the model's pods and records the pod reads and status writes."""

    def __init__(self, pods: list[dict]) -> None:
        self.pods, self.pod_reads, self.statuses = pods, 0, []

    async def list(self, api_version, kind, namespace, selector):
        assert kind == "Pod" and "app.kubernetes.io/component=server" in selector
        self.pod_reads += 1
        return self.pods

    async def set_status(self, namespace, name, status):
        self.statuses.append(status)
        meta = {"name": name, "namespace": namespace, "uid": REF.uid, "generation": 1}
        return {"metadata": {**meta, "resourceVersion": str(100 + len(self.statuses))}, "status": status}

    async def post_event(self, ref, type_, reason, message, now):
        pass


class _WorldIndexes:
    def __init__(self, world) -> None:
        self.world, self.nodes = world, list(world.gpu_nodes)

    def jobs(self, key):
        return list(self.world.jobs)

    def deployments(self, key):
        return list(self.world.deployments)

    def services(self, key):
        return [self.world.service]

    def gpu_nodes(self):
        return list(self.nodes)


def test_the_reconciler_reads_pods_once_after_a_node_goes_and_stops_counting_those_left_on_it() -> None:
    world, plan = ready_world()
    (dep,) = world.deployments
    extra = replace(L4, name="gpu-l4-1")
    world = replace(world, gpu_nodes=(*world.gpu_nodes, extra))
    api = _ServingApi([_server_pod_body(f"{dep.name}-1", extra.name)])
    indexes = _WorldIndexes(world)
    meta = {"name": REF.name, "namespace": REF.namespace, "uid": REF.uid, "generation": 1}
    body = {
        "metadata": {
            **meta,
            "resourceVersion": "1",
        },
        "spec": world.spec.model_dump(by_alias=True, exclude_none=True),
        "status": plan.status.to_body(),
    }

    async def scenario():
        rec = reconciler.Reconciler(api=api, settings=operator_settings(), indexes=indexes, metrics=Metrics())
        rec.gpu_nodes_changed()
        rec.model_event("ADDED", (REF.namespace, REF.name), body)
        await rec.idle()
        reads = [api.pod_reads]  # a new operator reads a serving model's pods once
        rec.kick((REF.namespace, REF.name))
        await rec.idle()
        reads.append(api.pod_reads)  # and not again while no node goes
        indexes.nodes.remove(extra)
        rec.gpu_nodes_changed()
        await rec.idle()
        reads.append(api.pod_reads)
        await rec.close()
        return reads

    reads = asyncio.run(scenario())
    assert reads == [1, 1, 2]
    serving = next(c for c in api.statuses[-1]["conditions"] if c["type"] == "Serving")
    assert serving["reason"] == "PodsNotReady" and "on node gpu-l4-1" in serving["message"]
    assert api.statuses[-1]["phase"] == "Deploying"
