"""Observe -> decide -> act, one model at a time.

Every trigger (the model changed, one of its Jobs, Deployments or its Service changed, the
GPU classes changed, a periodic resync) only *kicks* the model: at most one reconcile of a
model runs at a time, and kicks that arrive meanwhile fold into one more run afterwards. A
reconcile reads the model fresh from the API server and its children from kopf's indexes
(filled before any handler runs, so a restarted operator sees every existing Job), asks the
pure ``lifecycle.decide`` for a plan, and carries it out through ``kube.KubeApi``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any, Protocol

import aiohttp
from pydantic import ValidationError

from qmodel_operator import conditions as cond
from qmodel_operator import jobs, lifecycle
from qmodel_operator import podspec as ps
from qmodel_operator.gpu import GpuNode, gpu_classes
from qmodel_operator.kube import ApiError, KubeApi
from qmodel_operator.metrics import Metrics
from qmodel_operator.observed import (
    DeploymentState,
    JobState,
    Observed,
    ServiceState,
    pod_outcome,
)
from qmodel_operator.settings import Settings
from qmodel_operator.spec import QuantizedModelSpec, QuantizedModelStatus

log = logging.getLogger(__name__)
Key = tuple[str, str]  # (namespace, name)
# Retry delays after a failed reconcile: 1, 2, 4 ... capped at 60 s.
MAX_BACKOFF_SECONDS = 60.0
# How long steady work (models whose spec the status has caught up with) holds back while new
# or changed models wait or run. Their status writes and Events compete with a new model's
# Job on a busy API server, and every status write is one more event that the API server's
# watch cache must deliver, in order, before the next new model's (scale benchmark: see
# operator/README.md). A bound, so steady work never starves under a stream of applies.
STEADY_HOLD_SECONDS = 10.0
# An API server's refusal lists every bad field with its regex: 20 bad labels make ~10 kB.
MAX_REFUSAL_CHARS = 4000
# How often the pods of a Deployment short of ready replicas are looked at again (one LIST each).
UNREADY_RECHECK_SECONDS = 10.0


class Indexes(Protocol):
    """The children the operator watches, summarized (kopf indexes in production)."""

    def jobs(self, key: Key) -> Iterable[JobState]: ...
    def deployments(self, key: Key) -> Iterable[DeploymentState]: ...
    def services(self, key: Key) -> Iterable[ServiceState]: ...
    def gpu_nodes(self) -> Iterable[GpuNode]: ...


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def observe(body: dict[str, Any], spec: QuantizedModelSpec, indexes: Indexes, now: str) -> Observed:
    """The world as the decision sees it, from the model's body and the indexes (no I/O)."""
    meta = body["metadata"]
    ref = ps.ModelRef(meta["namespace"], meta["name"], meta["uid"])
    key = (ref.namespace, ref.name)
    try:
        status = QuantizedModelStatus.model_validate(body.get("status") or {})
    except ValidationError:
        log.warning("%s/%s: unreadable status, starting from an empty one", *key)
        status = QuantizedModelStatus()
    children = [j for j in indexes.jobs(key)]
    quantize = tuple(j for j in children if j.component == ps.COMPONENT_QUANTIZE and j.owner_uid == ref.uid)
    cleanup_name = jobs.cleanup_job_name(ref)
    service = [s for s in indexes.services(key) if s.owner_uid == ref.uid and s.name == ref.name]
    return Observed(
        ref=ref,
        generation=meta.get("generation", 0),
        deleting=bool(meta.get("deletionTimestamp")),
        finalizers=tuple(meta.get("finalizers") or ()),
        spec=spec,
        status=status,
        now=now,
        jobs=quantize,
        cleanup_job=next((j for j in children if j.name == cleanup_name), None),
        deployments=tuple(d for d in indexes.deployments(key) if d.owner_uid == ref.uid),
        service=service[0] if service else None,
        gpu_nodes=tuple(indexes.gpu_nodes()),
    )


def invalid_spec_status(body: dict[str, Any], error: ValidationError, now: str) -> QuantizedModelStatus:
    """A spec the CRD let through but the operator cannot use (an older CRD, say): say why."""
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return unusable_spec_status(body, f"spec.{where}: {first['msg']}", now)


