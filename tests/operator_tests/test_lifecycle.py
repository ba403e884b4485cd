"""The lifecycle decision, walked through the stories the operator must tell (no cluster).

Each test feeds ``decide`` an observed world, checks the plan, and where the story goes on,
feeds the plan's status back in as the next world's status, as the reconciler would.
"""

from __future__ import annotations

from dataclasses import replace

from operator_tests.support import (
    L4,
    LLAMA_70B,
    NOW,
    REF,
    deployment,
    job,
    make_spec,
    observed,
    result_message,
    settings,
)

from qmodel_operator import lifecycle
from qmodel_operator.jobs import cleanup_job_name, quantize_job_name
from qmodel_operator.observed import PodOutcome, ServiceState
from qmodel_operator.podspec import ANNOTATION_SPEC_HASH
from qmodel_operator.revision import revision

LATER = "2026-11-23T18:05:00Z"


def decide(obs):
    return lifecycle.decide(obs, settings())


def cond(plan, type_):
    return plan.status.condition(type_)


def hashes(plan, kind: str) -> dict[str, str]:
    return {
        m["metadata"]["name"]: m["metadata"]["annotations"][ANNOTATION_SPEC_HASH]
        for m in plan.apply
        if m["kind"] == kind
    }


def passed_world(spec=None, quantized=14.30):
    """A model whose Job for the current revision has just finished, with its pod's result."""
    spec = spec or make_spec()
    rev = revision(spec)
    first = decide(observed(spec))
    done = job(quantize_job_name(REF.name, rev), rev, state="complete")
    pod = PodOutcome(found=True, message=result_message(spec, quantized=quantized), exit_code=0)
    return observed(spec, first.status, jobs=(done,), pod=pod, now=LATER)


def ready_world(spec=None):
    """The model served and Ready: returns (observed, plan)."""
    world = passed_world(spec)
    plan = decide(world)
    deps = tuple(
        deployment(name, world.status.revision or "", spec_hash)
        for name, spec_hash in hashes(plan, "Deployment").items()
    )
    service = ServiceState(REF.name, REF.uid, hashes(plan, "Service")[REF.name])
    steady = replace(world, status=plan.status, deployments=deps, service=service, pod=None)
    return steady, decide(steady)


# --- from apply to Ready -----------------------------------------------------------------------


def test_new_model_creates_exactly_one_job_for_its_revision():
    spec = make_spec()
    plan = decide(observed(spec))
    (created,) = plan.create
    assert created["kind"] == "Job" and created["metadata"]["name"] == quantize_job_name(
        "smollm2", revision(spec)
    )
    assert plan.status.phase == "Pending"
    assert plan.status.revision == revision(spec)
    assert cond(plan, "Quantized").status == "False" and cond(plan, "Quantized").reason == "JobPending"
    assert cond(plan, "Validated").status == "Unknown"
    assert cond(plan, "Ready").status == "False"
    assert [c.type for c in plan.status.conditions] == [
        "Quantized",
        "Validated",
        "Published",
        "Serving",
        "Ready",
    ]
    assert all(c.last_transition_time == NOW and c.observed_generation == 1 for c in plan.status.conditions)
    assert not plan.apply and not plan.add_finalizer
    assert [e.reason for e in plan.events] == ["JobPending"]  # no Events for "not yet"
    # The Job appearing (still pending) changes nothing: no status write, no Event.
    pending = job(created["metadata"]["name"], revision(spec), state="pending")
    again = decide(observed(spec, plan.status, jobs=(pending,), now=LATER))
    assert again.status == plan.status and not again.events and not again.create


def test_replaying_a_world_is_a_no_op():
    """Restarts: the same world, decided again with the status already written, changes nothing."""
    spec = make_spec()
    rev = revision(spec)
    first = decide(observed(spec))
    running = job(quantize_job_name(REF.name, rev), rev, state="running")
    second = decide(observed(spec, first.status, jobs=(running,), now=LATER))
    assert not second.create  # the Job exists: never a second one
    assert second.status.phase == "Quantizing"
    assert [e.reason for e in second.events] == ["JobRunning"]
    # Quantized stayed False: its transition time is the first one.
    assert cond(second, "Quantized").last_transition_time == NOW
    third = decide(observed(spec, second.status, jobs=(running,), now="2026-11-23T19:00:00Z"))
    assert third.status == second.status and not third.events and not third.create


def test_job_waiting_for_a_gpu_is_pending():
    spec = make_spec()
    rev = revision(spec)
    pending = job(quantize_job_name(REF.name, rev), rev, state="pending")
    plan = decide(observed(spec, jobs=(pending,)))
    assert plan.status.phase == "Pending" and cond(plan, "Quantized").reason == "JobPending"


