"""The lifecycle decision (pure): what a model's status should say and what to change.

``decide(observed)`` looks at the spec, the previous status and the children the operator
watches, and returns a ``Plan``: the new status, objects to create or apply, objects to
delete, Events, and finalizer changes. It performs no I/O, so every branch is unit-tested
without a cluster, and running it twice on the same world gives the same plan (restarts
are safe: names are deterministic and creation is create-if-absent).

Steps: quantize (one Job per revision) -> gate (stored numbers vs the spec's limits) ->
serve (the last revision that passed) -> phase and Ready.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from qmodel_operator import conditions as cond
from qmodel_operator import estimator as est
from qmodel_operator import gate, jobs, podhealth, results
from qmodel_operator.gpu import gpu_classes
from qmodel_operator.observed import JobState, ObjectRef, Observed
from qmodel_operator.podspec import LABEL_DEPLOYMENT
from qmodel_operator.revision import revision as revision_of
from qmodel_operator.rollout import ServingOutcome, serve
from qmodel_operator.serving import Served, shape_of
from qmodel_operator.settings import Settings
from qmodel_operator.spec import (
    ArtifactStatus,
    ModelFacts,
    QuantizationStatus,
    QuantizedModelSpec,
    QuantizedModelStatus,
    ValidationStatus,
)

FINALIZER = "qmodel.dev/artifact-cleanup"


@dataclass(frozen=True)
class Plan:
    status: QuantizedModelStatus | None = None  # None: leave the status alone
    create: tuple[dict[str, Any], ...] = ()  # create if absent (Jobs: immutable, named per revision)
    apply: tuple[dict[str, Any], ...] = ()  # server-side apply (Deployments, Service)
    delete: tuple[ObjectRef, ...] = ()
    events: tuple[cond.Event, ...] = ()
    add_finalizer: bool = False
    remove_finalizer: bool = False


@dataclass(frozen=True)
class _Quantize:
    """The quantize step's outcome for the current revision."""

    stage: str  # pending | running | reading | done | failed
    verdict: cond.Verdict
    quantization: QuantizationStatus
    validation: ValidationStatus = field(default_factory=ValidationStatus)
    artifact: ArtifactStatus = field(default_factory=ArtifactStatus)
    model: ModelFacts | None = None
    create: tuple[dict[str, Any], ...] = field(default=())


def _job_for(observed: Observed, revision: str) -> JobState | None:
    return next((j for j in observed.jobs if j.revision == revision), None)


def _recorded(status: QuantizedModelStatus, revision: str) -> bool:
    return status.quantization.revision == revision and status.validation.quantized_perplexity is not None


def outcome_needed(observed: Observed) -> JobState | None:
    """The finished Job whose pod the reconciler must read before deciding, if any."""
    if observed.deleting:
        job = observed.cleanup_job
        return job if job is not None and job.failed_final else None
    revision = revision_of(observed.spec)
    job = _job_for(observed, revision)
    if job is None or not job.finished or _recorded(observed.status, revision):
        return None
    return job


def server_pods_needed(observed: Observed, nodes_lost: bool = False) -> bool:
    """Whether a serving Deployment is short of ready pods, so the reconciler must read the pods
    to say why (and look again later: a restarting pod changes no Deployment status); or, when
    a GPU node vanished since this model's pods were last read, has ready pods that may have been
    on it (``podhealth.stranded``)."""
    if observed.deleting or not observed.spec.serving.enabled:
        return False
    if nodes_lost and any(d.ready_replicas > 0 for d in observed.deployments):
        return True
    return any(d.ready_replicas < d.replicas for d in observed.deployments)


def with_server_pods(observed: Observed, pods: list[dict[str, Any]]) -> tuple[Observed, int]:
    """The world once the serving pods are read: stranded pods (on a vanished node) no longer
    count as ready in their Deployment, and the Serving condition's problem says why pods are
    short. Returns it and how many pods are stranded."""
    lost = podhealth.stranded(pods, (n.name for n in observed.gpu_nodes))
    per_deployment = Counter(((p["metadata"].get("labels") or {}).get(LABEL_DEPLOYMENT)) for p in lost)
    deployments = tuple(
        replace(d, ready_replicas=max(0, d.ready_replicas - per_deployment[d.name]))
        for d in observed.deployments
    )
    problems = [p for p in (podhealth.stranded_problem(lost), podhealth.pods_problem(pods)) if p]
    world = replace(observed, deployments=deployments, server_problem="; ".join(problems) or None)
    return world, len(lost)


