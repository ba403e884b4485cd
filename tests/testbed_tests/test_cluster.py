"""The test bed against its acceptance criteria, on a real API server (marker k8s).

KWOK nodes fake their pods' lives (stages); the process node really runs them.
"""

from __future__ import annotations

import secrets
import urllib.error
import urllib.request

import pytest
from kubernetes.client.exceptions import ApiException

from testbed.kwok import EXIT_CODE_ANNOTATION, FAIL_LABEL, MESSAGE_ANNOTATION
from testbed.processnode.config import PROCESS_NODE_TAINT
from testbed.procs import wait_until

pytestmark = pytest.mark.k8s
TIMEOUT = 90  # seconds for any single wait; a healthy test bed needs 1-10


def job(name: str, containers: list[dict], **pod_spec) -> dict:
    meta = pod_spec.pop("pod_meta", {})
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": meta,
                "spec": {"restartPolicy": "Never", "containers": containers, **pod_spec},
            },
        },
    }


ON_PROCESS_NODE = {
    "nodeSelector": {"kubernetes.io/hostname": "process-0"},
    "tolerations": [{"key": PROCESS_NODE_TAINT, "operator": "Exists", "effect": "NoSchedule"}],
}


def job_condition(batch, ns: str, name: str) -> str | None:
    """ "Complete" or "Failed" once the Job controller has decided, else None."""
    conds = batch.read_namespaced_job_status(name, ns).status.conditions or []
    done = [c.type for c in conds if c.type in ("Complete", "Failed") and c.status == "True"]
    return done[0] if done else None


def wait_job(batch, ns: str, name: str) -> str:
    result = {}

    def done() -> bool:
        result["c"] = job_condition(batch, ns, name)
        return result["c"] is not None

    wait_until(done, f"Job {ns}/{name} to finish", TIMEOUT)
    return result["c"]


def job_pod(core, ns: str, name: str):
    pods = core.list_namespaced_pod(ns, label_selector=f"job-name={name}").items
    assert len(pods) == 1, [p.metadata.name for p in pods]
    return pods[0]


def terminated(pod):
    return pod.status.container_statuses[0].state.terminated


def test_crd_cel_rule_rejects_invalid_object(k8s_api, k8s_namespace):
    from kubernetes import client, dynamic

    ext = client.ApiextensionsV1Api(k8s_api)
    group, plural = f"t{secrets.token_hex(3)}.testbed.qmodel.dev", "widgets"
    rule = {
        "rule": "self.minReplicas <= self.maxReplicas",
        "message": "minReplicas must not exceed maxReplicas",
    }
    schema = {
        "type": "object",
        "properties": {
            "spec": {
                "type": "object",
                "x-kubernetes-validations": [rule],
                "properties": {"minReplicas": {"type": "integer"}, "maxReplicas": {"type": "integer"}},
            }
        },
    }
    crd = {
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": plural, "singular": "widget", "kind": "Widget"},
            "versions": [
                {"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": schema}}
            ],
        },
    }
    ext.create_custom_resource_definition(crd)
    try:

        def established() -> bool:
            conds = ext.read_custom_resource_definition(crd["metadata"]["name"]).status.conditions or []
            return any(c.type == "Established" and c.status == "True" for c in conds)

        wait_until(established, "the CRD to be Established", TIMEOUT)
        widgets = dynamic.DynamicClient(k8s_api).resources.get(api_version=f"{group}/v1", kind="Widget")
        good = {"apiVersion": f"{group}/v1", "kind": "Widget", "metadata": {"name": "good"}}
        widgets.create(body={**good, "spec": {"minReplicas": 1, "maxReplicas": 2}}, namespace=k8s_namespace)
        bad = {**good, "metadata": {"name": "bad"}, "spec": {"minReplicas": 3, "maxReplicas": 2}}
        with pytest.raises(ApiException) as err:
            widgets.create(body=bad, namespace=k8s_namespace)
        assert err.value.status == 422
        assert "minReplicas must not exceed maxReplicas" in err.value.body
    finally:
        ext.delete_custom_resource_definition(crd["metadata"]["name"])


