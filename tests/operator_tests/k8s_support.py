"""The real operator process against the test bed, and helpers to poll what it does.

The operator runs as ``python -m qmodel_operator`` in its own process group (as in its pod),
so a test can SIGKILL it mid-work and start it again. Nothing here fakes the API server:
the k8s fixtures come from tests/testbed.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from operator_tests.support import SMOLLM2

from qmodel_operator.revision import revision
from qmodel_operator.spec import QuantizedModelSpec
from testbed import procs

CRD = Path(__file__).resolve().parents[2] / "crds" / "quantizedmodel.yaml"
GROUP, VERSION, PLURAL = "qmodel.dev", "v1alpha1", "quantizedmodels"
MESSAGE_ANNOTATION = "testbed.qmodel.dev/termination-message"
FAIL_LABEL = "testbed.qmodel.dev/fail"
RUN_SECONDS_ANNOTATION = "testbed.qmodel.dev/run-seconds"


class Operator:
    """``python -m qmodel_operator`` as a child process with its own ports and log."""

    def __init__(self, kubeconfig: Path, log_dir: Path) -> None:
        self.kubeconfig = kubeconfig
        self.log_dir = log_dir
        self.proc: procs.Proc | None = None
        self.health_port = 0
        self.metrics_port = 0

    def start(self, timeout: float = 60.0) -> None:
        self.health_port, self.metrics_port = procs.free_port(), procs.free_port()
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("QMODEL_OPERATOR_")},
            "KUBECONFIG": str(self.kubeconfig),
            "QMODEL_OPERATOR_RUNTIME_IMAGE": "qmodel-runtime:test",
            "QMODEL_OPERATOR_HEALTH_PORT": str(self.health_port),
            "QMODEL_OPERATOR_METRICS_PORT": str(self.metrics_port),
            # One retry of a failing clean-up Job keeps the give-up test short (default 2).
            "QMODEL_OPERATOR_CLEANUP_BACKOFF_LIMIT": "1",
        }
        self.proc = procs.spawn(
            "qmodel-operator", [sys.executable, "-m", "qmodel_operator"], self.log_dir, env
        )
        procs.wait_until(self._healthy, "the operator's liveness endpoint", timeout, watch=[self.proc])

    def _healthy(self) -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2) as resp:
            return resp.status == 200

    def kill(self) -> None:
        """SIGKILL, as a node failure or an OOM kill would: no clean-up runs."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.popen.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None:
            procs.stop(self.proc)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as resp:
            return resp.read().decode()

    def log_tail(self, lines: int = 60) -> str:
        return self.proc.log_tail(lines) if self.proc else "(not started)"


def install_crd(api: client.ApiClient) -> None:
    import yaml

    ext = client.ApiextensionsV1Api(api)
    body = yaml.safe_load(CRD.read_text())
    try:
        ext.create_custom_resource_definition(body)
    except ApiException as e:
        if e.status != 409:
            raise
        current = ext.read_custom_resource_definition(body["metadata"]["name"])
        body["metadata"]["resourceVersion"] = current.metadata.resource_version
        ext.replace_custom_resource_definition(body["metadata"]["name"], body)

    def established() -> bool:
        crd = ext.read_custom_resource_definition(body["metadata"]["name"])
        return any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or [])

    procs.wait_until(established, "the QuantizedModel CRD to be established", 30)


def wait_for(
    check: Callable[[], Any], what: str, timeout: float = 60.0, operator: Operator | None = None
) -> Any:
    """Poll ``check`` until it returns something truthy; return it. Fails with the operator's log."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            tail = f"\n--- operator log:\n{operator.log_tail()}" if operator else ""
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}{tail}")
        time.sleep(0.2)


def result_for(spec: dict[str, Any], name: str, baseline: float, quantized: float, **extra: Any) -> str:
    """The JSON result a quantize Job of this spec would leave (docs/contracts.md)."""
    rev = revision(QuantizedModelSpec.model_validate(spec))
    return json.dumps(
        {
            "revision": rev,
            "baselinePerplexity": baseline,
            "quantizedPerplexity": quantized,
            "increasePercent": (quantized / baseline - 1) * 100,
            "passed": quantized / baseline - 1 <= 0.02,
            "artifact": {
                "uri": f"s3://artifacts/qmodel/{name}/{rev}/",
                "manifestDigest": "sha256:" + "0" * 64,
                "sizeBytes": 112622976,
                "compressionRatio": 3.2,
            },
            "timings": {"quantizeSeconds": 100.0, "evaluateSeconds": 50.0, "totalSeconds": 153.0},
            "model": SMOLLM2,
            **extra,
        }
    )


def with_result(
    spec: dict[str, Any], name: str, baseline: float = 14.09, quantized: float = 14.30, **kw: Any
):
    """The spec, its quantize Job's pod annotated so the KWOK node reports this result."""
    annotations = {MESSAGE_ANNOTATION: result_for(spec, name, baseline, quantized, **kw.pop("extra", {}))}
    annotations.update(kw.pop("annotations", {}))
    jobs = {**spec.get("jobs", {}), "podAnnotations": annotations, **kw}
    return {**spec, "jobs": jobs}


class Models:
    """QuantizedModels and their children in one namespace."""

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self.ns = namespace
        self.custom = client.CustomObjectsApi(api)
        self.batch = client.BatchV1Api(api)
        self.apps = client.AppsV1Api(api)
        self.core = client.CoreV1Api(api)

    def create(self, name: str, spec: dict[str, Any], dry_run: bool = False) -> dict[str, Any]:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "QuantizedModel",
            "metadata": {"name": name},
            "spec": spec,
        }
        extra = {"dry_run": "All"} if dry_run else {}
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, body, **extra)

    def get(self, name: str) -> dict[str, Any] | None:
        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def patch_spec(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, self.ns, PLURAL, name, {"spec": spec}
        )

    def delete(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name)

    def status(self, name: str) -> dict[str, Any]:
        return (self.get(name) or {}).get("status") or {}

    def condition(self, name: str, type_: str) -> dict[str, Any]:
        return next((c for c in self.status(name).get("conditions", []) if c["type"] == type_), {})

    def phase_is(self, name: str, phase: str) -> Callable[[], bool]:
        return lambda: self.status(name).get("phase") == phase

    def jobs(self, component: str = "quantize") -> list[Any]:
        selector = f"app.kubernetes.io/component={component}"
        return self.batch.list_namespaced_job(self.ns, label_selector=selector).items

    def deployments(self) -> list[Any]:
        return self.apps.list_namespaced_deployment(
            self.ns, label_selector="app.kubernetes.io/component=server"
        ).items

    def services(self) -> list[Any]:
        return self.core.list_namespaced_service(
            self.ns, label_selector="app.kubernetes.io/component=server"
        ).items

    def pods(self, selector: str) -> list[Any]:
        return self.core.list_namespaced_pod(self.ns, label_selector=selector).items

    def events(self, name: str) -> list[Any]:
        selector = f"involvedObject.kind=QuantizedModel,involvedObject.name={name}"
        return self.core.list_namespaced_event(self.ns, field_selector=selector).items

    def event_reasons(self, name: str) -> set[str]:
        return {e.reason for e in self.events(name)}
