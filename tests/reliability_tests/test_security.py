"""Security: the rendered chart scanned by checkov, every pod hardened, and credentials that never
leak into logs, Events, status or termination messages.

checkov pins boto3==1.35.49, networkx<2.7 and packaging<24, which conflict with the project's
constraints.txt (boto3 1.44.5, networkx 3.6.1 for torch, packaging 26.3), so it lives in a
virtualenv of its own under ~/.cache/qmodel-tools, installed from PyPI on first use (about two
minutes, once per machine) at the pinned version below.
"""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from chart_tests.chart_support import CHART, helm, render, render_args
from kubernetes import client
from operator_tests.k8s_support import FAIL_LABEL, MESSAGE_ANNOTATION, wait_for, with_result
from operator_tests.support import spec_body
from reliability_tests.chaos_support import Bed, running_bed

from testbed.nodes import DEFAULT_NODE_SETS
from testbed.processnode.config import ProcessNodeConfig
from testbed.s3server import S3Server, s3_bucket, s3_server  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[2]
# Findings on the rendered chart that stay, each with the reason. The test fails on any other
# finding and on an entry here that no longer fails (so the list cannot go stale).
ALLOWED = {
    "CKV_K8S_11": "no CPU limit on the operator: a limit throttles kopf's event loop under bursts of "
    "events; it requests CPU and has a memory limit (operator.resources)",
    "CKV_K8S_15": "imagePullPolicy IfNotPresent: release tags are immutable and operator.image.digest "
    "pins the image; Always would make every restart depend on the registry",
    "CKV_K8S_38": "the operator's pod mounts its ServiceAccount token because the operator talks to the "
    "API server; every pod the operator creates sets automountServiceAccountToken: false",
    "CKV_K8S_43": "the image is named by tag by default, since no digest is known before a release; "
    "operator.image.digest and runtime.image.digest pin one",
    "CKV2_K8S_6": "no NetworkPolicy ships: the operator's only peer is the API server, whose address is "
    "cluster-specific; clusters with a policy controller add their own egress rule",
}
# Values that render every optional object (monitors, the S3 Secret) besides the defaults.
FULL_VALUES = {
    "metrics.enabled": True,
    "metrics.serviceMonitor.enabled": True,
    "metrics.podMonitor.enabled": True,
    "s3.secret.create": True,
    "s3.accessKeyId": "AKIAEXAMPLE",
    "s3.secretAccessKey": "example",
    "watch.namespaces": ["ml"],
}
CPU_GPU = "TESTBED-CPU-AS-GPU"  # the process node's product: its pods really run


# --- checkov on the rendered chart ----------------------------------------------------------


def checkov() -> Path:
    """The pinned checkov in its own virtualenv (``make setup`` installs it; this is a no-op then)."""
    out = subprocess.run(
        [str(REPO / "scripts" / "install-checkov.sh")], check=True, capture_output=True, text=True
    )
    return Path(out.stdout.strip())