def test_passing_result_records_numbers_and_rolls_out():
    world = passed_world()
    plan = decide(world)
    rev = revision(world.spec)
    status = plan.status
    assert status.phase == "Deploying"
    assert status.validation.baseline_perplexity == 14.09 and status.validation.quantized_perplexity == 14.30
    assert status.validation.increase_percent == 1.4904 and status.validation.passed is True
    assert status.artifact.uri == f"s3://artifacts/qmodel/smollm2/{rev}/"
    assert status.quantization.seconds == 153.0 and status.quantization.finished_at == "2026-11-23T18:03:00Z"
    assert status.model.layers == 30 and status.model.source_uri == world.spec.source.uri
    assert status.serving.revision == rev and status.serving.endpoint == "http://smollm2.ml.svc:8000/v1"
    assert cond(plan, "Validated").status == "True" and "+1.49%" in cond(plan, "Validated").message
    assert cond(plan, "Published").status == "True" and "sha256:" in cond(plan, "Published").message
    assert sorted(m["kind"] for m in plan.apply) == ["Deployment", "Service"]
    assert {e.reason for e in plan.events} >= {"JobSucceeded", "GatePassed", "ArtifactStored"}
    assert not plan.create


def test_ready_once_the_pods_are_ready_and_then_quiet():
    steady, plan = ready_world()
    assert plan.status.phase == "Ready"
    ready = cond(plan, "Ready")
    assert ready.status == "True" and "1/1 pods ready" in ready.message
    assert not plan.apply and not plan.create and not plan.delete
    assert [e.reason for e in plan.events] == ["Serving", "Ready"]
    again = decide(replace(steady, status=plan.status))
    assert again.status == plan.status and not again.events and not again.apply


def test_pods_not_ready_keep_it_deploying():
    steady, _ = ready_world()
    unready = tuple(replace(d, ready_replicas=0, available_replicas=0) for d in steady.deployments)
    plan = decide(replace(steady, deployments=unready))
    assert plan.status.phase == "Deploying"
    assert cond(plan, "Serving").reason == "PodsNotReady"


# --- the gate ----------------------------------------------------------------------------------


def _rejected_world():
    """Revision A serves; the spec moves to 3 bits (revision B) whose result fails the gate."""
    steady, ready = ready_world()
    spec_b = make_spec(quantization={"bits": 3})
    rev_b = revision(spec_b)
    done = job(quantize_job_name(REF.name, rev_b), rev_b, state="complete", created=LATER)
    pod = PodOutcome(found=True, message=result_message(spec_b, quantized=16.70), exit_code=0)
    world = replace(
        steady, spec=spec_b, status=ready.status, jobs=(*steady.jobs, done), pod=pod, generation=2
    )
    return steady, ready, world


def test_failing_result_is_rejected_and_the_last_good_revision_keeps_serving():
    _, ready, world = _rejected_world()
    rev_a = ready.status.serving.revision
    plan = decide(world)
    assert plan.status.phase == "Rejected"
    validated = cond(plan, "Validated")
    assert validated.status == "False" and validated.reason == "GateFailed"
    assert "14.09" in validated.message and "16.7" in validated.message
    assert plan.status.serving.revision == rev_a  # still serving A
    assert not plan.apply and not plan.delete  # A's Deployment is untouched, no new one
    assert f"revision {rev_a} keeps serving" in cond(plan, "Ready").message
    warning = next(e for e in plan.events if e.reason == "GateFailed")
    assert warning.type == "Warning"


def test_raising_the_threshold_regates_without_quantizing_again():
    _, _, world = _rejected_world()
    rejected = decide(world)
    spec = make_spec(quantization={"bits": 3}, validation={"maxPerplexityIncreasePercent": 25.0})
    plan = decide(replace(world, spec=spec, status=rejected.status, pod=None, generation=3))
    assert not plan.create  # the stored numbers are re-gated
    assert cond(plan, "Validated").status == "True"
    assert plan.status.serving.revision == revision(spec)  # B is promoted and rolled out
    assert plan.status.phase == "Deploying" and any(m["kind"] == "Deployment" for m in plan.apply)


def test_serving_only_change_rolls_the_deployment_without_a_job():
    steady, ready = ready_world()
    spec = make_spec(serving={"replicas": 3, "maxModelLen": 2048})
    assert revision(spec) == ready.status.revision
    plan = decide(replace(steady, spec=spec, status=ready.status, generation=2))
    assert not plan.create
    (changed,) = [m for m in plan.apply if m["kind"] == "Deployment"]
    assert changed["spec"]["replicas"] == 3
    assert "2048" in changed["spec"]["template"]["spec"]["containers"][0]["args"]
    assert plan.status.phase == "Deploying"


