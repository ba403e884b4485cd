"""The demo's stack on the local test bed, shared by ``make demo`` (``e2e.demo``) and the e2e tests.

    stack = Stack.start(StackConfig(workdir=...))   # cluster, S3 server, bundled model uploaded
    stack.install_chart()                            # helm upgrade --install charts/qmodel
    stack.apply("examples/smollm2-135m.yaml")        # kubectl apply -n demo
    stack.stop()                                     # only the processes it started

The cluster has no simulated (KWOK) nodes: a pod scheduled there would "run" without running
anything. Its one node is a process node posing as a GPU node (GFD labels, nvidia.com/gpu
capacity, the nvidia.com/gpu taint), so the operator, the quantize Jobs and the runtime pods
all really run, as local processes, with the venv as their image. Traffic stays on loopback.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from testbed import cluster as tb_cluster
from testbed import paths
from testbed.processnode.config import ProcessNodeConfig
from testbed.procs import Proc, free_port, spawn, stop, wait_until
from testbed.s3server import ACCESS_KEY, REGION, SECRET_KEY

log = logging.getLogger("qmodel.demo")
REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "qmodel"
EXAMPLES = REPO / "examples"
S3_SCRIPT = REPO / "tests" / "testbed" / "s3server.py"
MODEL_PREFIX = "smollm2-135m/"  # s3://models/smollm2-135m/, the examples' source.uri
BUCKETS = ("models", "artifacts")
STATE_FILE = "demo-state.json"


def gpu_node() -> ProcessNodeConfig:
    """A CPU posing as a 2-GPU node: one GPU for a quantize Job, one for a runtime pod at once.

    16 GiB per "GPU" as GFD would report a T4/V100-16GB; serving sizes its KV cache from it, so
    the examples cap maxBatchSize to keep the CPU's cache small.
    """
    return ProcessNodeConfig(
        name="gpu-cpu-0",
        pod_cidr="127.202.0.0/16",  # apart from the default process node's, should both run
        taint=False,
        gpu_taint=True,
        gpus=2,
        gpu_product="TESTBED-CPU-AS-GPU",
        gpu_memory_mib=16384,
    )


@dataclass(frozen=True)
class StackConfig:
    workdir: Path
    namespace: str = "demo"
    operator_namespace: str = "qmodel-system"
    release: str = "qmodel"
    # False for `make demo`: everything outlives the command until `make demo-down`.
    die_with_parent: bool = True
    node: ProcessNodeConfig = field(default_factory=gpu_node)


@dataclass
class Stack:
    config: StackConfig
    cluster: tb_cluster.Cluster
    s3: Proc
    s3_port: int
    timings: dict[str, float] = field(default_factory=dict)

    # --- start, attach, stop ----------------------------------------------------------------

    @classmethod
    def start(cls, config: StackConfig) -> Stack:
        config.workdir.mkdir(parents=True, exist_ok=True)
        # As the runtime image sets it: nothing in a pod may reach for the Hugging Face Hub.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        t0 = time.monotonic()
        cluster = tb_cluster.start(
            tb_cluster.ClusterConfig(
                node_sets=(),
                process_nodes=(config.node,),
                workdir=config.workdir,
                die_with_parent=config.die_with_parent,
            )
        )
        stack = cls(config, cluster, s3=None, s3_port=0)  # type: ignore[arg-type]
        stack.timings["cluster"] = time.monotonic() - t0
        try:
            stack._start_s3()
            stack._save()
        except BaseException:
            stack.stop(keep_workdir=True)
            raise
        return stack

    @classmethod
    def attach(cls, workdir: Path) -> Stack | None:
        """The stack a previous `make demo` left running in ``workdir``, or None."""
        state_file = workdir / STATE_FILE
        if not state_file.exists():
            return None
        state = json.loads(state_file.read_text())
        cluster = tb_cluster.attach(workdir / "admin.kubeconfig")
        s3 = Proc(
            name="s3", argv=state["s3"]["argv"], log_path=Path(state["s3"]["log"]), pid=state["s3"]["pid"]
        )
        config = StackConfig(workdir=workdir, die_with_parent=False)
        return cls(config, cluster, s3, state["s3"]["port"])

    def alive(self) -> bool:
        return self.s3.alive() and all(p.alive() for p in self.cluster.procs.values())

    def stop(self, keep_workdir: bool = False) -> None:
        if self.s3 is not None:
            stop(self.s3)
        self.cluster.stop(keep_workdir=keep_workdir)
        (self.config.workdir / STATE_FILE).unlink(missing_ok=True)

    def _save(self) -> None:
        s3 = {"pid": self.s3.pid, "argv": self.s3.argv, "log": str(self.s3.log_path), "port": self.s3_port}
        (self.config.workdir / STATE_FILE).write_text(json.dumps({"s3": s3}, indent=1))

    # --- object storage ---------------------------------------------------------------------

    def _start_s3(self) -> None:
        """versitygw on loopback through tests/testbed/s3server.py (it makes the buckets, then says so)."""
        self.s3_port = free_port()
        root = self.config.workdir / "s3"
        argv = [sys.executable, str(S3_SCRIPT), "--root", str(root), "--port", str(self.s3_port)]
        argv += [arg for bucket in BUCKETS for arg in ("--bucket", bucket)]
        self.s3 = spawn("s3", argv, self.cluster.log_dir, die_with_parent=self.config.die_with_parent)
        wait_until(
            lambda: "AWS_SECRET_ACCESS_KEY" in self.s3.log_path.read_text(),
            "the S3 server and its buckets",
            60,
            watch=[self.s3],
        )

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def s3_env(self) -> dict[str, str]:
        """The AWS_* variables the chart's Secret gives the pods (for clients outside the cluster)."""
        return {
            "AWS_ENDPOINT_URL": self.s3_endpoint,
            "AWS_REGION": REGION,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        }

    def upload_model(self, folder: Path) -> int:
        """The source model to s3://models/smollm2-135m/ (files already there with the same size
        are skipped, so a second `make demo` does not send 0.5 GB again); -> bytes sent."""
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=self.s3_endpoint,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
        )
        listed = client.list_objects_v2(Bucket="models", Prefix=MODEL_PREFIX).get("Contents", [])
        present = {o["Key"]: o["Size"] for o in listed}
        t0, sent = time.monotonic(), 0
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            key = MODEL_PREFIX + path.relative_to(folder).as_posix()
            if present.get(key) == path.stat().st_size:
                continue
            client.upload_file(str(path), "models", key)
            sent += path.stat().st_size
            log.info("uploaded s3://models/%s (%.1f MiB)", key, path.stat().st_size / 2**20)
        self.timings["upload"] = time.monotonic() - t0
        return sent

    # --- kubectl and helm -------------------------------------------------------------------

    def kubectl(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        out = self.cluster.kubectl(*args, check=False, timeout=timeout)
        if check and out.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed:\n{out.stderr}")
        return out.stdout

    def helm(self, *args: str, timeout: float = 600) -> str:
        argv = [str(paths.binary("helm")), f"--kubeconfig={self.cluster.kubeconfig}", *args]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"helm {' '.join(args)} failed:\n{out.stderr}\n{self.operator_log_tail()}")
        return out.stdout

    def ensure_namespace(self, name: str) -> None:
        if self.kubectl("get", "namespace", name, "--ignore-not-found", "-o", "name").strip():
            return
        self.kubectl("create", "namespace", name)
        # Pods are refused until the namespace's default ServiceAccount exists (admission).
        wait_until(
            lambda: bool(
                self.kubectl("get", "sa", "default", "-n", name, "--ignore-not-found", "-o", "name")
            ),
            f"ServiceAccount {name}/default",
            60,
        )

    def chart_values(self) -> list[str]:
        """helm arguments: examples/testbed-values.yaml plus what only this run knows."""
        dynamic = {
            "s3.endpoint": self.s3_endpoint,
            "s3.accessKeyId": ACCESS_KEY,
            "s3.secretAccessKey": SECRET_KEY,
            # Pods share the host's network on the process node: ports nothing else holds.
            "operator.healthPort": free_port(),
            "metrics.port": free_port(),
        }
        args = ["--values", str(EXAMPLES / "testbed-values.yaml")]
        for key, value in dynamic.items():
            args += ["--set-json", f"{key}={json.dumps(value)}"]
        return args

    def install_chart(self, chart: Path = CHART, extra: tuple[str, ...] = ()) -> str:
        """`helm upgrade --install` into the operator's namespace; waits for the operator to be ready."""
        cfg = self.config
        self.ensure_namespace(cfg.namespace)  # its Role and S3 Secret are installed into it
        t0 = time.monotonic()
        out = self.helm(
            "upgrade", "--install", cfg.release, str(chart),
            "--namespace", cfg.operator_namespace, "--create-namespace",
            *self.chart_values(), *extra,
            "--wait", "--timeout", "5m",
        )  # fmt: skip
        # Ready, not only created: the operator pod has logged in with its ServiceAccount token.
        deployment = f"deployment/{self.fullname}"
        self.kubectl(
            "rollout", "status", deployment, "-n", cfg.operator_namespace, "--timeout=300s", timeout=320
        )
        self.timings["helm"] = time.monotonic() - t0
        return out

    @property
    def fullname(self) -> str:
        """The chart's object names (its fullname helper): the release name when it contains "qmodel"."""
        release = self.config.release
        return release if "qmodel" in release else f"{release}-qmodel"

    def apply(self, manifest: Path) -> None:
        self.kubectl("apply", "-n", self.config.namespace, "-f", str(manifest))

    # --- reading the cluster ----------------------------------------------------------------

    def model(self, name: str) -> dict[str, Any]:
        text = self.kubectl(
            "get", "qm", name, "-n", self.config.namespace, "-o", "json", "--ignore-not-found"
        )
        return json.loads(text) if text.strip() else {}

    def pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        text = self.kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "json")
        return json.loads(text)["items"]

    def operator_pod(self) -> dict[str, Any]:
        selector = f"app.kubernetes.io/instance={self.config.release},app.kubernetes.io/component=operator"
        pods = self.pods(self.config.operator_namespace, selector)
        running = [p for p in pods if p["status"].get("phase") == "Running"]
        if not running:
            raise RuntimeError(f"no running operator pod in {self.config.operator_namespace}")
        return running[0]

    def operator_log(self) -> str:
        pod = self.operator_pod()["metadata"]["name"]
        return self.cluster.pod_log(self.config.operator_namespace, pod, "operator")

    def operator_log_tail(self, lines: int = 40) -> str:
        try:
            return "--- operator log:\n" + "\n".join(self.operator_log().splitlines()[-lines:])
        except (RuntimeError, OSError) as exc:
            return f"(no operator log: {exc})"

    def server_pod(self, model: str) -> dict[str, Any] | None:
        """A ready runtime pod of ``model`` (there is no kube-proxy: clients use its pod IP)."""
        for pod in self.pods(
            self.config.namespace, f"qmodel.dev/model={model},app.kubernetes.io/component=server"
        ):
            ready = any(
                c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", [])
            )
            if ready and pod["status"].get("podIP"):
                return pod
        return None


def load_manifest(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())
