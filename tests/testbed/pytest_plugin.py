"""pytest fixtures for the test bed (registered from tests/conftest.py via ``pytest_plugins``).

- ``k8s_cluster`` (session): a running ``testbed.cluster.Cluster`` with the default KWOK node
  sets and one process node; ``.kubeconfig`` (Path), ``.api_client()``, ``.kubectl(...)``,
  ``.add_nodes(...)``, ``.start_process_node(...)``, ``.pod_log(ns, pod, container)``.
- ``k8s_api`` (session): a ``kubernetes.client.ApiClient`` for the admin user.
- ``k8s_namespace`` (per test): a fresh namespace whose default ServiceAccount exists;
  deleted after the test.
Every test using them must carry the ``k8s`` marker. Component logs are appended to a
failed test's report; the cluster's work dir (logs) is kept when any test failed.
Set QMODEL_TESTBED_KUBECONFIG to run against a cluster started with ``python -m testbed up``.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

import pytest

from testbed import cluster as tb_cluster
from testbed import paths
from testbed.procs import wait_until

_state = {"failed": False, "cluster": None}


@pytest.fixture(scope="session")
def k8s_cluster():
    external = os.environ.get("QMODEL_TESTBED_KUBECONFIG")
    if external:
        _state["cluster"] = tb_cluster.attach(Path(external))
        yield _state["cluster"]
        return
    paths.ensure_installed()
    cluster = tb_cluster.start(tb_cluster.ClusterConfig())
    _state["cluster"] = cluster
    try:
        yield cluster
    finally:
        _state["cluster"] = None
        cluster.stop(keep_workdir=_state["failed"])


@pytest.fixture(scope="session")
def k8s_api(k8s_cluster):
    api = k8s_cluster.api_client()
    yield api
    api.close()


@pytest.fixture
def k8s_namespace(request, k8s_cluster, k8s_api) -> str:
    from kubernetes import client

    core = client.CoreV1Api(k8s_api)
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"{slug}-{secrets.token_hex(3)}"
    core.create_namespace({"metadata": {"name": name, "labels": {"testbed.qmodel.dev/test": "true"}}})

    def sa_exists() -> bool:
        return any(sa.metadata.name == "default" for sa in core.list_namespaced_service_account(name).items)

    def root_ca_exists() -> bool:
        found = core.list_namespaced_config_map(name, field_selector="metadata.name=kube-root-ca.crt")
        return bool(found.items)

    # Pods are refused until the namespace's default ServiceAccount exists (admission), and their
    # service-account volume waits for the kube-root-ca.crt ConfigMap the controller manager publishes.
    wait_until(sa_exists, f"ServiceAccount {name}/default", timeout=60)
    wait_until(root_ca_exists, f"ConfigMap {name}/kube-root-ca.crt", timeout=60)
    yield name
    core.delete_namespace(name, propagation_policy="Background")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and "k8s" in item.keywords:
        _state["failed"] = True
        cluster = _state["cluster"]
        if cluster is not None:
            report.sections.append(("test bed logs", cluster.logs(lines=40)))
