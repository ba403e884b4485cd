"""Shared by the chaos and fault tests: a test bed of their own, the model mix, and the checks.

Each test module gets its own cluster (``bed`` fixture): these tests SIGKILL the operator, add
and delete GPU nodes, and must be the only operator watching their namespaces, so they cannot
share the session's cluster and operator (``qm_operator``) with the operator tests.

The checks are pure functions over the objects read from the API server (``duplicate_jobs``,
``orphans``, ``artifact_problems``), so what counts as a duplicate or an orphan is tested
without a cluster (test_chaos.py).
"""

from __future__ import annotations

import secrets
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from operator_tests.k8s_support import (
    FAIL_LABEL,
    MESSAGE_ANNOTATION,
    RUN_SECONDS_ANNOTATION,
    Models,
    Operator,
    install_crd,
    wait_for,
    with_result,
)
from operator_tests.support import spec_body

from testbed import cluster as tb_cluster
from testbed import paths
from testbed.nodes import NodeSet

LABEL_MODEL = "qmodel.dev/model"
LABEL_REVISION = "qmodel.dev/revision"
# The chaos mix: each model's expected final phase.
EXPECTED = {"ok": "Ready", "del": "Ready", "rej": "Rejected", "fail": "Failed"}
JOB_FAILURE = "CUDA error: an illegal memory access was encountered"


@dataclass
class Bed:
    cluster: tb_cluster.Cluster
    api: client.ApiClient
    operator: Operator

    def namespace(self, prefix: str) -> str:
        """A fresh namespace whose default ServiceAccount exists (pods are refused before)."""
        core = client.CoreV1Api(self.api)
        name = f"{prefix}-{secrets.token_hex(3)}"
        core.create_namespace({"metadata": {"name": name}})
        wait_for(lambda: core.list_namespaced_service_account(name).items, f"{name}/default ServiceAccount")
        return name

    def models(self, namespace: str) -> Models:
        return Models(self.api, namespace)


def start_bed(workdir: Path, node_sets: tuple[NodeSet, ...]) -> Bed:
    """A cluster with only KWOK nodes (nothing runs for real), the CRD, and the operator."""
    paths.ensure_installed()
    config = tb_cluster.ClusterConfig(node_sets=node_sets, process_nodes=(), workdir=workdir)
    cluster = tb_cluster.start(config)
    api = cluster.api_client()
    install_crd(api)
    operator = Operator(cluster.kubeconfig, cluster.log_dir)
    try:
        operator.start()
    except BaseException:
        cluster.stop(keep_workdir=True)
        raise
    return Bed(cluster, api, operator)


def running_bed(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, node_sets: tuple[NodeSet, ...]
) -> Iterator[Bed]:
    """The body of a module's ``bed`` fixture: its work dir is kept when one of its tests failed."""
    failed_before = request.session.testsfailed
    b = start_bed(tmp_path_factory.mktemp("reliability-bed"), node_sets)
    try:
        yield b
    finally:
        b.operator.stop()
        b.api.close()
        b.cluster.stop(keep_workdir=request.session.testsfailed > failed_before)


# --- the model mix -----------------------------------------------------------------------------


def mix(run_seconds: dict[str, float]) -> dict[str, dict[str, Any]]:
    """Specs of the chaos mix: a model that passes the gate, one that passes and has a finalizer
    (artifacts.deletePolicy Delete: a clean-up Job on deletion), one whose perplexity fails the
    gate (+18.5% against 2%), one whose quantize Job fails. ``run_seconds``: each Job's run time."""

    def timed(name: str) -> dict[str, str]:
        return {RUN_SECONDS_ANNOTATION: f"{int(run_seconds[name] * 1000)}ms"}

    failing_jobs = {
        "podLabels": {FAIL_LABEL: "true"},
        "podAnnotations": {MESSAGE_ANNOTATION: JOB_FAILURE, **timed("fail")},
        "backoffLimit": 0,
    }
    return {
        "ok": with_result(spec_body(), "ok", annotations=timed("ok")),
        "del": with_result(spec_body(artifacts={"deletePolicy": "Delete"}), "del", annotations=timed("del")),
        "rej": with_result(
            spec_body(quantization={"bits": 3}), "rej", quantized=16.70, annotations=timed("rej")
        ),
        "fail": spec_body(jobs=failing_jobs),
    }


def converged(qm: dict[str, Any] | None, phase: str) -> bool:
    """At the expected phase for the latest spec; a served model with its replica ready."""
    if not qm:
        return False
    status = qm.get("status") or {}
    if status.get("phase") != phase or status.get("observedGeneration") != qm["metadata"]["generation"]:
        return False
    return phase != "Ready" or (status.get("serving") or {}).get("readyReplicas") == 1


# --- checks (pure) -----------------------------------------------------------------------------


def _meta(obj: Any) -> Any:
    return obj.metadata


def duplicate_jobs(jobs: Iterable[Any]) -> int:
    """Quantize Jobs beyond one per (model, revision)."""
    counts = Counter((_meta(j).labels.get(LABEL_MODEL), _meta(j).labels.get(LABEL_REVISION)) for j in jobs)
    return sum(n - 1 for n in counts.values())


def orphans(children: Iterable[Any], live_uids: set[str]) -> list[str]:
    """Children whose controlling owner is not a live QuantizedModel ("Kind/name")."""
    out = []
    for obj in children:
        owners = [o for o in _meta(obj).owner_references or () if o.controller]
        if not owners or owners[0].uid not in live_uids:
            out.append(f"{obj.kind or type(obj).__name__}/{_meta(obj).name}")
    return out


def artifact_problems(name: str, qm: dict[str, Any], planted: dict[str, Any] | None) -> list[str]:
    """The status's artifact must be exactly what the Job reported (or absent when none did):
    never a URI without its digest, never another revision's."""
    artifact = (qm.get("status") or {}).get("artifact") or {}
    if planted is None:
        return [f"{name}: artifact {artifact} recorded for a failed Job"] if artifact.get("uri") else []
    if artifact != planted:
        return [f"{name}: status.artifact {artifact} != the Job's {planted}"]
    return []


def leftovers(models: Models, names: Iterable[str]) -> list[str]:
    """What is still there of the models and their children (Jobs, Deployments, Services, pods)."""
    left = [f"QuantizedModel/{n}" for n in names if models.get(n)]
    for kind, items in (
        ("Job", models.batch.list_namespaced_job(models.ns).items),
        ("Deployment", models.deployments()),
        ("Service", models.services()),
        ("Pod", models.pods("")),
    ):
        left += [f"{kind}/{o.metadata.name}" for o in items]
    return left


def wait_gone(models: Models, names: Iterable[str], timeout: float = 60.0) -> float:
    """Wait until the models and every child are gone; -> seconds it took."""
    t0 = time.monotonic()
    seen: list[list[str]] = [[]]

    def gone() -> bool:
        seen[0] = leftovers(models, names)
        return not seen[0]

    try:
        wait_for(gone, f"models and children gone in {models.ns}", timeout)
    except AssertionError as e:
        raise AssertionError(f"{e}; left: {seen[0]}") from None
    return time.monotonic() - t0


def table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    """A plain-text table, columns as wide as their widest cell."""
    cells = [tuple(str(c) for c in header), *[tuple(str(c) for c in r) for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])