def refused_child_message(manifest: dict[str, Any], error: ApiError) -> str:
    """What to tell the user when the API server refuses (400, 422) a child made from their spec: the
    CRD accepts label keys, tolerations, resource names and Secret names that a Job or Deployment
    may not carry, and only a spec change can fix that (found by tests/reliability_tests)."""
    kind, name = manifest["kind"], manifest["metadata"]["name"]
    text = f"the API server refused {kind} {name} made from this spec; fix the fields it names: "
    return (text + error.message)[:MAX_REFUSAL_CHARS]


def unusable_spec_status(body: dict[str, Any], message: str, now: str) -> QuantizedModelStatus:
    """Failed, with Ready False for reason InvalidSpec; the other conditions are kept."""
    verdict = cond.Verdict(cond.READY, "False", "InvalidSpec", message)
    try:
        old = QuantizedModelStatus.model_validate(body.get("status") or {})
    except ValidationError:
        old = QuantizedModelStatus()
    generation = body["metadata"].get("generation", 0)
    merged = cond.merge([c for c in old.conditions if c.type == cond.READY], [verdict], generation, now)
    others = [c for c in old.conditions if c.type != cond.READY]
    return old.model_copy(
        update={"phase": "Failed", "observed_generation": generation, "conditions": others + merged}
    )


