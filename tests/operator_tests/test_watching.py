"""The light watches' store: summaries filed by owner, and which models a change concerns.

The bookkeeping, which decides when a model is kicked, without a cluster; then the list+watch
loop against the test bed's API server (every k8s lifecycle test also runs it: the operator
reads all its children through it).
"""

from __future__ import annotations

import asyncio

import kopf
import pytest

from qmodel_operator import watching
from qmodel_operator.handlers import JOB_KIND, NODE_KIND
from qmodel_operator.kube import KubeApi, resource_of
from qmodel_operator.watching import Store


def _job_body(name: str, model: str, *, succeeded: int = 0, namespace: str = "ml") -> dict:
    return {
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": f"uid-{name}",
            "labels": {"app.kubernetes.io/component": "quantize", "qmodel.dev/model": model},
        },
        "status": {"succeeded": succeeded},
    }


def test_only_a_changed_summary_concerns_the_model():
    store = Store()
    body = _job_body("a-q-1", "a")
    assert store.put("uid-a-q-1", JOB_KIND.summarize(body)) == {("ml", "a")}
    # The same summary again (a Job event about a field the decision never reads): no kick.
    assert store.put("uid-a-q-1", JOB_KIND.summarize(body)) == set()
    done = _job_body("a-q-1", "a", succeeded=1)
    assert store.put("uid-a-q-1", JOB_KIND.summarize(done)) == {("ml", "a")}
    assert [j.succeeded for j in store.get(("ml", "a"))] == [1]


def test_relabelled_and_deleted_objects_leave_their_old_group():
    store = Store()
    store.put("uid-x", JOB_KIND.summarize(_job_body("x", "a")))
    store.put("uid-y", JOB_KIND.summarize(_job_body("y", "a")))
    assert store.put("uid-x", JOB_KIND.summarize(_job_body("x", "b"))) == {("ml", "a"), ("ml", "b")}
    assert [j.name for j in store.get(("ml", "a"))] == ["y"]
    # A Job that lost the model label is no longer any model's child.
    unlabelled = _job_body("y", "a")
    del unlabelled["metadata"]["labels"]["qmodel.dev/model"]
    assert store.put("uid-y", JOB_KIND.summarize(unlabelled)) == {("ml", "a")}
    assert store.get(("ml", "a")) == []
    assert store.drop("uid-x") == {("ml", "b")}
    assert store.drop("uid-x") == set()


def test_uids_by_namespace_find_what_a_relist_no_longer_has():
    store = Store()
    store.put("uid-1", JOB_KIND.summarize(_job_body("j1", "a", namespace="ml")))
    store.put("uid-2", JOB_KIND.summarize(_job_body("j2", "a", namespace="other")))
    assert store.uids("ml") == {"uid-1"}
    assert store.uids(None) == {"uid-1", "uid-2"}


def test_gpu_nodes_share_one_group_and_heartbeats_change_nothing():
    store = Store()
    node = {
        "metadata": {"name": "h100-0", "uid": "n0", "labels": {"nvidia.com/gpu.memory": "81559"}},
        "status": {"conditions": [{"type": "Ready", "status": "True", "lastHeartbeatTime": "t1"}]},
    }
    assert store.put("n0", NODE_KIND.summarize(node)) == {"gpu"}
    node["status"]["conditions"][0]["lastHeartbeatTime"] = "t2"
    assert store.put("n0", NODE_KIND.summarize(node)) == set()
    assert NODE_KIND.summarize({"metadata": {"name": "cpu-0", "labels": {}}}) is None
    assert [n.memory_mib for n in store.get("gpu")] == [81559]


def test_api_call_metrics_name_the_resource_not_the_object():
    assert resource_of("/apis/batch/v1/namespaces/ml/jobs") == "jobs"
    assert resource_of("/apis/qmodel.dev/v1alpha1/namespaces/ml/quantizedmodels/m1/status") == (
        "quantizedmodels/status"
    )
    assert resource_of("/apis/apps/v1/namespaces/ml/deployments/m1") == "deployments"
    assert resource_of("/api/v1/namespaces/ml") == "namespaces"
    assert resource_of("/api/v1/nodes") == "nodes"


# --- against the test bed's API server -------------------------------------------------------


def _suspended_job(name: str, model: str) -> dict:
    """A Job the operator would watch; suspended, so no pod is ever made for it."""
    labels = {
        "app.kubernetes.io/managed-by": "qmodel-operator",
        "app.kubernetes.io/component": "quantize",
        "qmodel.dev/model": model,
    }
    pod = {"restartPolicy": "Never", "containers": [{"name": "c", "image": "x", "command": ["true"]}]}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": labels},
        "spec": {"suspend": True, "template": {"spec": pod}},
    }


async def _until(check, what: str, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@pytest.mark.k8s
def test_the_watch_lists_then_follows_across_reconnects(k8s_cluster, k8s_api, k8s_namespace, monkeypatch):
    from kubernetes import client

    monkeypatch.setattr(watching, "WATCH_SECONDS", 1)  # the API server ends each watch after 1 s
    batch = client.BatchV1Api(k8s_api)
    ns = k8s_namespace
    batch.create_namespaced_job(ns, _suspended_job("listed", "a"))  # there before the watch starts
    info = kopf.ConnectionInfo(server=k8s_cluster.server, token=k8s_cluster.token, insecure=True)

    async def login() -> kopf.ConnectionInfo:
        return info

    async def scenario() -> int:
        api = KubeApi(login, limit=4)
        streams = 0
        real_stream = api.stream

        def counting_stream(*args, **kwargs):
            nonlocal streams
            streams += 1
            return real_stream(*args, **kwargs)

        api.stream = counting_stream
        store: Store = Store()
        listed = asyncio.Event()
        task = asyncio.create_task(
            watching.watch_scope(api, JOB_KIND, store, ns, lambda keys: None, listed.set)
        )
        try:
            await _until(listed.is_set, "the first list")
            assert [j.name for j in store.get((ns, "a"))] == ["listed"]
            await _until(lambda: streams >= 3, "two reconnects of the watch")
            await asyncio.to_thread(batch.create_namespaced_job, ns, _suspended_job("watched", "b"))
            await _until(lambda: store.get((ns, "b")), "the new Job on the watch")
            await asyncio.to_thread(batch.delete_namespaced_job, "listed", ns)
            await _until(lambda: not store.get((ns, "a")), "the deleted Job to leave the store")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await api.close()
        return streams

    assert asyncio.run(scenario()) >= 3
