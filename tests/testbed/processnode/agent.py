"""The process node agent: registers its Node, keeps its lease, and runs the pods bound to it."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

from testbed.nodes import GPU_RESOURCE, NODE_KIND_LABEL, gpu_labels
from testbed.processnode.config import PROCESS_NODE_TAINT, ProcessNodeConfig
from testbed.processnode.pod import SANDBOX, NodeContext, PodWorker
from testbed.processnode.status import now

log = logging.getLogger("testbed.processnode")


def build_node(cfg: ProcessNodeConfig) -> dict:
    """The Node object (pure): labels, GPU-like capacity when asked, the process-node and GPU taints."""
    resources = {"cpu": cfg.cpu, "memory": cfg.memory, "pods": cfg.pods}
    if cfg.gpus:
        resources[GPU_RESOURCE] = str(cfg.gpus)
    labels = {
        "kubernetes.io/hostname": cfg.name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        NODE_KIND_LABEL: "process",
        **gpu_labels(cfg.gpus, cfg.gpu_product, cfg.gpu_memory_mib),
        **cfg.labels,
    }
    taints = [{"key": PROCESS_NODE_TAINT, "value": "true", "effect": "NoSchedule"}] if cfg.taint else []
    if cfg.gpus and cfg.gpu_taint:
        taints.append({"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"})
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": cfg.name, "labels": labels},
        "spec": {"taints": taints},
        "status": {"capacity": resources, "allocatable": dict(resources)},
    }


def node_status(cfg: ProcessNodeConfig, host_ip: str, since: str) -> dict:
    """Status as a healthy kubelet posts it; ``since`` is when the node came up (transition time)."""
    t = now()
    resources = build_node(cfg)["status"]["capacity"]

    def cond(ctype: str, status: str, reason: str) -> dict:
        return {
            "type": ctype,
            "status": status,
            "reason": reason,
            "lastHeartbeatTime": t,
            "lastTransitionTime": since,
        }

    return {
        "capacity": resources,
        "allocatable": dict(resources),
        # The node lifecycle controller reads all four; a missing one is reported as Unknown.
        "conditions": [
            cond("Ready", "True", "KubeletReady"),
            cond("MemoryPressure", "False", "KubeletHasSufficientMemory"),
            cond("DiskPressure", "False", "KubeletHasNoDiskPressure"),
            cond("PIDPressure", "False", "KubeletHasSufficientPID"),
        ],
        "addresses": [{"type": "InternalIP", "address": host_ip}, {"type": "Hostname", "address": cfg.name}],
        "nodeInfo": {
            "kubeletVersion": "v0.0.0-testbed-processnode",
            "operatingSystem": "linux",
            "architecture": "amd64",
            "containerRuntimeVersion": "process://testbed",
            "kernelVersion": "",
            "osImage": "",
            "machineID": "",
            "systemUUID": "",
            "bootID": "",
            "kubeProxyVersion": "",
        },
    }


def detect_isolation(wanted: str) -> str:
    """ "mount" when a private mount namespace with an overlay root works here, else "none"."""
    if wanted != "auto":
        return wanted
    if os.geteuid() != 0:
        return "none"
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "true"], capture_output=True, check=False
    )
    return "mount" if probe.returncode == 0 else "none"


class Agent:
    def __init__(self, api_client, cfg: ProcessNodeConfig, workdir: Path):
        from kubernetes import client

        self.cfg, self.api_client = cfg, api_client
        self.core = client.CoreV1Api(api_client)
        self.coord = client.CoordinationV1Api(api_client)
        port = urllib.parse.urlparse(api_client.configuration.host).port or 443
        workdir.mkdir(parents=True, exist_ok=True)
        self.ctx = NodeContext(
            cfg=cfg, core=self.core, workdir=workdir, isolation=detect_isolation(cfg.isolation), api_port=port
        )
        self.workers: dict[str, PodWorker] = {}
        self._selector = f"spec.nodeName={cfg.name}"
        self.since = now()
        self.stop = threading.Event()
        self._ips = (str(ip) for ip in ipaddress.ip_network(cfg.pod_cidr).hosts())
        next(self._ips)  # .0.1 is kept for the node itself
        log.info("process node %s: isolation=%s, sandbox %s", cfg.name, self.ctx.isolation, SANDBOX)

    def register(self) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self.core.create_node(build_node(self.cfg))
        except ApiException as exc:
            if exc.status != 409:
                raise
            self.core.patch_node(self.cfg.name, build_node(self.cfg))
        self._post_status()

    def _post_status(self) -> None:
        self.core.patch_node_status(
            self.cfg.name, {"status": node_status(self.cfg, self.ctx.host_ip, self.since)}
        )

    def heartbeat_forever(self) -> None:
        """Renew the node Lease and post Ready: the node lifecycle controller taints a silent node."""
        while not self.stop.wait(self.cfg.heartbeat_seconds):
            try:
                self._renew_lease()
                # Every beat, not only on change: once marked Unknown, only a posted Ready brings it back.
                self._post_status()
            except Exception:  # the API server may be restarting; try again next beat
                log.exception("heartbeat failed")

    def _renew_lease(self) -> None:
        from kubernetes.client.exceptions import ApiException

        # MicroTime wants microseconds; a patch body is sent as written (a create body is re-serialized).
        renew = {"spec": {"renewTime": time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())}}
        try:
            self.coord.patch_namespaced_lease(self.cfg.name, "kube-node-lease", renew)
        except ApiException as exc:
            if exc.status != 404:
                raise
            body = {"metadata": {"name": self.cfg.name}, "spec": {"holderIdentity": self.cfg.name}}
            body["spec"]["leaseDurationSeconds"] = 40
            self.coord.create_namespaced_lease("kube-node-lease", body)
            self.coord.patch_namespaced_lease(self.cfg.name, "kube-node-lease", renew)

    def watch_forever(self) -> None:
        """List, then watch, the pods bound to this node; one worker thread per pod."""
        from kubernetes.client.exceptions import ApiException

        version = ""
        while not self.stop.is_set():
            try:
                version = version or self._list()
                version = self._watch(version)
            except ApiError:
                version = ""
            except ApiException as exc:
                version = ""  # 410 Gone (too old a resourceVersion) or worse: list afresh
                if exc.status != 410:
                    log.warning("watch failed (%s); listing again", exc.reason)
                    self.stop.wait(1.0)
            except Exception:  # keep the node alive through API server hiccups
                log.exception("watch failed; listing again")
                version = ""
                self.stop.wait(1.0)

    def _list(self) -> str:
        resp = self.core.list_pod_for_all_namespaces(field_selector=self._selector, _preload_content=False)
        data = json.loads(resp.data)
        for pod in data["items"]:
            self.on_pod("ADDED", pod)
        return data["metadata"]["resourceVersion"]

    def _watch(self, version: str) -> str:
        from kubernetes import watch

        w = watch.Watch()
        stream = w.stream(
            self.core.list_pod_for_all_namespaces,
            field_selector=self._selector,
            resource_version=version,
            timeout_seconds=60,
        )
        for event in stream:
            if event["type"] == "ERROR":
                raise ApiError(event["raw_object"])
            self.on_pod(event["type"], event["raw_object"])
            if self.stop.is_set():
                w.stop()
        return w.resource_version

    def on_pod(self, event: str, pod: dict) -> None:
        uid = pod["metadata"]["uid"]
        worker = self.workers.get(uid)
        if event == "DELETED":
            if worker is not None:
                worker.update(pod)
                worker.deleted.set()
                del self.workers[uid]
        elif worker is None:  # a finished worker stays in the map, so a pod never runs twice
            worker = PodWorker(self.ctx, pod, next(self._ips))
            self.workers[uid] = worker
            worker.start()
        else:
            worker.update(pod)

    def shutdown(self) -> None:
        self.stop.set()
        for w in self.workers.values():
            w.shutdown.set()
        for w in self.workers.values():
            w.join(timeout=20)
        shutil.rmtree(self.ctx.workdir / "fs", ignore_errors=True)


class ApiError(Exception):
    """An ERROR event in a watch stream (e.g. 410 Gone); the watch lists again."""


def main_loop(agent: Agent) -> None:
    agent.register()
    threads = [
        threading.Thread(target=agent.heartbeat_forever, daemon=True, name="heartbeat"),
        threading.Thread(target=agent.watch_forever, daemon=True, name="watch"),
    ]
    for t in threads:
        t.start()
    agent.stop.wait()
    agent.shutdown()
    log.info("process node %s stopped", agent.cfg.name)
    sys.stdout.flush()