def test_kwok_gpu_job_completes_and_labelled_job_fails(core, batch, k8s_namespace):
    gpu = {"name": "q", "image": "qmodel-runtime", "resources": {"limits": {"nvidia.com/gpu": "1"}}}
    on_a100 = {"nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}}
    ok = job("ok", [gpu], pod_meta={"annotations": {MESSAGE_ANNOTATION: '{"passed": true}'}}, **on_a100)
    bad_meta = {
        "labels": {FAIL_LABEL: "true"},
        "annotations": {EXIT_CODE_ANNOTATION: "3", MESSAGE_ANNOTATION: "oom"},
    }
    bad = job("bad", [gpu], pod_meta=bad_meta, **on_a100)
    batch.create_namespaced_job(k8s_namespace, ok)
    batch.create_namespaced_job(k8s_namespace, bad)
    assert wait_job(batch, k8s_namespace, "ok") == "Complete"
    assert wait_job(batch, k8s_namespace, "bad") == "Failed"
    pod = job_pod(core, k8s_namespace, "ok")
    assert pod.spec.node_name.startswith("a100-")
    assert (terminated(pod).exit_code, terminated(pod).message) == (0, '{"passed": true}')
    pod = job_pod(core, k8s_namespace, "bad")
    assert pod.status.phase == "Failed"
    assert (terminated(pod).exit_code, terminated(pod).message) == (3, "oom")


def test_process_node_job_really_runs_python(core, batch, k8s_namespace, tmp_path):
    core.create_namespaced_secret(
        k8s_namespace, {"metadata": {"name": "creds"}, "stringData": {"key": "s3cr3t"}}
    )
    core.create_namespaced_config_map(
        k8s_namespace, {"metadata": {"name": "input"}, "data": {"input.json": "[1,2]"}}
    )
    script = (
        "import json, os, sys\n"
        "data = json.load(open('/etc/input/input.json'))\n"
        "open('/out/result.txt', 'w').write(f\"{os.environ['POD_IP']} {os.environ['KEY']} {sum(data)}\")\n"
        "open('/dev/termination-log', 'w').write(f'exit {sys.argv[1]}')\n"
        "sys.exit(int(sys.argv[1]))\n"
    )
    volumes = [
        {"name": "out", "hostPath": {"path": str(tmp_path), "type": "Directory"}},
        {"name": "input", "configMap": {"name": "input"}},
    ]
    for name, code in (("exit0", "0"), ("exit1", "1")):
        container = {
            "name": "main",
            "image": "ignored",
            "command": ["python", "-c", script, code],
            "env": [{"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "key"}}}],
            "volumeMounts": [
                {"name": "out", "mountPath": "/out"},
                {"name": "input", "mountPath": "/etc/input"},
            ],
        }
        batch.create_namespaced_job(k8s_namespace, job(name, [container], volumes=volumes, **ON_PROCESS_NODE))
    assert wait_job(batch, k8s_namespace, "exit0") == "Complete"
    assert wait_job(batch, k8s_namespace, "exit1") == "Failed"
    ok, bad = job_pod(core, k8s_namespace, "exit0"), job_pod(core, k8s_namespace, "exit1")
    assert (ok.status.phase, terminated(ok).exit_code, terminated(ok).message) == ("Succeeded", 0, "exit 0")
    assert (bad.status.phase, terminated(bad).exit_code, terminated(bad).message) == ("Failed", 1, "exit 1")
    assert ok.status.pod_ip != bad.status.pod_ip and ok.status.pod_ip.startswith("127.201.")
    # Both wrote the same file (hostPath); the one that ran last won, and both values are right.
    ip, key, total = (tmp_path / "result.txt").read_text().split()
    assert ip in (ok.status.pod_ip, bad.status.pod_ip) and (key, total) == ("s3cr3t", "3")


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def test_process_node_deployment_serves_http_and_ready_follows_probe(apps, core, k8s_namespace, tmp_path):
    labels = {"app": "web"}
    container = {
        "name": "web",
        "image": "ignored",
        "command": ["python", "-m", "http.server", "8080", "--bind", "$(MY_IP)", "--directory", "/srv"],
        "env": [{"name": "MY_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
        "ports": [{"name": "http", "containerPort": 8080}],
        "readinessProbe": {"httpGet": {"path": "/ready.txt", "port": "http"}, "periodSeconds": 1},
        "volumeMounts": [{"name": "srv", "mountPath": "/srv"}],
    }
    pod_spec = {
        "containers": [container],
        "volumes": [{"name": "srv", "hostPath": {"path": str(tmp_path), "type": "Directory"}}],
        "terminationGracePeriodSeconds": 5,
        **ON_PROCESS_NODE,
    }
    deploy = {
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }
    apps.create_namespaced_deployment(k8s_namespace, deploy)
    (tmp_path / "index.html").write_text("hello from the process node")

    def pod():
        pods = core.list_namespaced_pod(k8s_namespace, label_selector="app=web").items
        return pods[0] if pods and pods[0].status.pod_ip else None

    wait_until(lambda: pod() is not None, "the web pod's IP", TIMEOUT)
    url = f"http://{pod().status.pod_ip}:8080"
    wait_until(lambda: http_status(url + "/") == 200, f"{url} to answer", TIMEOUT)
    # Serving, but /ready.txt is 404: the readiness probe keeps the pod un-Ready.
    assert http_status(url + "/ready.txt") == 404
    ready = {c.type: c.status for c in pod().status.conditions}
    assert ready.get("Ready") != "True"
    (tmp_path / "ready.txt").write_text("ok")

    def available() -> bool:
        return (
            apps.read_namespaced_deployment_status("web", k8s_namespace).status.available_replicas or 0
        ) == 1

    wait_until(available, "the Deployment to become Available", TIMEOUT)
    assert urllib.request.urlopen(url + "/", timeout=5).read() == b"hello from the process node"
    apps.delete_namespaced_deployment("web", k8s_namespace)
    wait_until(lambda: http_status(url + "/") is None, "the server to be stopped", TIMEOUT)
    wait_until(lambda: pod() is None, "the pod to be deleted", TIMEOUT)


def test_deleting_owner_garbage_collects_children(apps, core, k8s_namespace):
    labels = {"app": "gc"}
    deploy = {
        "metadata": {"name": "gc"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [{"name": "c", "image": "x"}],
                    "nodeSelector": {"kubernetes.io/hostname": "cpu-0"},
                },
            },
        },
    }
    apps.create_namespaced_deployment(k8s_namespace, deploy)

    def ready_pods() -> int:
        pods = core.list_namespaced_pod(k8s_namespace, label_selector="app=gc").items
        return sum(1 for p in pods if p.status.phase == "Running")

    wait_until(lambda: ready_pods() == 2, "2 running KWOK pods", TIMEOUT)
    assert len(apps.list_namespaced_replica_set(k8s_namespace).items) == 1
    apps.delete_namespaced_deployment("gc", k8s_namespace, propagation_policy="Background")

    def all_gone() -> bool:
        rs = apps.list_namespaced_replica_set(k8s_namespace).items
        return not rs and not core.list_namespaced_pod(k8s_namespace, label_selector="app=gc").items

    wait_until(all_gone, "the garbage collector to remove the ReplicaSet and its pods", TIMEOUT)


def test_pod_wanting_more_gpus_than_any_node_stays_pending(core, k8s_namespace):
    pod = {
        "metadata": {"name": "greedy"},
        "spec": {
            "containers": [{"name": "c", "image": "x", "resources": {"limits": {"nvidia.com/gpu": "9"}}}]
        },
    }
    core.create_namespaced_pod(k8s_namespace, pod)

    def unschedulable():
        conds = core.read_namespaced_pod_status("greedy", k8s_namespace).status.conditions or []
        return next((c for c in conds if c.type == "PodScheduled" and c.reason == "Unschedulable"), None)

    wait_until(lambda: unschedulable() is not None, "the scheduler to give up on the pod", TIMEOUT)
    assert "Insufficient nvidia.com/gpu" in unschedulable().message
    status = core.read_namespaced_pod_status("greedy", k8s_namespace).status
    assert status.phase == "Pending" and not core.read_namespaced_pod("greedy", k8s_namespace).spec.node_name


def test_a_second_process_node_poses_as_a_gpu_node(k8s_cluster, core, batch, k8s_namespace):
    from testbed.paths import TestbedError
    from testbed.processnode.config import ProcessNodeConfig

    with pytest.raises(TestbedError, match="already used by 'process-0'"):
        k8s_cluster.start_process_node(ProcessNodeConfig(name="clash"))  # same default pod range
    node = ProcessNodeConfig(name="proc-gpu", pod_cidr="127.202.0.0/16", gpus=1, gpu_memory_mib=16384)
    k8s_cluster.start_process_node(node)
    try:
        container = {
            "name": "main",
            "image": "ignored",
            "command": [
                "python",
                "-c",
                "import os; open('/dev/termination-log', 'w').write(os.environ['POD_IP'])",
            ],
            "resources": {"limits": {"nvidia.com/gpu": "1"}},
        }
        spec = {
            "nodeSelector": {"nvidia.com/gpu.product": node.gpu_product},
            "tolerations": [{"key": PROCESS_NODE_TAINT, "operator": "Exists"}],
        }
        batch.create_namespaced_job(k8s_namespace, job("gpu", [container], **spec))
        assert wait_job(batch, k8s_namespace, "gpu") == "Complete"
        pod = job_pod(core, k8s_namespace, "gpu")
        assert pod.spec.node_name == "proc-gpu"
        assert terminated(pod).message == pod.status.pod_ip and pod.status.pod_ip.startswith("127.202.")
    finally:
        k8s_cluster.stop_process_node("proc-gpu")


def test_odd_pods_get_clear_errors_and_the_node_carries_on(core, k8s_namespace):
    # Bound directly (nodeName): the scheduler would hold back a pod whose PVC does not exist.
    base = {"restartPolicy": "Never", "nodeName": "process-0"}
    no_command = {"name": "c", "image": "qmodel-runtime", "args": ["serve"]}
    pvc = {
        "name": "c",
        "image": "x",
        "command": ["python", "-c", "pass"],
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
    }
    volumes = [{"name": "data", "persistentVolumeClaim": {"claimName": "nope"}}]
    core.create_namespaced_pod(
        k8s_namespace, {"metadata": {"name": "no-command"}, "spec": {**base, "containers": [no_command]}}
    )
    core.create_namespaced_pod(
        k8s_namespace,
        {"metadata": {"name": "pvc"}, "spec": {**base, "containers": [pvc], "volumes": volumes}},
    )

    def waiting(name: str):
        statuses = core.read_namespaced_pod_status(name, k8s_namespace).status.container_statuses or []
        return statuses[0].state.waiting if statuses and statuses[0].state.waiting else None

    def config_error(name: str, text: str) -> bool:
        # The node retries like the kubelet: an earlier, transient CreateContainerConfigError (say the
        # namespace's kube-root-ca.crt not yet published) gives way to the pod's own error.
        w = waiting(name)
        return w is not None and w.reason == "CreateContainerConfigError" and text in (w.message or "")

    expected = {
        "no-command": "has no command: the process node ignores images",
        "pvc": "persistentVolumeClaim",
    }
    for name, text in expected.items():
        wait_until(lambda n=name, t=text: config_error(n, t), f"{name} to report {text!r}", TIMEOUT)