# --- failures ----------------------------------------------------------------------------------


def test_failed_job_fails_the_revision_with_the_pods_reason():
    spec = make_spec()
    rev = revision(spec)
    failed = job(quantize_job_name(REF.name, rev), rev, state="failed")
    pod = PodOutcome(found=True, message="source s3://models/smollm2-135m/ has no config.json", exit_code=1)
    plan = decide(observed(spec, jobs=(failed,), pod=pod))
    assert plan.status.phase == "Failed"
    quantized = cond(plan, "Quantized")
    assert quantized.reason == "JobFailed" and "has no config.json" in quantized.message
    assert "delete the Job to retry" in quantized.message
    assert [e.type for e in plan.events if e.reason == "JobFailed"] == ["Warning"]
    assert not plan.create


def test_failed_job_without_pod_uses_the_jobs_own_reason():
    spec = make_spec()
    rev = revision(spec)
    failed = job(quantize_job_name(REF.name, rev), rev, state="failed")
    plan = decide(observed(spec, jobs=(failed,), pod=PodOutcome(found=False)))
    assert "BackoffLimitExceeded" in cond(plan, "Quantized").message


def test_result_for_another_revision_is_refused():
    spec = make_spec()
    rev = revision(spec)
    done = job(quantize_job_name(REF.name, rev), rev, state="complete")
    other = result_message(make_spec(quantization={"bits": 8}))
    plan = decide(observed(spec, jobs=(done,), pod=PodOutcome(found=True, message=other, exit_code=0)))
    assert plan.status.phase == "Failed" and cond(plan, "Quantized").reason == "ResultInvalid"
    assert f"expected {rev}" in cond(plan, "Quantized").message


def test_outcome_is_read_once_only_when_needed():
    spec = make_spec()
    rev = revision(spec)
    running = job(quantize_job_name(REF.name, rev), rev, state="running")
    assert lifecycle.outcome_needed(observed(spec, jobs=(running,))) is None
    done = replace(running, active=0, ready=0, succeeded=1, complete=True)
    assert lifecycle.outcome_needed(observed(spec, jobs=(done,))) == done
    recorded = decide(passed_world()).status
    assert lifecycle.outcome_needed(observed(spec, recorded, jobs=(done,))) is None


# --- GPUs ----------------------------------------------------------------------------------------


def test_no_fitting_gpu_is_explained_and_nothing_is_deployed():
    world = passed_world()
    result = result_message(world.spec, model={**LLAMA_70B, "architecture": "LlamaForCausalLM"})
    world = replace(world, pod=PodOutcome(found=True, message=result, exit_code=0), gpu_nodes=(L4,))
    plan = decide(world)
    serving = cond(plan, "Serving")
    assert serving.reason == "NoFittingGPU"
    assert serving.message.startswith(
        "needs 41.4 GiB per GPU for maxModelLen 4096; largest class has 22.5 GiB"
    )
    assert cond(plan, "Ready").message == serving.message
    assert plan.status.phase == "Deploying" and not plan.apply


def test_no_gpu_nodes_at_all():
    world = replace(passed_world(), gpu_nodes=())
    plan = decide(world)
    assert cond(plan, "Serving").reason == "NoGPUNodes"
    first = decide(observed(make_spec(), nodes=()))
    assert "no schedulable node has GPUs" in cond(first, "Quantized").message
    assert first.create  # the Job is still created: a cluster autoscaler reacts to pending pods


