"""The chart as `helm lint` and `helm template` see it: hardening, the operator's settings, monitors."""

from __future__ import annotations

import json

import pytest
from chart_tests.chart_support import (
    CHART,
    NAMESPACE,
    env_of,
    find,
    helm,
    one,
    operator_container,
    render,
    render_error,
)

from qmodel_operator import podspec as ps
from qmodel_operator import serving
from qmodel_operator.settings import Settings

CI_FILES = sorted((CHART / "ci").glob("*-values.yaml"))
EXAMPLE_VALUES = CHART.parents[1] / "examples" / "testbed-values.yaml"
VALUE_FILES = [*CI_FILES, EXAMPLE_VALUES]
# What the demo adds to examples/testbed-values.yaml on the command line.
DEMO_SET = {"s3.endpoint": "http://127.0.0.1:9000", "s3.accessKeyId": "a", "s3.secretAccessKey": "s"}


@pytest.fixture(scope="module")
def default_docs():
    return render()


def test_there_are_ci_values_files():
    assert {f.name for f in CI_FILES} >= {
        "clusterwide-values.yaml",
        "namespaces-values.yaml",
        "byo-values.yaml",
    }


@pytest.mark.parametrize("values", [None, *VALUE_FILES], ids=lambda f: f.name if f else "defaults")
def test_lint_is_clean(values):
    args = ["lint", "--strict", str(CHART)] + (["--values", str(values)] if values else [])
    if values == EXAMPLE_VALUES:
        args += [f"--set-json={k}={json.dumps(v)}" for k, v in DEMO_SET.items()]
    out = helm(*args, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "[WARNING]" not in out.stdout and "[ERROR]" not in out.stdout, out.stdout


@pytest.mark.parametrize("values", [None, *VALUE_FILES], ids=lambda f: f.name if f else "defaults")
def test_operator_env_is_accepted_by_the_operator(values):
    """Every QMODEL_OPERATOR_* the chart sets parses (unknown names or bad values stop the operator)."""
    docs = render(DEMO_SET if values == EXAMPLE_VALUES else None, files=[values] if values else [])
    settings = Settings.from_env(env_of(operator_container(docs)))
    assert settings.health_port > 0


def test_defaults_watch_the_release_namespace_with_the_chart_images(default_docs):
    settings = Settings.from_env(env_of(operator_container(default_docs)))
    assert settings.namespaces == (NAMESPACE,)
    assert settings.runtime_image == "ghcr.io/qmodel-dev/qmodel-runtime:0.1.0"
    assert operator_container(default_docs)["image"] == "ghcr.io/qmodel-dev/qmodel-operator:0.1.0"
    assert settings.log_format == "json" and settings.metrics_port == 8081
    assert settings.tolerations == () and settings.node_selector == {}


def test_values_reach_the_operator_settings():
    docs = render(files=[CHART / "ci" / "namespaces-values.yaml"])
    settings = Settings.from_env(env_of(operator_container(docs)))
    assert settings.namespaces == ("ml", "research")
    digest = "sha256:" + "0123456789abcdef" * 4
    assert settings.runtime_image == f"registry.example.com/qmodel-dev/qmodel-runtime@{digest}"
    assert settings.tolerations == (
        {"key": "sku", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"},
    )
    assert settings.node_selector == {"node-pool": "gpu"}
    assert settings.job_min_gpu_memory_mib == 24576 and settings.job_service_account == "qmodel-jobs"
    assert settings.log_format == "plain" and settings.log_level == "DEBUG"
    clusterwide = Settings.from_env(env_of(operator_container(render({"watch.clusterWide": True}))))
    assert clusterwide.namespaces == ()  # all namespaces


def test_operator_pod_is_hardened_and_single(default_docs):
    deployment = one(default_docs, "Deployment")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    container = operator_container(default_docs)
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert container["command"] == ["python", "-m", "qmodel_operator"]
    assert pod["serviceAccountName"] == one(default_docs, "ServiceAccount")["metadata"]["name"]


def test_probes_hit_the_operators_health_port():
    docs = render({"operator.healthPort": 9090})
    container = operator_container(docs)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["health"] == 9090 and env_of(container)["QMODEL_OPERATOR_HEALTH_PORT"] == "9090"
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}


def test_metrics_service_and_monitors():
    docs = render()
    service = one(docs, "Service")
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    assert not find(docs, "ServiceMonitor") and not find(docs, "PodMonitor")

    docs = render(files=[CHART / "ci" / "clusterwide-values.yaml"])
    monitor = one(docs, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    runtime = one(docs, "PodMonitor")
    # The runtime pods as the operator labels them, on the port its Deployments name.
    assert runtime["spec"]["selector"]["matchLabels"] == {
        ps.LABEL_MANAGED_BY: ps.MANAGED_BY,
        ps.LABEL_COMPONENT: ps.COMPONENT_SERVER,
    }
    assert runtime["spec"]["podMetricsEndpoints"][0]["port"] == "http"
    assert runtime["spec"]["namespaceSelector"] == {"any": True}
    namespaced = one(render(files=[CHART / "ci" / "namespaces-values.yaml"]), "PodMonitor")
    assert namespaced["spec"]["namespaceSelector"] == {"matchNames": ["ml", "research"]}
    assert serving.PORT == 8000  # the port named "http" in every runtime pod

    off = render({"metrics.enabled": False})
    assert not find(off, "Service") and env_of(operator_container(off))["QMODEL_OPERATOR_METRICS_PORT"] == "0"


def test_s3_secret_in_every_watched_namespace():
    docs = render(files=[CHART / "ci" / "namespaces-values.yaml"])
    secrets = {d["metadata"]["namespace"]: d for d in find(docs, "Secret")}
    assert sorted(secrets) == ["ml", "research"]
    assert secrets["ml"]["metadata"]["name"] == "qmodel-s3"
    assert secrets["ml"]["stringData"] == {
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": "http://minio.storage.svc:9000",
        "AWS_ACCESS_KEY_ID": "qmodel",
        "AWS_SECRET_ACCESS_KEY": "change-me",
    }
    assert not find(render(), "Secret")  # off by default
    assert "s3.accessKeyId is required" in render_error({"s3.secret.create": True})
    error = render_error({"s3.secret.create": True, "watch.clusterWide": True, "s3.accessKeyId": "a"})
    assert "needs watch.namespaces" in error


def test_bring_your_own_renders_only_the_operator():
    docs = render(files=[CHART / "ci" / "byo-values.yaml"])
    assert sorted(d["kind"] for d in docs) == ["Deployment"]
    assert one(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "qmodel-operator"
    assert "serviceAccount.name is required" in render_error({"serviceAccount.create": False})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"operator.replicas": 2}, "/operator': additional properties 'replicas' not allowed"),
        ({"operater": {}}, "additional properties 'operater' not allowed"),
        ({"runtime.jobs.minGpuMemory": 1}, "/runtime/jobs': additional properties 'minGpuMemory'"),
        ({"operator.logFormat": "yaml"}, "/operator/logFormat"),
        ({"watch.namespaces": ["Team_A"]}, "/watch/namespaces/0"),
        ({"runtime.image.digest": "latest"}, "/runtime/image/digest"),
        ({"operator.healthPort": 0}, "/operator/healthPort"),
        ({"s3.endpoint": "minio:9000"}, "/s3/endpoint"),
    ],
)
def test_schema_rejects_unknown_keys_and_bad_values(values, message):
    assert message in render_error(values)


