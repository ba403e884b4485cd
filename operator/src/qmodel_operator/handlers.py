"""Every kopf handler of the operator, each a few lines that delegate.

All are ``async``: kopf runs sync handlers in a thread pool, and these only touch in-memory
state on the event loop (a kick schedules a task there).

The operator is level-triggered: handlers never decide anything, they only *kick* the model
concerned (``Reconciler.kick``), which then reads the whole world and converges it. That is
why there are no on.create/on.update handlers: kopf's own per-object bookkeeping (progress
and last-handled annotations, its finalizer) would cost API writes on every model and block
deletion while the operator is down. The only finalizer is ours, and only for
``artifacts.deletePolicy: Delete``.

kopf watches only the QuantizedModels. The children (Jobs, Deployments, Services) and the GPU
nodes come from light list+watches (``watching``) that keep compact summaries (``observed``)
and kick a model only when a summary of its children changed; no reconcile runs before each
kind has been listed once, so after a restart the first reconcile already sees every Job.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any

import kopf

from qmodel_operator import podspec as ps
from qmodel_operator import watching
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
from qmodel_operator.watching import Kind, Store

log = logging.getLogger(__name__)

MODELS = ("qmodel.dev", "v1alpha1", "quantizedmodels")
GPU_NODES_KEY = "gpu"


class StoreIndexes:
    """The ``Indexes`` protocol over the light watches' stores (``watching``)."""

    def __init__(self) -> None:
        self.jobs_store: Store[JobState] = Store()
        self.deployments_store: Store[DeploymentState] = Store()
        self.services_store: Store[ServiceState] = Store()
        self.nodes_store: Store[GpuNode] = Store()

    def jobs(self, key: Key) -> Iterable[JobState]:
        return self.jobs_store.get(key)

    def deployments(self, key: Key) -> Iterable[DeploymentState]:
        return self.deployments_store.get(key)

    def services(self, key: Key) -> Iterable[ServiceState]:
        return self.services_store.get(key)

    def gpu_nodes(self) -> Iterable[GpuNode]:
        return self.nodes_store.get(GPU_NODES_KEY)

    async def synced(self) -> None:
        """Until every kind has been listed once: a restarted operator must see its Jobs first."""
        for store in (self.jobs_store, self.deployments_store, self.services_store, self.nodes_store):
            await store.synced.wait()


class NoEssenceStorage(kopf.AnnotationsDiffBaseStorage):
    """kopf builds every object's "essence" (a deep copy of the body) on every event to diff it
    for on.create/on.update handlers. We have none, and that copy was 60% of the operator's CPU
    in a 100-model burst (22.5 s of 38 s profiled), so it is skipped."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> Any:
        return {}


def _owner_key(namespace: str, labels: kopf.Labels) -> Key | None:
    model = labels.get(ps.LABEL_MODEL)
    return (namespace, model) if model else None


# --- the children's summaries --------------------------------------------------------------


def _by_owner(summary: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any]], tuple[Key, Any] | None]:
    def summarize(body: dict[str, Any]) -> tuple[Key, Any] | None:
        meta = body.get("metadata") or {}
        key = _owner_key(meta.get("namespace", ""), meta.get("labels") or {})
        return (key, summary(body)) if key else None

    return summarize


def _gpu_node(body: dict[str, Any]) -> tuple[str, GpuNode] | None:
    node = gpu_node(body)
    return (GPU_NODES_KEY, node) if node is not None else None


MANAGED_SELECTOR = f"{ps.LABEL_MANAGED_BY}={ps.MANAGED_BY}"
JOB_KIND = Kind("batch/v1", "jobs", MANAGED_SELECTOR, _by_owner(job_state))
DEPLOYMENT_KIND = Kind("apps/v1", "deployments", MANAGED_SELECTOR, _by_owner(deployment_state))
SERVICE_KIND = Kind("v1", "services", MANAGED_SELECTOR, _by_owner(service_state))
# Only labelled nodes are listed (a cluster's CPU nodes never reach the operator).
NODE_KIND = Kind("v1", "nodes", MEMORY_LABEL, _gpu_node, namespaced=False)


def start_watches(
    api: KubeApi, indexes: StoreIndexes, reconciler: Reconciler, namespaces: tuple[str, ...]
) -> list[asyncio.Task[None]]:
    """The light watches of the children and GPU nodes (see ``watching``)."""
    children = reconciler.children_changed
    return watching.start(
        api,
        (
            (JOB_KIND, indexes.jobs_store, children),
            (DEPLOYMENT_KIND, indexes.deployments_store, children),
            (SERVICE_KIND, indexes.services_store, children),
            (NODE_KIND, indexes.nodes_store, lambda _: reconciler.gpu_nodes_changed()),
        ),
        namespaces,
    )


# --- lifecycle of the operator ---------------------------------------------------------------


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    config: Settings = memo.config
    # The reconciler posts its own Events (one per condition transition); kopf posts only warnings.
    settings.posting.level = logging.WARNING
    settings.persistence.diffbase_storage = NoEssenceStorage()
    metrics = Metrics()
    if config.metrics_port:
        metrics.serve(config.metrics_port)
    # Connections: one per reconcile in flight in each pool, plus the long-lived watches.
    watches = 3 * max(1, len(config.namespaces)) + 1
    memo.api = KubeApi(lambda: _login(settings), limit=2 * config.workers + watches, observe=metrics.api_call)
    indexes = StoreIndexes()
    memo.reconciler = Reconciler(memo.api, config, indexes, metrics, synced=indexes.synced)
    loop = asyncio.get_running_loop()
    memo.tasks = [
        *start_watches(memo.api, indexes, memo.reconciler, config.namespaces),
        loop.create_task(memo.reconciler.resync_forever(), name="resync"),
    ]
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
    for task in memo.tasks:
        task.cancel()
    await asyncio.gather(*memo.tasks, return_exceptions=True)
    await memo.reconciler.close()
    await memo.api.close()


# --- triggers --------------------------------------------------------------------------------


@kopf.on.event(*MODELS)
async def model_event(event: kopf.RawEvent, namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    memo.reconciler.model_event(event.get("type"), (namespace, name), event["object"])