def _memory_expression(job_manifest) -> dict:
    affinity = job_manifest["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]
    terms = affinity["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    return terms[0]["matchExpressions"][0]


def test_quantize_job_is_sized_from_a_shape_this_source_reported():
    recorded = decide(passed_world()).status
    (created,) = decide(observed(make_spec(quantization={"bits": 8}), recorded)).create
    expr = _memory_expression(created)
    # SmolLM2: 2.3 GiB by the estimator / 0.9 utilization, far below the 16 GiB default.
    assert expr["operator"] == "Gt" and 2048 < int(expr["values"][0]) < 4096
    # Another source may be another model: back to the operator's default.
    (created,) = decide(observed(make_spec(source={"uri": "s3://models/other/"}), recorded)).create
    assert _memory_expression(created) == {
        "key": "nvidia.com/gpu.memory",
        "operator": "Gt",
        "values": ["16383"],
    }


def test_spread_places_one_deployment_per_fitting_class():
    spec = make_spec(serving={"placement": "spread"})
    plan = decide(passed_world(spec))
    names = sorted(m["metadata"]["name"] for m in plan.apply if m["kind"] == "Deployment")
    assert names == ["smollm2-23034mib", "smollm2-81920mib"]
    assert len(plan.status.serving.deployments) == 2


# --- housekeeping ---------------------------------------------------------------------------------


def test_serving_disabled_removes_deployments_and_service():
    steady, ready = ready_world()
    spec = make_spec(serving={"enabled": False})
    plan = decide(replace(steady, spec=spec, status=ready.status))
    assert {(r.kind, r.name) for r in plan.delete} == {("Deployment", "smollm2"), ("Service", "smollm2")}
    assert plan.status.phase == "Ready" and cond(plan, "Serving").reason == "Disabled"


def test_placement_change_deletes_the_stale_deployment():
    steady, ready = ready_world()
    spec = make_spec(serving={"placement": "spread"})
    plan = decide(replace(steady, spec=spec, status=ready.status))
    assert [(r.kind, r.name) for r in plan.delete] == [("Deployment", "smollm2")]


def test_old_jobs_are_pruned_but_current_and_serving_stay():
    _, ready, world = _rejected_world()  # serving A (an old Job), current B
    serving_job = quantize_job_name(REF.name, ready.status.serving.revision)
    newer = [
        job(f"smollm2-q-new{i}", f"r-new{i}", state="complete", created=f"2026-11-2{5 + i}T00:00:00Z")
        for i in range(4)
    ]
    abandoned = job("smollm2-q-busy", "r-busy", state="running")
    plan = decide(replace(world, jobs=(*world.jobs, *newer, abandoned)))
    deleted = {r.name for r in plan.delete}
    # Still running for a revision nobody wants: deleted. Finished: the 3 newest kept, plus
    # the serving revision's (its result backs what serves) and the current one's.
    assert deleted == {"smollm2-q-busy", "smollm2-q-new0"}
    assert serving_job not in deleted and quantize_job_name(REF.name, revision(world.spec)) not in deleted


def test_finalizer_only_with_delete_policy():
    spec = make_spec(artifacts={"deletePolicy": "Delete"})
    assert decide(observed(spec)).add_finalizer
    plan = decide(observed(make_spec(), finalizers=(lifecycle.FINALIZER,)))
    assert plan.remove_finalizer and not plan.add_finalizer


def test_deletion_runs_the_cleanup_job_then_lets_go():
    spec = make_spec(artifacts={"deletePolicy": "Delete"})
    deleting = observed(spec, deleting=True, finalizers=(lifecycle.FINALIZER,))
    start = decide(deleting)
    (created,) = start.create
    assert created["metadata"]["name"] == cleanup_job_name(REF) and not start.remove_finalizer
    assert start.status is None  # the status is left alone while deleting
    running = job(cleanup_job_name(REF), None, state="running", component="cleanup")
    assert decide(replace(deleting, cleanup_job=running)) == lifecycle.Plan()
    done = job(cleanup_job_name(REF), None, state="complete", component="cleanup")
    finish = decide(replace(deleting, cleanup_job=done))
    assert finish.remove_finalizer and [r.name for r in finish.delete] == [cleanup_job_name(REF)]
    assert [e.reason for e in finish.events] == ["CleanupSucceeded"]


def test_failed_cleanup_warns_and_never_blocks_forever():
    spec = make_spec(artifacts={"deletePolicy": "Delete"})
    failed = job(cleanup_job_name(REF), None, state="failed", component="cleanup", failed=3)
    pod = PodOutcome(found=True, message="AccessDenied: s3://artifacts/qmodel/smollm2/", exit_code=1)
    world = observed(spec, deleting=True, finalizers=(lifecycle.FINALIZER,), cleanup_job=failed, pod=pod)
    assert lifecycle.outcome_needed(world) == failed
    plan = decide(world)
    assert plan.remove_finalizer
    (event,) = plan.events
    assert event.type == "Warning" and event.reason == "CleanupFailed"
    assert "after 3 attempt(s): AccessDenied" in event.message


def test_deleting_without_our_finalizer_does_nothing():
    world = observed(make_spec(), deleting=True)
    assert decide(world) == lifecycle.Plan()


def test_deleting_namespace_releases_the_finalizer_with_a_warning():
    spec = make_spec(artifacts={"deletePolicy": "Delete"})
    world = observed(spec, deleting=True, finalizers=(lifecycle.FINALIZER,), namespace_terminating=True)
    plan = decide(world)
    assert plan.remove_finalizer and not plan.create  # no Job can start in a terminating namespace
    (event,) = plan.events
    assert event.reason == "CleanupSkipped" and "s3://artifacts/qmodel/smollm2/" in event.message
