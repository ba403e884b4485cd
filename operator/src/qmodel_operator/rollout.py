"""The serving step of the lifecycle decision (pure): desired Deployments and Service for the
served revision, what to apply or delete, and the Serving condition.

Only manifests whose spec hash differs from what is running are re-applied, so a steady
model costs no API writes. When no GPU class fits, running Deployments are left alone (a
node pool scaled to zero must not tear down a model that will fit again).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qmodel_operator import conditions as cond
from qmodel_operator import estimator as est
from qmodel_operator import podspec as ps
from qmodel_operator import serving as sv
from qmodel_operator.gpu import gpu_classes
from qmodel_operator.observed import DeploymentState, ObjectRef, Observed
from qmodel_operator.settings import Settings
from qmodel_operator.spec import DeploymentStatus, ServingStatus


@dataclass(frozen=True)
class ServingOutcome:
    verdict: cond.Verdict
    status: ServingStatus
    apply: tuple[dict[str, Any], ...] = ()
    delete: tuple[ObjectRef, ...] = ()
    # Names of the desired Deployments that run the served revision, all replicas ready.
    rolled_out_revision: str | None = None

    def rolled_out(self, revision: str) -> bool:
        return self.rolled_out_revision == revision


def _ref(kind: str, name: str) -> ObjectRef:
    return ObjectRef("v1" if kind == "Service" else "apps/v1", kind, name)


def _teardown(observed: Observed, verdict: cond.Verdict, keep: ServingStatus) -> ServingOutcome:
    deletes = [_ref("Deployment", d.name) for d in observed.deployments]
    if observed.service is not None:
        deletes.append(_ref("Service", observed.service.name))
    return ServingOutcome(verdict, keep, delete=tuple(deletes))


def _snapshot(served: sv.Served) -> ServingStatus:
    """The served revision, remembered so a later rejected revision cannot displace it."""
    return ServingStatus(
        revision=served.revision,
        artifact_uri=served.artifact_uri,
        bits=served.bits,
        group_size=served.group_size,
        model=served.model,
    )


def _unchanged(observed: Observed, name: str) -> DeploymentState | None:
    return next((d for d in observed.deployments if d.name == name), None)


def _held(observed: Observed, served: sv.Served, no_fit: sv.NoFit) -> ServingOutcome:
    """No class fits now: keep what runs, report it, explain why nothing new can start."""
    previous = {d.name: d for d in observed.status.serving.deployments}
    rows = [
        (previous.get(d.name) or DeploymentStatus(name=d.name)).model_copy(
            update={"replicas": d.replicas, "ready_replicas": d.ready_replicas}
        )
        for d in observed.deployments
    ]
    ready = sum(d.ready_replicas for d in observed.deployments)
    status = _snapshot(served).model_copy(
        update={
            "deployments": rows,
            "service": observed.service.name if observed.service else None,
            "replicas": sum(d.replicas for d in observed.deployments),
            "ready_replicas": ready,
            "endpoint": sv.endpoint(observed.ref) if observed.service else None,
        }
    )
    return ServingOutcome(cond.Verdict(cond.SERVING, "False", no_fit.reason, no_fit.message), status)


def _verdict(
    served: sv.Served, rows: list[DeploymentStatus], rolled_out: bool, problem: str | None = None
) -> cond.Verdict:
    ready = sum(r.ready_replicas or 0 for r in rows)
    wanted = sum(r.replicas or 0 for r in rows)
    where = ", ".join(
        f"{r.name} on {r.gpu_class} ({r.ready_replicas or 0}/{r.replicas}, batch {r.max_batch_size}, "
        f"{r.kv_cache_tokens} KV tokens)"
        for r in rows
    )
    text = f"revision {served.revision}: {ready}/{wanted} pods ready; {where}"
    if problem and ready < wanted:
        text += f"; {problem}"
    if ready > 0:
        return cond.Verdict(cond.SERVING, "True", "Serving" if rolled_out else "RollingOut", text)
    if wanted == 0:
        return cond.Verdict(cond.SERVING, "False", "ScaledToZero", text)
    return cond.Verdict(cond.SERVING, "False", "PodsNotReady", text)


def _hash(manifest: dict[str, Any]) -> str:
    return manifest["metadata"]["annotations"][ps.ANNOTATION_SPEC_HASH]


def serve(
    observed: Observed, served: sv.Served | None, settings: Settings, budget: est.Budget
) -> ServingOutcome:
    """The serving step: see the module docstring."""
    spec = observed.spec
    if not spec.serving.enabled:
        keep = _snapshot(served) if served else ServingStatus()
        disabled = cond.Verdict(cond.SERVING, "False", "Disabled", "spec.serving.enabled is false")
        return _teardown(observed, disabled, keep)
    if served is None:
        waiting = cond.Verdict(cond.SERVING, "False", "NothingPassed", "no revision has passed the gate yet")
        return ServingOutcome(waiting, ServingStatus())
    classes = gpu_classes(observed.gpu_nodes, spec.serving.gpu.products, spec.serving.gpu.count)
    placements = sv.place(observed.ref.name, spec.serving, served, classes, budget)
    if isinstance(placements, sv.NoFit):
        return _held(observed, served, placements)
    applies: list[dict[str, Any]] = []
    rows: list[DeploymentStatus] = []
    rolled_out = True
    for placement in placements:
        manifest = sv.build_deployment(observed.ref, spec, served, placement, settings)
        running = _unchanged(observed, placement.deployment)
        current = running is not None and running.spec_hash == _hash(manifest)
        if not current:
            applies.append(manifest)
        rolled_out = rolled_out and current and running.rolled_out
        sizing = placement.sizing
        rows.append(
            DeploymentStatus(
                name=placement.deployment,
                gpu_class=placement.gpu_class.name,
                gpu_memory_mib=placement.gpu_class.memory_mib,
                replicas=spec.serving.replicas,
                ready_replicas=running.ready_replicas if running else 0,
                max_model_len=sizing.max_model_len,
                max_batch_size=sizing.max_batch_size,
                kv_cache_tokens=sizing.kv_cache_tokens,
            )
        )
    service = sv.build_service(observed.ref)
    if observed.service is None or observed.service.spec_hash != _hash(service):
        applies.append(service)
    wanted = {p.deployment for p in placements}
    stale = tuple(_ref("Deployment", d.name) for d in observed.deployments if d.name not in wanted)
    status = _snapshot(served).model_copy(
        update={
            "deployments": rows,
            "service": observed.ref.name,
            "replicas": sum(r.replicas or 0 for r in rows),
            "ready_replicas": sum(r.ready_replicas or 0 for r in rows),
            "endpoint": sv.endpoint(observed.ref),
        }
    )
    return ServingOutcome(
        _verdict(served, rows, rolled_out and not stale, observed.server_problem),
        status,
        apply=tuple(applies),
        delete=stale,
        rolled_out_revision=served.revision if rolled_out and not stale else None,
    )
