"""Compact, frozen summaries of the children the operator watches (pure).

The kopf indexes store these instead of whole objects, so memory stays small at scale and
the decision never sees raw API bodies.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from qmodel_operator import podspec as ps
from qmodel_operator.gpu import GpuNode
from qmodel_operator.spec import QuantizedModelSpec, QuantizedModelStatus


@dataclass(frozen=True)
class JobState:
    name: str
    owner_uid: str | None  # the controlling QuantizedModel (None for the unowned clean-up Job)
    component: str
    revision: str | None
    created: str
    active: int
    ready: int
    succeeded: int
    failed: int
    complete: bool
    failed_final: bool
    failure: str | None  # the Failed condition's "reason: message"
    start_time: str | None
    completion_time: str | None

    @property
    def finished(self) -> bool:
        return self.complete or self.failed_final


@dataclass(frozen=True)
class DeploymentState:
    name: str
    owner_uid: str | None
    revision: str | None
    spec_hash: str | None
    replicas: int
    ready_replicas: int
    updated_replicas: int
    available_replicas: int
    generation: int
    observed_generation: int

    @property
    def rolled_out(self) -> bool:
        """The controller saw the latest template and every replica runs it, ready."""
        return (
            self.observed_generation >= self.generation
            and self.updated_replicas >= self.replicas
            and self.ready_replicas >= self.replicas
            and self.available_replicas >= self.replicas
        )


@dataclass(frozen=True)
class ServiceState:
    name: str
    owner_uid: str | None
    spec_hash: str | None


@dataclass(frozen=True)
class PodOutcome:
    """What a finished Job's pod left: its termination message and exit code (None: no pod)."""

    found: bool
    message: str | None = None
    exit_code: int | None = None
    reason: str | None = None  # the terminated state's reason: Completed, Error, OOMKilled


def _meta(body: Mapping[str, Any]) -> Mapping[str, Any]:
    return body.get("metadata") or {}


def owner_uid(body: Mapping[str, Any]) -> str | None:
    """The uid of the controlling owner: children of a deleted model that shares the name of a
    new one (still being garbage-collected) are not the new model's."""
    for owner in _meta(body).get("ownerReferences") or ():
        if owner.get("controller"):
            return owner.get("uid")
    return None


def _condition(status: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    for cond in status.get("conditions") or ():
        if cond.get("type") == type_ and cond.get("status") == "True":
            return cond
    return None


def _failure(failed: Mapping[str, Any] | None) -> str | None:
    if failed is None:
        return None
    reason, message = failed.get("reason") or "Failed", failed.get("message")
    return f"{reason}: {message}" if message else reason


def job_state(body: Mapping[str, Any]) -> JobState:
    meta, status = _meta(body), body.get("status") or {}
    failed = _condition(status, "Failed")
    labels = meta.get("labels") or {}
    return JobState(
        name=meta.get("name", ""),
        owner_uid=owner_uid(body),
        component=labels.get(ps.LABEL_COMPONENT, ""),
        revision=labels.get(ps.LABEL_REVISION),
        created=meta.get("creationTimestamp", ""),
        active=status.get("active", 0),
        ready=status.get("ready", 0),
        succeeded=status.get("succeeded", 0),
        failed=status.get("failed", 0),
        complete=_condition(status, "Complete") is not None,
        failed_final=failed is not None,
        failure=_failure(failed),
        start_time=status.get("startTime"),
        completion_time=status.get("completionTime"),
    )


def deployment_state(body: Mapping[str, Any]) -> DeploymentState:
    meta, status = _meta(body), body.get("status") or {}
    annotations = meta.get("annotations") or {}
    return DeploymentState(
        name=meta.get("name", ""),
        owner_uid=owner_uid(body),
        revision=annotations.get(ps.ANNOTATION_REVISION),
        spec_hash=annotations.get(ps.ANNOTATION_SPEC_HASH),
        replicas=(body.get("spec") or {}).get("replicas", 1),
        ready_replicas=status.get("readyReplicas", 0),
        updated_replicas=status.get("updatedReplicas", 0),
        available_replicas=status.get("availableReplicas", 0),
        generation=meta.get("generation", 0),
        observed_generation=status.get("observedGeneration", 0),
    )


def service_state(body: Mapping[str, Any]) -> ServiceState:
    meta = _meta(body)
    annotations = meta.get("annotations") or {}
    return ServiceState(meta.get("name", ""), owner_uid(body), annotations.get(ps.ANNOTATION_SPEC_HASH))


def pod_outcome(pods: list[Mapping[str, Any]], container: str, succeeded: bool) -> PodOutcome:
    """The termination message of the Job pod that decided the Job: a Succeeded one for a
    complete Job, else the most recently finished Failed one."""
    phase = "Succeeded" if succeeded else "Failed"
    finished = []
    for pod in pods:
        if (pod.get("status") or {}).get("phase") != phase:
            continue
        for cs in (pod.get("status") or {}).get("containerStatuses") or ():
            term = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")
            if cs.get("name") == container and term:
                finished.append((term.get("finishedAt") or "", term))
    if not finished:
        return PodOutcome(found=False)
    _, term = max(finished, key=lambda item: item[0])
    return PodOutcome(
        found=True, message=term.get("message"), exit_code=term.get("exitCode"), reason=term.get("reason")
    )


@dataclass(frozen=True)
class ObjectRef:
    api_version: str
    kind: str
    name: str


@dataclass(frozen=True)
class Observed:
    """Everything the decision needs, read before it runs."""

    ref: ps.ModelRef
    generation: int
    deleting: bool
    finalizers: tuple[str, ...]
    spec: QuantizedModelSpec
    status: QuantizedModelStatus
    now: str  # RFC 3339, UTC
    jobs: tuple[JobState, ...] = ()  # quantize Jobs of every revision
    cleanup_job: JobState | None = None
    deployments: tuple[DeploymentState, ...] = ()
    service: ServiceState | None = None
    gpu_nodes: tuple[GpuNode, ...] = ()
    # The pod outcome of the Job named by ``outcome_needed()``, when there is one.
    pod: PodOutcome | None = None
    # Read only while our finalizer holds a deleting model: no clean-up Job can start there.
    namespace_terminating: bool = False
    # Read only while a serving Deployment is short of ready pods: why (podhealth.pods_problem).
    server_problem: str | None = None