def job_min_gpu_memory_mib(observed: Observed, settings: Settings, budget: est.Budget) -> int:
    """The spec's minimum, else an estimate from a shape this source has reported, else the default."""
    spec = observed.spec
    if spec.jobs.gpu.min_memory_mib:
        return spec.jobs.gpu.min_memory_mib
    facts = observed.status.model
    if facts is None or facts.source_uri != spec.source.uri:
        return settings.job_min_gpu_memory_mib
    calibration = spec.quantization.calibration
    needed = est.quantize_job_bytes(shape_of(facts), calibration.samples, calibration.sequence_length, budget)
    return math.ceil(needed / budget.utilization / est.MIB)


def _job_fit_note(observed: Observed, min_mib: int) -> str:
    classes = gpu_classes(observed.gpu_nodes, observed.spec.jobs.gpu.products)
    if not classes:
        return "; no schedulable node has GPUs (GPU Feature Discovery labels) yet"
    if classes[-1].memory_mib < min_mib:
        return (
            f"; it needs {est.mib_to_gib(min_mib)} per GPU and the largest class has "
            f"{est.mib_to_gib(classes[-1].memory_mib)} (set spec.jobs.gpu.minMemoryMiB if that suffices)"
        )
    return ""


def _failure(observed: Observed, job: JobState) -> str:
    """Why a Job failed: its pod's termination message, else the Job's own condition."""
    pod = observed.pod
    if pod is not None and pod.found:
        reason = results.failure_reason(pod.message, pod.exit_code)
        note = results.kill_note(pod.exit_code, pod.reason)
        if note is None:
            return reason
        # A killed container's "message" is at best its log's tail: the note says what happened.
        return note if pod.message is None or not pod.message.strip() else f"{note}; last output: {reason}"
    return job.failure or "failed"


def _job_failed_message(observed: Observed, job: JobState) -> str:
    """Why the revision failed, after how many of the attempts spec.jobs.backoffLimit allows."""
    attempts = f"{job.failed} attempt{'s' if job.failed != 1 else ''}"
    limit = observed.spec.jobs.backoff_limit
    return (
        f"Job {job.name} failed after {attempts} (spec.jobs.backoffLimit {limit}): "
        f"{_failure(observed, job)}; fix the cause and delete the Job to retry"
    )


def _record(observed: Observed, revision: str, job: JobState) -> _Quantize:
    """Read the finished Job's result into the status fields (or fail the revision)."""
    base = QuantizationStatus(revision=revision, job=job.name, started_at=job.start_time)
    if observed.pod is None or not observed.pod.found:
        return _Quantize(
            "failed",
            cond.Verdict(cond.QUANTIZED, "False", "ResultInvalid",
                         f"Job {job.name} succeeded but its pod is gone, so its result cannot be read; "
                         f"delete the Job to quantize revision {revision} again"),
            base,
        )  # fmt: skip
    try:
        result = results.parse_result(observed.pod.message)
        if result.revision != revision:
            raise results.ResultError(f"the Job reported revision {result.revision}, expected {revision}")
    except results.ResultError as e:
        return _Quantize("failed", cond.Verdict(cond.QUANTIZED, "False", "ResultInvalid", str(e)), base)
    timings = result.timings
    quantization = base.model_copy(
        update={
            "finished_at": job.completion_time,
            "seconds": timings.total_seconds,
            "quantize_seconds": timings.quantize_seconds,
            "evaluate_seconds": timings.evaluate_seconds,
        }
    )
    artifact = ArtifactStatus(
        uri=result.artifact.uri,
        manifest_digest=result.artifact.manifest_digest,
        size_bytes=result.artifact.size_bytes,
        compression_ratio=result.artifact.compression_ratio,
    )
    seconds = f" in {timings.total_seconds:.0f} s" if timings.total_seconds is not None else ""
    return _Quantize(
        "done",
        cond.Verdict(
            cond.QUANTIZED, "True", "JobSucceeded", f"Job {job.name} quantized revision {revision}{seconds}"
        ),
        quantization,
        ValidationStatus(
            baseline_perplexity=result.baseline_perplexity, quantized_perplexity=result.quantized_perplexity
        ),
        artifact,
        result.model.model_copy(update={"source_uri": observed.spec.source.uri}),
    )


