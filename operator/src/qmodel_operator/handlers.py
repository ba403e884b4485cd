"""Every kopf handler of the operator, each a few lines that delegate.

All are ``async``: kopf runs sync handlers in a thread pool, and these only touch in-memory
state on the event loop (a kick schedules a task there).

The operator is level-triggered: handlers never decide anything, they only *kick* the model
concerned (``Reconciler.kick``), which then reads the whole world and converges it. That is
why there are no on.create/on.update handlers: kopf's own per-object bookkeeping (progress
and last-handled annotations, its finalizer) would cost API writes on every model and block
deletion while the operator is down. The only finalizer is ours, and only for
``artifacts.deletePolicy: Delete``.

Indexes keep compact summaries of the children (see ``observed``); kopf fills them before
any handler runs, so after a restart the first reconcile already sees every existing Job.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

import kopf

from qmodel_operator import podspec as ps
from qmodel_operator.gpu import MEMORY_LABEL, GpuNode, gpu_node
from qmodel_operator.kube import KubeApi
from qmodel_operator.metrics import Metrics
from qmodel_operator.observed import (
    DeploymentState,
    JobState,
    ServiceState,
    deployment_state,
    job_state,
    service_state,
)
from qmodel_operator.reconciler import Key, Reconciler
from qmodel_operator.settings import Settings

log = logging.getLogger(__name__)

MODELS = ("qmodel.dev", "v1alpha1", "quantizedmodels")
JOBS = ("batch", "v1", "jobs")
DEPLOYMENTS = ("apps", "v1", "deployments")
SERVICES = ("", "v1", "services")
NODES = ("", "v1", "nodes")
MANAGED = {ps.LABEL_MANAGED_BY: ps.MANAGED_BY}
GPU_NODES_KEY = "gpu"


class KopfIndexes:
    """The ``Indexes`` protocol over kopf's live index objects."""

    def __init__(
        self, jobs: kopf.Index, deployments: kopf.Index, services: kopf.Index, nodes: kopf.Index
    ) -> None:
        self._jobs, self._deployments, self._services, self._nodes = jobs, deployments, services, nodes

    def jobs(self, key: Key) -> Iterable[JobState]:
        return list(self._jobs.get(key, ()))

    def deployments(self, key: Key) -> Iterable[DeploymentState]:
        return list(self._deployments.get(key, ()))

    def services(self, key: Key) -> Iterable[ServiceState]:
        return list(self._services.get(key, ()))

    def gpu_nodes(self) -> Iterable[GpuNode]:
        return list(self._nodes.get(GPU_NODES_KEY, ()))


class NoEssenceStorage(kopf.AnnotationsDiffBaseStorage):
    """kopf builds every object's "essence" (a deep copy of the body) on every event to diff it
    for on.create/on.update handlers. We have none, and that copy was 60% of the operator's CPU
    in a 100-model burst (22.5 s of 38 s profiled), so it is skipped."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> Any:
        return {}


def _owner_key(namespace: str, labels: kopf.Labels) -> Key | None:
    model = labels.get(ps.LABEL_MODEL)
    return (namespace, model) if model else None


# --- indexes ---------------------------------------------------------------------------------


def _by_owner(namespace: str, labels: kopf.Labels, summary: Any) -> dict[Key, Any]:
    key = _owner_key(namespace, labels)
    return {key: summary} if key else {}


@kopf.index(*JOBS, labels=MANAGED)
async def qmodel_jobs(body: kopf.Body, namespace: str, labels: kopf.Labels, **_: Any) -> dict[Key, JobState]:
    return _by_owner(namespace, labels, job_state(body))


@kopf.index(*DEPLOYMENTS, labels=MANAGED)
async def qmodel_deployments(
    body: kopf.Body, namespace: str, labels: kopf.Labels, **_: Any
) -> dict[Key, DeploymentState]:
    return _by_owner(namespace, labels, deployment_state(body))


@kopf.index(*SERVICES, labels=MANAGED)
async def qmodel_services(
    body: kopf.Body, namespace: str, labels: kopf.Labels, **_: Any
) -> dict[Key, ServiceState]:
    return _by_owner(namespace, labels, service_state(body))


@kopf.index(*NODES)
async def qmodel_gpu_nodes(body: kopf.Body, **_: Any) -> dict[str, GpuNode]:
    node = gpu_node(body)
    return {GPU_NODES_KEY: node} if node is not None else {}


# --- lifecycle of the operator ---------------------------------------------------------------


@kopf.on.startup()
async def startup(
    settings: kopf.OperatorSettings,
    memo: kopf.Memo,
    qmodel_jobs: kopf.Index,
    qmodel_deployments: kopf.Index,
    qmodel_services: kopf.Index,
    qmodel_gpu_nodes: kopf.Index,
    **_: Any,
) -> None:
    config: Settings = memo.config
    # The reconciler posts its own Events (one per condition transition); kopf posts only warnings.
    settings.posting.level = logging.WARNING
    settings.persistence.diffbase_storage = NoEssenceStorage()
    # Server-side filters: without them kopf lists and parses every Job, Deployment, Service and
    # Node of the cluster (a Job watch of 400 foreign Jobs lagged the event loop by 0.3-0.6 s).
    managed = f"{ps.LABEL_MANAGED_BY}={ps.MANAGED_BY}"
    for resource in (JOBS, DEPLOYMENTS, SERVICES):
        settings.watching.label_selectors[resource] = managed
    settings.watching.label_selectors[NODES] = MEMORY_LABEL
    metrics = Metrics()
    if config.metrics_port:
        metrics.serve(config.metrics_port)
    memo.api = KubeApi(lambda: _login(settings), limit=2 * config.workers)
    indexes = KopfIndexes(qmodel_jobs, qmodel_deployments, qmodel_services, qmodel_gpu_nodes)
    memo.reconciler = Reconciler(memo.api, config, indexes, metrics)
    memo.resync = asyncio.get_running_loop().create_task(memo.reconciler.resync_forever())
    log.info(
        "qmodel operator: runtime image %s, namespaces %s, metrics :%s",
        config.runtime_image,
        ",".join(config.namespaces) or "all",
        config.metrics_port or "off",
    )


async def _login(settings: kopf.OperatorSettings) -> kopf.ConnectionInfo:
    """The same credentials kopf uses: kubeconfig or in-cluster service account."""
    info = kopf.login_via_client(logger=log, settings=settings)
    if info is None:
        raise kopf.LoginError("no Kubernetes credentials: set KUBECONFIG or run in a pod")
    return info


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    memo.resync.cancel()
    await memo.reconciler.close()
    await memo.api.close()


# --- triggers --------------------------------------------------------------------------------


@kopf.on.event(*MODELS)
async def model_event(event: kopf.RawEvent, namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    memo.reconciler.model_event(event.get("type"), (namespace, name), event["object"])


@kopf.on.event(*JOBS, labels=MANAGED)
@kopf.on.event(*DEPLOYMENTS, labels=MANAGED)
@kopf.on.event(*SERVICES, labels=MANAGED)
async def child_event(namespace: str, labels: kopf.Labels, memo: kopf.Memo, **_: Any) -> None:
    key = _owner_key(namespace, labels)
    if key is not None:
        memo.reconciler.kick(key)


@kopf.on.event(*NODES)
async def node_event(memo: kopf.Memo, **_: Any) -> None:
    memo.reconciler.gpu_nodes_changed()