def test_notes_say_what_is_watched_and_what_to_do_next():
    out = helm(
        "install", "qm", str(CHART), "--dry-run=client", "--namespace", NAMESPACE,
        "--set-json", 'watch.namespaces=["ml","research"]',
    )  # fmt: skip
    notes = out.stdout.split("NOTES:", 1)[1]
    assert "watches QuantizedModels in: ml, research" in notes
    assert "kubectl get nodes -L nvidia.com/gpu.product,nvidia.com/gpu.memory" in notes
    assert "rollout status deployment/qm-qmodel" in notes


def _dockerfile_users() -> dict[str, str]:
    """USER of each final Dockerfile stage (``FROM ... AS <stage>``)."""
    users, stage = {}, None
    for line in (CHART.parents[1] / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words[:1] == ["FROM"]:
            stage = words[-1] if len(words) >= 4 and words[-2].upper() == "AS" else None
        elif words[:1] == ["USER"] and stage:
            users[stage] = words[1]
    return users


def test_uids_match_the_images(default_docs):
    """The chart's runAsUser values are the users the Dockerfile's images were built with."""
    users = _dockerfile_users()
    pod = one(default_docs, "Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert users["operator"] == f"{pod['runAsUser']}:{pod['runAsGroup']}"
    runtime_uid = Settings.from_env(env_of(operator_container(default_docs))).runtime_uid
    assert users["runtime"] == f"{runtime_uid}:{runtime_uid}"