def _stored(observed: Observed, revision: str) -> _Quantize:
    status = observed.status
    return _Quantize(
        "done",
        cond.Verdict(cond.QUANTIZED, "True", "JobSucceeded",
                     f"Job {status.quantization.job} quantized revision {revision}"),
        status.quantization,
        status.validation,
        status.artifact,
        status.model,
    )  # fmt: skip


def _quantize(observed: Observed, revision: str, settings: Settings, budget: est.Budget) -> _Quantize:
    if _recorded(observed.status, revision):
        return _stored(observed, revision)
    job = _job_for(observed, revision)
    name = jobs.quantize_job_name(observed.ref.name, revision)
    model = observed.status.model
    min_mib = job_min_gpu_memory_mib(observed, settings, budget)
    # One message from creation until the pod runs: seeing the Job appear changes nothing
    # worth a status write or an Event.
    pending = cond.Verdict(
        cond.QUANTIZED,
        "False",
        "JobPending",
        f"Job {name} (revision {revision}) is waiting for a GPU node{_job_fit_note(observed, min_mib)}",
    )
    waiting = QuantizationStatus(revision=revision, job=name)
    if job is None:
        manifest = jobs.build_quantize_job(observed.ref, observed.spec, revision, settings, min_mib)
        return _Quantize("pending", pending, waiting, model=model, create=(manifest,))
    started = waiting.model_copy(update={"started_at": job.start_time})
    if job.failed_final:
        verdict = cond.Verdict(cond.QUANTIZED, "False", "JobFailed", _job_failed_message(observed, job))
        return _Quantize("failed", verdict, started, model=model)
    if job.complete:
        return _record(observed, revision, job)
    if job.ready > 0:
        message = f"Job {job.name} is quantizing revision {revision}"
        return _Quantize(
            "running", cond.Verdict(cond.QUANTIZED, "False", "JobRunning", message), started, model=model
        )
    return _Quantize("pending", pending, waiting, model=model)


def _gate(observed: Observed, q: _Quantize) -> tuple[cond.Verdict, ValidationStatus, cond.Verdict]:
    """(Validated, validation status, Published) for the quantize outcome."""
    if q.stage != "done":
        waiting = "waiting for the quantize Job" if q.stage != "failed" else "the quantize Job failed"
        return (
            cond.Verdict(cond.VALIDATED, "Unknown", "Waiting", waiting),
            q.validation,
            cond.Verdict(cond.PUBLISHED, "Unknown", "Waiting", waiting),
        )
    baseline, quantized = q.validation.baseline_perplexity, q.validation.quantized_perplexity
    verdict = gate.decide(baseline, quantized, observed.spec.validation)
    validation = q.validation.model_copy(
        update={
            "increase_percent": round(verdict.increase_percent, 4),
            "max_perplexity_increase_percent": observed.spec.validation.max_perplexity_increase_percent,
            "passed": verdict.passed,
        }
    )
    if verdict.passed:
        validated = cond.Verdict(cond.VALIDATED, "True", "GatePassed", verdict.message)
    else:
        validated = cond.Verdict(cond.VALIDATED, "False", "GateFailed", verdict.message)
    digest = f" ({q.artifact.manifest_digest})" if q.artifact.manifest_digest else ""
    published = cond.Verdict(cond.PUBLISHED, "True", "ArtifactStored", f"{q.artifact.uri}{digest}")
    return validated, validation, published


def _served(observed: Observed, q: _Quantize, revision: str, passed: bool) -> Served | None:
    """The revision to serve: this one when it passed, else the last one that did."""
    if passed and q.artifact.uri and q.model is not None:
        quant = observed.spec.quantization
        return Served(revision, q.artifact.uri, quant.bits, quant.group_size, q.model)
    snap = observed.status.serving
    if snap.revision and snap.artifact_uri and snap.model is not None and snap.bits and snap.group_size:
        return Served(snap.revision, snap.artifact_uri, snap.bits, snap.group_size, snap.model)
    return None


def _phase(
    q: _Quantize, passed: bool, serving: ServingOutcome, spec: QuantizedModelSpec, revision: str
) -> str:
    if q.stage == "failed":
        return "Failed"
    if q.stage in ("pending", "running"):
        return "Pending" if q.stage == "pending" else "Quantizing"
    if not passed:
        return "Rejected"
    if spec.serving.enabled and not serving.rolled_out(revision):
        return "Deploying"
    return "Ready"