def scan(folder: Path) -> tuple[list[dict[str, Any]], int]:
    """checkov's failed checks on every manifest in ``folder`` and how many passed (offline)."""
    out = subprocess.run(
        [str(checkov()), "-d", str(folder), "--framework", "kubernetes", "--skip-download", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert out.returncode in (0, 1), out.stderr[-2000:]  # 1: there are failed checks
    reports = json.loads(out.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    assert reports and all(r["summary"]["parsing_errors"] == 0 for r in reports), out.stdout[-2000:]
    passed = sum(r["summary"]["passed"] for r in reports)
    return [f for r in reports for f in r["results"]["failed_checks"]], passed


@pytest.mark.slow
def test_rendered_chart_has_no_unexplained_checkov_findings(tmp_path):
    renders = {"default": render_args(), "full": render_args(FULL_VALUES)}
    renders |= {f.stem: render_args(files=[f]) for f in sorted((CHART / "ci").glob("*.yaml"))}
    for name, args in renders.items():
        (tmp_path / f"{name}.yaml").write_text(helm(*args).stdout)
    failed, passed = scan(tmp_path)
    assert passed > 100, passed  # it really checked the renders (219 passed for two of them)
    unexplained = sorted(
        {
            f"{f['check_id']} {f['resource']} ({f['check_name']})"
            for f in failed
            if f["check_id"] not in ALLOWED
        }
    )
    assert not unexplained, "checkov findings without a reason in ALLOWED:\n" + "\n".join(unexplained)
    stale = set(ALLOWED) - {f["check_id"] for f in failed}
    assert not stale, f"no longer failing, remove from ALLOWED: {sorted(stale)}"
    print("\ncheckov (scripts/install-checkov.sh) on the chart, allowed findings:")
    for check, reason in ALLOWED.items():
        print(f"  {check}: {reason}")


# --- hardening ------------------------------------------------------------------------------


def hardening_problems(pod: dict[str, Any], token: bool = False) -> list[str]:
    """What a pod spec (camelCase, as the API returns or helm renders it) lacks: non-root,
    read-only root filesystem, no privilege escalation, no capabilities; no API token unless
    ``token`` (the operator's own pod needs one)."""
    problems = []
    if not (pod.get("securityContext") or {}).get("runAsNonRoot"):
        problems.append("runAsNonRoot is not true")
    if not token and pod.get("automountServiceAccountToken") is not False:
        problems.append("automountServiceAccountToken is not false")
    for c in pod.get("initContainers", []) + pod["containers"]:
        sc = c.get("securityContext") or {}
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{c['name']}: root filesystem writable")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{c['name']}: privilege escalation allowed")
        if "ALL" not in (sc.get("capabilities") or {}).get("drop", []) or sc.get("privileged"):
            problems.append(f"{c['name']}: capabilities not all dropped")
    if not token and any((v.get("projected") or {}).get("sources") for v in pod.get("volumes", [])):
        tokens = [v["name"] for v in pod["volumes"] if "serviceAccountToken" in json.dumps(v)]
        if tokens:
            problems.append(f"service-account token volume(s) {tokens}")
    return problems


@pytest.mark.parametrize("values", [None, *sorted(p.name for p in (CHART / "ci").glob("*.yaml"))])
def test_operator_pod_is_hardened_in_every_values_file(values):
    docs = render(files=[CHART / "ci" / values] if values else [])
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    assert hardening_problems(deployment["spec"]["template"]["spec"], token=True) == []


# --- a planted secret never leaks -----------------------------------------------------------


@pytest.fixture(scope="module")
def bed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """A cluster of this module's own: KWOK GPU nodes, and a process node (a CPU posing as a GPU)
    where the failing quantize Job really runs."""
    for b in running_bed(request, tmp_path_factory, DEFAULT_NODE_SETS):
        b.cluster.start_process_node(
            ProcessNodeConfig(name="sec-proc", pod_cidr="127.203.0.0/16", taint=False, gpus=1)
        )
        yield b


def _api_json(api: client.ApiClient, items: list[Any]) -> str:
    return json.dumps([api.sanitize_for_serialization(i) for i in items])


def leaks(bed: Bed, namespace: str, planted: list[str]) -> dict[str, list[str]]:
    """Where each planted value shows up: operator log, Events, models, children, pods'
    termination messages and the really-run pods' output."""
    api, core = bed.api, client.CoreV1Api(bed.api)
    models = bed.models(namespace)
    pods = core.list_namespaced_pod(namespace).items
    terminations = [
        s.state.terminated.message or ""
        for p in pods
        for s in (p.status.container_statuses or []) + (p.status.init_container_statuses or [])
        if s.state and s.state.terminated
    ]
    qms = models.custom.list_namespaced_custom_object("qmodel.dev", "v1alpha1", namespace, "quantizedmodels")
    places = {
        "operator log": bed.operator.log_tail(1_000_000),
        "Events": _api_json(api, core.list_namespaced_event(namespace).items),
        "QuantizedModels (spec and status)": json.dumps(qms),
        "Jobs": _api_json(api, models.batch.list_namespaced_job(namespace).items),
        "Deployments": _api_json(api, models.apps.list_namespaced_deployment(namespace).items),
        "Pods (env, termination messages)": _api_json(api, pods) + json.dumps(terminations),
        "process-node container output": "".join(
            bed.cluster.pod_log(namespace, p.metadata.name, c.name)
            for p in pods
            if p.spec.node_name == "sec-proc"
            for c in p.spec.containers
        ),
    }
    return {
        where: [v for v in planted if v in text]
        for where, text in places.items()
        if any(v in text for v in planted)
    }


@pytest.mark.k8s
@pytest.mark.slow
def test_planted_credentials_never_leak(bed: Bed, s3_server: S3Server, s3_bucket: str):  # noqa: F811
    namespace = bed.namespace("security")
    models = bed.models(namespace)
    secret_key = "planted-secret-" + secrets.token_hex(12)
    session_token = "planted-token-" + secrets.token_hex(12)
    planted = [secret_key, session_token, base64.b64encode(secret_key.encode()).decode()]
    # The real endpoint and key id, a wrong secret key: the S3 server refuses the signature.
    creds = {**s3_server.env(), "AWS_SECRET_ACCESS_KEY": secret_key, "AWS_SESSION_TOKEN": session_token}
    creds = {k: v for k, v in creds.items() if k.startswith("AWS_")}
    models.core.create_namespaced_secret(namespace, {"metadata": {"name": "s3"}, "stringData": creds})
    with_secret = {"credentialsSecret": "s3"}
    base = spec_body(
        source={"uri": f"s3://{s3_bucket}/models/m/", **with_secret},
        artifacts={"uri": f"s3://{s3_bucket}/qmodel/", **with_secret},
    )
    # 1. A full lifecycle on KWOK nodes: Job, result, gate, Deployment, Ready.
    models.create("served", with_result(base, "served", gpu={"products": ["NVIDIA-A100-SXM4-80GB"]}))
    # 2. A KWOK Job that fails with a credentials error (the kind of text that could carry them).
    failing = {
        "podLabels": {FAIL_LABEL: "true"},
        "podAnnotations": {MESSAGE_ANNOTATION: "S3 refused the credentials: SignatureDoesNotMatch"},
        "backoffLimit": 0,
        "gpu": {"products": ["NVIDIA-A100-SXM4-80GB"]},
    }
    models.create("refused", {**base, "jobs": failing})
    # 3. The real quantize Job on the process node, signing with the planted key: it fails for real.
    models.create("real", {**base, "jobs": {"backoffLimit": 0, "gpu": {"products": [CPU_GPU]}}})

    wait_for(models.phase_is("served", "Ready"), "served Ready", 120, bed.operator)
    wait_for(models.phase_is("refused", "Failed"), "refused Failed", 120, bed.operator)
    wait_for(models.phase_is("real", "Failed"), "real Failed (its Job ran and failed)", 240, bed.operator)
    reason = models.condition("real", "Quantized")["message"]
    print(f"\nthe real Job's reason: {reason}")
    assert "AWS_SECRET_ACCESS_KEY" in reason  # it failed on the credentials, and says which to check
    found = leaks(bed, namespace, planted)
    assert not found, f"planted credentials found in: {found}"
    # The pods get them from the Secret by reference, never as values.
    for job in models.batch.list_namespaced_job(namespace).items:
        env = job.spec.template.spec.containers[0].env or []
        assert all(e.value_from.secret_key_ref.name == "s3" for e in env if "AWS_SECRET" in e.name)


@pytest.mark.k8s
@pytest.mark.slow
def test_pods_the_operator_creates_are_hardened(bed: Bed):
    """Job and Deployment templates and the pods as admitted (the ServiceAccount admission plugin
    adds a token volume unless automountServiceAccountToken is false)."""
    core, batch, apps = client.CoreV1Api(bed.api), client.BatchV1Api(bed.api), client.AppsV1Api(bed.api)
    namespace = bed.namespace("hardening")
    models = bed.models(namespace)
    models.create("hard", with_result(spec_body(), "hard", gpu={"products": ["NVIDIA-A100-SXM4-80GB"]}))
    wait_for(models.phase_is("hard", "Ready"), "hard Ready", 120, bed.operator)
    wait_for(lambda: core.list_namespaced_pod(namespace).items, "pods")
    templates = {
        f"Job {j.metadata.name}": j.spec.template.spec for j in batch.list_namespaced_job(namespace).items
    }
    templates |= {
        f"Deployment {d.metadata.name}": d.spec.template.spec
        for d in apps.list_namespaced_deployment(namespace).items
    }
    templates |= {f"Pod {p.metadata.name}": p.spec for p in core.list_namespaced_pod(namespace).items}
    assert {k.split()[0] for k in templates} == {"Job", "Deployment", "Pod"}
    problems = {
        name: hardening_problems(bed.api.sanitize_for_serialization(spec)) for name, spec in templates.items()
    }
    assert not any(problems.values()), problems
    # The uid is the runtime image's user, not root.
    assert all(
        bed.api.sanitize_for_serialization(s)["securityContext"]["runAsUser"] > 0 for s in templates.values()
    )


def test_hardening_check_catches_each_weakness():
    good = {
        "securityContext": {"runAsNonRoot": True},
        "automountServiceAccountToken": False,
        "containers": [
            {
                "name": "c",
                "securityContext": {
                    "readOnlyRootFilesystem": True,
                    "allowPrivilegeEscalation": False,
                    "capabilities": {"drop": ["ALL"]},
                },
            }
        ],
    }
    assert hardening_problems(good) == []
    weakened = yaml.safe_load(yaml.safe_dump(good))
    weakened["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    weakened["automountServiceAccountToken"] = True
    token = {
        "name": "kube-api-access-x",
        "projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]},
    }
    weakened["volumes"] = [token]
    assert hardening_problems(weakened) == [
        "automountServiceAccountToken is not false",
        "c: privilege escalation allowed",
        "service-account token volume(s) ['kube-api-access-x']",
    ]