class Reconciler:
    def __init__(
        self,
        api: KubeApi,
        settings: Settings,
        indexes: Indexes,
        metrics: Metrics,
        clock: Callable[[], str] = utc_now,
        synced: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.api = api
        # Waited for before any reconcile: the indexes must have listed every child once.
        self._synced = synced
        self.settings = settings
        self.indexes = indexes
        self.metrics = metrics
        self.clock = clock
        # New and changed models (observedGeneration behind) get their own slots, so applying
        # one never waits behind the steady work of hundreds of others.
        self._slots = asyncio.Semaphore(settings.workers)
        self._urgent_slots = asyncio.Semaphore(settings.workers)
        self._urgent_pending = 0  # urgent reconciles waiting for a slot or running
        self._calm = asyncio.Event()  # set while none is
        self._calm.set()
        # The newest body of each model we know of: from its watch events and our own writes'
        # answers, so most reconciles need no GET (dropped on errors and resyncs: those GET).
        self._bodies: dict[Key, dict[str, Any]] = {}
        self._tasks: dict[Key, asyncio.Task[None]] = {}
        self._again: set[Key] = set()
        self._kicked: dict[Key, float] = {}  # the first kick not yet served, for the queue metric
        self._failures: dict[Key, int] = {}
        self._known: set[Key] = set()
        self._own_versions: dict[Key, str] = {}
        self._gpu_signature: tuple[Any, ...] | None = None
        # GPU node names, and a count of the times some vanished. A model whose pods were last
        # read at an older count reads them again (``podhealth.stranded``). It starts at 1 so a
        # restarted operator reads every serving model's pods once: it cannot know what went.
        self._gpu_names: frozenset[str] | None = None
        self._node_losses = 1
        self._losses_seen: dict[Key, int] = {}
        self._rechecks: dict[Key, asyncio.TimerHandle] = {}
        # Models whose children for this generation are made while others waited, and whose
        # status and Events were left to a steady turn (generation): see ``_act``.
        self._children_done: dict[Key, int] = {}

    # --- triggers --------------------------------------------------------------------------

    def model_event(self, event_type: str | None, key: Key, body: dict[str, Any]) -> None:
        if event_type == "DELETED":
            self._known.discard(key)
            self._own_versions.pop(key, None)
            self._bodies.pop(key, None)
            self._children_done.pop(key, None)
            self._losses_seen.pop(key, None)
            self.metrics.set_phase(key, None)
            if (handle := self._rechecks.pop(key, None)) is not None:
                handle.cancel()
            return
        self._known.add(key)
        self._remember(key, body)
        version = (body.get("metadata") or {}).get("resourceVersion")
        if version is not None and self._own_versions.get(key) == version:
            return  # the echo of our own write: nothing new to see
        self.kick(key)

    def _remember(self, key: Key, body: dict[str, Any]) -> None:
        """Keep the newer of two bodies. resourceVersions are opaque, but the API server's are
        etcd revisions; anything unparsable simply replaces what we had."""
        old = self._bodies.get(key)
        try:
            if old is not None and int(old["metadata"]["resourceVersion"]) > int(
                body["metadata"]["resourceVersion"]
            ):
                return
        except (KeyError, TypeError, ValueError):
            pass
        self._bodies[key] = body

    def children_changed(self, keys: Iterable[Key]) -> None:
        """Kick the models whose children changed. Only models seen on the model watch: any other
        will be kicked by its own first event, and reads the indexes then."""
        for key in keys:
            if key in self._known:
                self.kick(key)

    def gpu_nodes_changed(self) -> None:
        """Node events are frequent (heartbeats); only a change of GPU classes matters, and a node
        that vanished (the pods on it must stop counting as serving)."""
        nodes = list(self.indexes.gpu_nodes())
        names = frozenset(n.name for n in nodes)
        lost = sorted(self._gpu_names - names) if self._gpu_names is not None else []
        self._gpu_names = names
        if lost:
            self._node_losses += 1
            log.info("GPU nodes gone: %s", ", ".join(lost))
        signature = gpu_classes(nodes)
        changed = signature != self._gpu_signature
        first = self._gpu_signature is None
        self._gpu_signature = signature
        if changed and not first:
            log.info("GPU classes changed: %s", ", ".join(c.name for c in signature) or "none")
        if lost or (changed and not first):
            for key in list(self._known):
                self.kick(key)

    def kick(self, key: Key) -> None:
        self._kicked.setdefault(key, time.monotonic())
        task = self._tasks.get(key)
        if task is not None and not task.done():
            self._again.add(key)
            return
        self._tasks[key] = asyncio.get_running_loop().create_task(self._run(key), name=f"reconcile {key}")

    async def resync_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.resync_seconds)
            for key in list(self._known):
                self._bodies.pop(key, None)  # a resync reads the model afresh
                self.kick(key)

    async def close(self) -> None:
        tasks = [t for t in self._tasks.values() if not t.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def idle(self) -> None:
        """Wait until no reconcile runs (for tests and orderly shutdown)."""
        while any(not t.done() for t in self._tasks.values()):
            await asyncio.gather(*list(self._tasks.values()), return_exceptions=True)

    # --- one model -------------------------------------------------------------------------

    async def _run(self, key: Key) -> None:
        if self._synced is not None:
            await self._synced()
        while True:
            self._again.discard(key)
            started = time.monotonic()
            try:
                if self._urgent(key):
                    await self._urgent_turn(key)
                else:
                    await self._steady_turn(key)
            except ApiError as e:
                if e.namespace_terminating:
                    # The namespace is going, and the model with it: nothing left to converge.
                    log.info("%s/%s: namespace is being deleted; not retrying (%s)", *key, e.message)
                else:
                    self._retry_later(key, f"ApiError {e}")
            except (aiohttp.ClientError, TimeoutError) as e:
                self._retry_later(key, f"{type(e).__name__}: {e}")
            except Exception:  # a bug in one model's reconcile must not stop its retries
                log.exception("%s/%s: reconcile failed", *key)
                self._retry_later(key, "unexpected error")
            else:
                self._failures.pop(key, None)
                self.metrics.reconciles.labels("ok").inc()
            self.metrics.reconcile_seconds.observe(time.monotonic() - started)
            if key not in self._again:
                return

    async def _urgent_turn(self, key: Key) -> None:
        self._urgent_pending += 1
        self._calm.clear()
        try:
            async with self._urgent_slots:
                await self._reconcile_now(key, "new")
        finally:
            self._urgent_pending -= 1
            if not self._urgent_pending:
                self._calm.set()

    async def _steady_turn(self, key: Key) -> None:
        if not self._calm.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._calm.wait(), STEADY_HOLD_SECONDS)
        async with self._slots:
            await self._reconcile_now(key, "steady")

    async def _reconcile_now(self, key: Key, work: str) -> None:
        kicked = self._kicked.pop(key, None)
        if kicked is not None:
            self.metrics.queue_seconds.labels(work).observe(time.monotonic() - kicked)
        await self.reconcile(key, urgent=work == "new")
        if work == "steady":
            self._children_done.pop(key, None)

    def _urgent(self, key: Key) -> bool:
        body = self._bodies.get(key)
        if body is None:
            return False
        generation = body["metadata"].get("generation")
        if self._children_done.get(key) == generation:
            return False  # only its status and Events are left: steady work
        status = body.get("status") or {}
        return status.get("observedGeneration") != generation

    def _retry_later(self, key: Key, why: str) -> None:
        self._bodies.pop(key, None)  # the retry reads the model afresh
        self.metrics.reconciles.labels("error").inc()
        failures = self._failures[key] = self._failures.get(key, 0) + 1
        delay = min(2.0 ** (failures - 1), MAX_BACKOFF_SECONDS)
        log.warning("%s/%s: reconcile failed (%s); retrying in %.0f s", *key, why, delay)
        asyncio.get_running_loop().call_later(delay, self.kick, key)

    async def reconcile(self, key: Key, urgent: bool = False) -> None:
        namespace, name = key
        body = self._bodies.get(key)
        if body is None:
            body = await self.api.get(ps.API_VERSION, ps.KIND, namespace, name)
            if body is None:
                self.metrics.set_phase(key, None)
                return
            self._remember(key, body)
        now = self.clock()
        try:
            spec = QuantizedModelSpec.model_validate(body.get("spec") or {})
        except ValidationError as e:
            await self._write_status(key, body, invalid_spec_status(body, e, now))
            return
        observed = observe(body, spec, self.indexes, now)
        if observed.deleting and lifecycle.FINALIZER in observed.finalizers:
            observed = replace(observed, namespace_terminating=await self._namespace_terminating(namespace))
        job = lifecycle.outcome_needed(observed)
        if job is not None:
            pods = await self.api.list("v1", "Pod", namespace, f"batch.kubernetes.io/job-name={job.name}")
            container = jobs.CLEANUP_CONTAINER if observed.deleting else jobs.QUANTIZE_CONTAINER
            observed = replace(observed, pod=pod_outcome(pods, container, job.complete))
        losses = self._node_losses
        if lifecycle.server_pods_needed(observed, self._losses_seen.get(key, 0) != losses):
            observed, stranded = lifecycle.with_server_pods(observed, await self._server_pods(key))
            if not stranded:
                self._losses_seen[key] = losses
        plan = lifecycle.decide(observed, self.settings)
        await self._act(key, body, observed, plan, urgent)
        if lifecycle.server_pods_needed(observed):
            self._recheck_later(key)

    async def _act(
        self, key: Key, body: dict[str, Any], observed: Observed, plan: lifecycle.Plan, urgent: bool = False
    ) -> None:
        namespace, name = key
        version = body["metadata"]["resourceVersion"]
        if plan.add_finalizer:
            finalizers = [*observed.finalizers, lifecycle.FINALIZER]
            version = await self._set_finalizers(key, finalizers, version)
        try:
            for manifest in plan.create:
                if await self.api.create(manifest):
                    log.info("%s/%s: created %s %s", *key, manifest["kind"], manifest["metadata"]["name"])
            for manifest in plan.apply:
                await self.api.apply(manifest)
                log.info("%s/%s: applied %s %s", *key, manifest["kind"], manifest["metadata"]["name"])
        except ApiError as e:
            if e.status not in (400, 422):  # 400: a quantity or a character it cannot even decode
                raise
            await self._refused(key, body, observed, refused_child_message(manifest, e))
            return
        for ref in plan.delete:
            await self.api.delete(ref.api_version, ref.kind, namespace, ref.name)
            log.info("%s/%s: deleted %s %s", namespace, name, ref.kind, ref.name)
        if urgent and self._defer_bookkeeping(plan):
            # Other new models wait: their Jobs first, this one's status and Events in a steady
            # turn (soon after the burst, at most STEADY_HOLD_SECONDS later). On a busy API
            # server each write here delays the next model's Job (scale benchmark).
            self._children_done[key] = observed.generation
            self.kick(key)
            return
        if plan.status is not None:
            version = await self._write_status(key, body, plan.status) or version
        await self._post_events(observed, plan.events)
        if plan.remove_finalizer:  # last: once released, a deleting model is gone
            finalizers = [f for f in observed.finalizers if f != lifecycle.FINALIZER]
            await self._set_finalizers(key, finalizers, version)
        if plan.status is not None:
            self.metrics.set_phase(key, plan.status.phase)
            self.metrics.count(plan.events, plan.status.quantization.seconds)

    def _defer_bookkeeping(self, plan: lifecycle.Plan) -> bool:
        """Whether an urgent reconcile that made children leaves its status and Events for later:
        only while other urgent reconciles wait or run, and never around a finalizer."""
        made = bool(plan.create or plan.apply or plan.delete)
        bookkeeping = plan.status is not None or bool(plan.events)
        finalizer = plan.add_finalizer or plan.remove_finalizer
        return made and bookkeeping and not finalizer and self._urgent_pending > 1

    async def _server_pods(self, key: Key) -> list[dict[str, Any]]:
        namespace, name = key
        selector = f"{ps.LABEL_MODEL}={name},{ps.LABEL_COMPONENT}={ps.COMPONENT_SERVER}"
        return await self.api.list("v1", "Pod", namespace, selector)

    def _recheck_later(self, key: Key) -> None:
        """A pod that restarts or keeps waiting changes no Deployment status, so no event tells us:
        look again in a while, once per model at a time, until its pods are ready."""
        loop = asyncio.get_running_loop()
        handle = self._rechecks.get(key)
        if handle is not None and handle.when() > loop.time():
            return
        self._rechecks[key] = loop.call_later(UNREADY_RECHECK_SECONDS, self.kick, key)

    async def _refused(self, key: Key, body: dict[str, Any], observed: Observed, message: str) -> None:
        """A child the API server refuses: Failed with the reason, and no retry (a spec change
        reconciles again). A deleting model whose clean-up Job is refused is let go."""
        log.warning("%s/%s: %s", *key, message)
        if observed.deleting:
            event = cond.Event("Warning", "CleanupSkipped", f"no clean-up: {message}")
            await self._post_events(observed, [event])
            finalizers = [f for f in observed.finalizers if f != lifecycle.FINALIZER]
            await self._set_finalizers(key, finalizers, body["metadata"]["resourceVersion"])
            return
        status = unusable_spec_status(body, message, observed.now)
        await self._write_status(key, body, status)
        self.metrics.set_phase(key, status.phase)

    async def _namespace_terminating(self, namespace: str) -> bool:
        ns = await self.api.request("GET", f"/api/v1/namespaces/{namespace}")
        return bool(ns["metadata"].get("deletionTimestamp"))

    async def _post_events(self, observed: Observed, events: Iterable[cond.Event]) -> None:
        """Post the Events side by side (one reconcile may have three transitions)."""

        async def post(event: cond.Event) -> None:
            try:
                await self.api.post_event(observed.ref, event.type, event.reason, event.message, observed.now)
            except ApiError as e:
                if not e.namespace_terminating:
                    raise
                # The namespace refuses new Events: the log is the only place left to say it.
                ref = observed.ref
                log.warning("%s/%s: %s: %s", ref.namespace, ref.name, event.reason, event.message)

        await asyncio.gather(*(post(e) for e in events))

    async def _set_finalizers(self, key: Key, finalizers: list[str], version: str) -> str:
        updated = await self.api.set_finalizers(*key, finalizers, version)
        self._remember(key, updated)
        new_version = updated["metadata"]["resourceVersion"]
        self._own_versions[key] = new_version
        return new_version

    async def _write_status(self, key: Key, body: dict[str, Any], status: QuantizedModelStatus) -> str | None:
        """Write the status when it differs from what is stored; returns the new resourceVersion."""
        new = status.to_body()
        try:
            old = QuantizedModelStatus.model_validate(body.get("status") or {}).to_body()
        except ValidationError:
            old = None
        if new == old:
            return None
        try:
            updated = await self.api.set_status(*key, new)
        except ApiError as e:
            if e.status == 404:
                return None  # deleted meanwhile
            raise
        self._remember(key, updated)
        version = updated["metadata"]["resourceVersion"]
        self._own_versions[key] = version
        return version