def _ready(phase: str, verdicts: dict[str, cond.Verdict], served: Served | None) -> cond.Verdict:
    if phase == "Ready":
        return cond.Verdict(cond.READY, "True", "Ready", verdicts[cond.SERVING].message)
    blocking = {
        "Failed": cond.QUANTIZED,
        "Pending": cond.QUANTIZED,
        "Quantizing": cond.QUANTIZED,
        "Rejected": cond.VALIDATED,
        "Deploying": cond.SERVING,
    }[phase]
    message = verdicts[blocking].message
    if phase in ("Rejected", "Failed") and served is not None:
        message += f"; revision {served.revision} keeps serving"
    return cond.Verdict(cond.READY, "False", phase, message)


def _old_jobs(observed: Observed, revision: str, serving_revision: str | None, keep: int) -> list[ObjectRef]:
    """Abandoned Jobs of other revisions (still running) and finished ones beyond the history."""
    others = [j for j in observed.jobs if j.revision not in (revision, serving_revision)]
    running = [j for j in others if not j.finished]
    finished = sorted((j for j in others if j.finished), key=lambda j: j.created, reverse=True)
    return [ObjectRef("batch/v1", "Job", j.name) for j in running + finished[keep:]]


def decide(observed: Observed, settings: Settings, budget: est.Budget = est.Budget()) -> Plan:
    """The plan for one model: see the module docstring."""
    if observed.deleting:
        return _deletion(observed, settings)
    revision = revision_of(observed.spec)
    q = _quantize(observed, revision, settings, budget)
    validated, validation, published = _gate(observed, q)
    passed = validated.status == "True"
    served = _served(observed, q, revision, passed)
    serving = serve(observed, served, settings, budget)
    phase = _phase(q, passed, serving, observed.spec, revision)
    verdicts = {v.type: v for v in (q.verdict, validated, published, serving.verdict)}
    verdicts[cond.READY] = _ready(phase, verdicts, served)
    conditions = cond.merge(observed.status.conditions, verdicts.values(), observed.generation, observed.now)
    status = QuantizedModelStatus(
        phase=phase,
        observed_generation=observed.generation,
        revision=revision,
        conditions=conditions,
        quantization=q.quantization,
        validation=validation,
        artifact=q.artifact,
        model=q.model,
        serving=serving.status,
    )
    serving_revision = served.revision if served is not None else None
    wants_finalizer = observed.spec.artifacts.delete_policy == "Delete"
    has_finalizer = FINALIZER in observed.finalizers
    return Plan(
        status=status,
        create=q.create,
        apply=serving.apply,
        delete=tuple(_old_jobs(observed, revision, serving_revision, settings.job_history)) + serving.delete,
        events=tuple(cond.transitions(observed.status.conditions, conditions)),
        add_finalizer=wants_finalizer and not has_finalizer,
        remove_finalizer=has_finalizer and not wants_finalizer,
    )


def _deletion(observed: Observed, settings: Settings) -> Plan:
    """Deleting: with deletePolicy Delete, run the clean-up Job, then let the model go."""
    if FINALIZER not in observed.finalizers:
        return Plan()
    if observed.spec.artifacts.delete_policy != "Delete":
        return Plan(remove_finalizer=True)
    prefix = jobs.model_prefix(observed.spec, observed.ref.name)
    job = observed.cleanup_job
    if observed.namespace_terminating and not (job is not None and job.complete):
        event = cond.Event(
            "Warning",
            "CleanupSkipped",
            f"namespace {observed.ref.namespace} is being deleted, so no clean-up Job can run; "
            f"the artifacts under {prefix} are left behind: remove them by hand",
        )
        return Plan(events=(event,), remove_finalizer=True)
    if job is None:
        manifest = jobs.build_cleanup_job(observed.ref, observed.spec, settings)
        event = cond.Event("Normal", "CleanupStarted", f"removing the artifacts under {prefix}")
        return Plan(create=(manifest,), events=(event,))
    done = ObjectRef("batch/v1", "Job", job.name)
    if job.complete:
        event = cond.Event("Normal", "CleanupSucceeded", f"removed the artifacts under {prefix}")
        return Plan(delete=(done,), events=(event,), remove_finalizer=True)
    if job.failed_final:
        reason = _failure(observed, job)
        event = cond.Event(
            "Warning",
            "CleanupFailed",
            f"could not remove the artifacts under {prefix} after {job.failed} attempt(s): {reason}; "
            f"Job {job.name} is kept for an hour for its logs; remove the artifacts by hand",
        )
        return Plan(events=(event,), remove_finalizer=True)
    return Plan()
