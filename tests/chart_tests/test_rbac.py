"""Least-privilege RBAC: exactly the verbs the operator's code uses, nothing cluster-wide it does not need.

The table below is the contract, each line traced to the call that needs it; the e2e test runs
the operator with exactly these permissions (its ServiceAccount token) through a whole lifecycle.
"""

from __future__ import annotations

from chart_tests.chart_support import NAMESPACE, RELEASE, find, one, render

from qmodel_operator import handlers
from qmodel_operator.kube import PLURALS

# (apiGroup, resource) -> verbs, in the watched namespaces.
NAMESPACED = {
    ("qmodel.dev", "quantizedmodels"): {"get", "list", "watch", "patch"},  # kopf watch, fresh read, finalizer
    ("qmodel.dev", "quantizedmodels/status"): {"patch"},  # KubeApi.set_status (JSON patch)
    ("batch", "jobs"): {"list", "watch", "create", "delete"},  # index, create-if-absent, old revisions
    ("apps", "deployments"): {"list", "watch", "create", "patch", "delete"},  # server-side apply
    ("", "services"): {"list", "watch", "create", "patch", "delete"},
    ("", "pods"): {"list"},  # a finished Job's pod: its termination message
    ("", "events"): {"create"},  # one Event per condition transition
}
# Cluster-scoped, in both modes (namespaces list/watch: kopf, namespaced mode only).
CLUSTER = {
    ("", "nodes"): {"list", "watch"},  # GPU Feature Discovery labels
    ("", "namespaces"): {"get", "list", "watch"},  # get: is the namespace being deleted?
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},  # kopf
}


def _grants(role: dict) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


def _no_wildcards(docs: list[dict]) -> None:
    for role in find(docs, "Role") + find(docs, "ClusterRole"):
        for rule in role["rules"]:
            for key in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[key], (role["metadata"]["name"], rule)


def test_the_table_covers_every_kind_the_operator_touches():
    """Every resource the operator's API layer, kopf and its own watches name has a line in the table."""
    touched = {plural for plural in PLURALS.values()} | {"quantizedmodels/status"}
    kinds = (handlers.JOB_KIND, handlers.DEPLOYMENT_KIND, handlers.SERVICE_KIND)
    watched = {handlers.MODELS[2]} | {kind.plural for kind in kinds}
    assert all(kind.namespaced for kind in kinds) and not handlers.NODE_KIND.namespaced
    assert touched | watched == {resource for _, resource in NAMESPACED}
    assert handlers.NODE_KIND.plural in {resource for _, resource in CLUSTER}


def test_namespaced_by_default_a_role_per_watched_namespace():
    docs = render({"watch.namespaces": ["ml", "research"]})
    _no_wildcards(docs)
    roles = {r["metadata"]["namespace"]: r for r in find(docs, "Role")}
    assert sorted(roles) == ["ml", "research"]
    for namespace, role in roles.items():
        assert _grants(role) == NAMESPACED, namespace
        (binding,) = [b for b in find(docs, "RoleBinding") if b["metadata"]["namespace"] == namespace]
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": role["metadata"]["name"],
        }
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": f"{RELEASE}-qmodel", "namespace": NAMESPACE}
        ]
    (cluster,) = find(docs, "ClusterRole")
    assert _grants(cluster) == CLUSTER
    assert one(docs, "ClusterRoleBinding")["roleRef"]["name"] == cluster["metadata"]["name"]
    # Without watch.namespaces: the release namespace only.
    assert [r["metadata"]["namespace"] for r in find(render(), "Role")] == [NAMESPACE]


def test_cluster_wide_is_one_cluster_role_for_the_models():
    docs = render({"watch.clusterWide": True})
    _no_wildcards(docs)
    assert not find(docs, "Role") and not find(docs, "RoleBinding")
    roles = {r["metadata"]["name"]: _grants(r) for r in find(docs, "ClusterRole")}
    assert roles == {
        f"{RELEASE}-qmodel-models": NAMESPACED,
        # kopf does not track namespaces when it watches all of them.
        f"{RELEASE}-qmodel-cluster": {**CLUSTER, ("", "namespaces"): {"get"}},
    }
    assert len(find(docs, "ClusterRoleBinding")) == 2


def test_never_secrets_or_pod_writes():
    """The operator passes Secrets by reference only and never touches pods beyond reading them."""
    for values in ({}, {"watch.clusterWide": True}):
        for role in find(render(values), "Role") + find(render(values), "ClusterRole"):
            grants = _grants(role)
            assert ("", "secrets") not in grants and ("", "configmaps") not in grants
            assert grants.get(("", "pods"), set()) <= {"list"}
