"""The light watches' store: summaries filed by owner, and which models a change concerns.

The list+watch loop itself runs against the real API server in every k8s lifecycle test (the
operator reads all its children through it); here only the bookkeeping, which decides when a
model is kicked.
"""

from __future__ import annotations

from qmodel_operator.handlers import JOB_KIND, NODE_KIND
from qmodel_operator.kube import resource_of
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
