"""Start and stop a real Kubernetes control plane on loopback, with KWOK and process nodes.

    cluster = start(ClusterConfig())       # ~10-20 s warm; binaries from install.sh
    client = cluster.api_client()          # kubernetes.client.ApiClient, admin (token auth)
    cluster.stop()                         # stops only the PIDs it started

Every port is picked free on 127.0.0.1 per run, so two runs never collide; every file (etcd
data, certificates, logs, the kubeconfig) lives in one work dir, kept when asked to (failed
tests) so the logs can be read.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import ssl
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from testbed import kwok, paths
from testbed.nodes import DEFAULT_NODE_SETS, NodeSet, build_nodes
from testbed.paths import TestbedError
from testbed.processnode.config import ProcessNodeConfig
from testbed.procs import Proc, free_port, spawn, stop, wait_until

log = logging.getLogger("testbed")
TESTS_DIR = paths.HERE.parent
# ClusterIPs are allocated from it, but nothing ever connects to one. A /16: the scale test
# has 500 Services (a /24 ran out at 254).
SERVICE_CIDR = "10.0.0.0/16"


@dataclass(frozen=True)
class ClusterConfig:
    node_sets: tuple[NodeSet, ...] = DEFAULT_NODE_SETS
    process_nodes: tuple[ProcessNodeConfig, ...] = (ProcessNodeConfig(),)
    workdir: Path | None = None  # None: a fresh temp dir
    timeout: float = 120.0  # for each readiness wait
    # Controllers' client rate limits: the defaults (20 qps) make a 500-object test crawl.
    controller_qps: int = 200
    # Stop every process when the Python process that started them dies (tests); False for
    # `python -m testbed up`, whose cluster outlives the command.
    die_with_parent: bool = True


@dataclass
class Cluster:
    config: ClusterConfig
    workdir: Path
    server: str = ""
    token: str = ""
    procs: dict[str, Proc] = field(default_factory=dict)
    process_nodes: list[ProcessNodeConfig] = field(default_factory=list)

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "admin.kubeconfig"

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    @property
    def ca_file(self) -> Path:
        return self.workdir / "pki" / "apiserver.crt"

    def api_client(self):
        """A new kubernetes.client.ApiClient for the admin user."""
        from kubernetes import config as kconfig

        return kconfig.new_client_from_config(config_file=str(self.kubeconfig))

    def kubectl(self, *args: str, timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(paths.binary("kubectl")), f"--kubeconfig={self.kubeconfig}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    def add_nodes(self, node_sets: tuple[NodeSet, ...], wait: bool = True) -> list[str]:
        """Create KWOK nodes (e.g. 100 for a scale test); wait until KWOK reports them Ready."""
        from kubernetes import client

        core = client.CoreV1Api(self.api_client())
        manifests = build_nodes(node_sets)
        for node in manifests:
            core.create_node(node)
        names = [n["metadata"]["name"] for n in manifests]
        if wait:
            wait_until(
                lambda: _nodes_ready(core, names),
                f"{len(names)} KWOK nodes Ready",
                self.config.timeout,
                watch=[self.procs["kwok"]],
            )
        return names

    def start_process_node(self, node: ProcessNodeConfig, wait: bool = True) -> Proc:
        """Start a process node agent (a subprocess) that registers ``node.name`` and runs its pods."""
        if f"node-{node.name}" in self.procs:
            raise TestbedError(f"process node {node.name!r} already runs in this cluster")
        taken = {n.pod_cidr: n.name for n in self.process_nodes}
        if node.pod_cidr in taken:
            raise TestbedError(
                f"process node {node.name!r}: pod_cidr {node.pod_cidr} is already used by "
                f"{taken[node.pod_cidr]!r}; give each process node its own loopback range, "
                "e.g. pod_cidr='127.202.0.0/16'"
            )
        argv = [
            sys.executable,
            "-m",
            "testbed.processnode",
            f"--kubeconfig={self.kubeconfig}",
            f"--config={json.dumps(node.to_json())}",
            f"--workdir={self.workdir / 'pods' / node.name}",
        ]
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")])),
        }
        proc = spawn(
            f"node-{node.name}", argv, self.log_dir, env=env, die_with_parent=self.config.die_with_parent
        )
        self.procs[proc.name] = proc
        self.process_nodes.append(node)
        self._save_state()
        if wait:
            from kubernetes import client

            core = client.CoreV1Api(self.api_client())
            wait_until(
                lambda: _nodes_ready(core, [node.name]),
                f"process node {node.name} Ready",
                self.config.timeout,
                watch=[proc],
            )
        return proc

    def stop_process_node(self, name: str) -> None:
        """Stop a process node's agent (it kills its pods) and remove its Node object."""
        from kubernetes import client

        stop(self.procs.pop(f"node-{name}"), grace=15.0)
        self.process_nodes = [n for n in self.process_nodes if n.name != name]
        self._save_state()
        client.CoreV1Api(self.api_client()).delete_node(name)

    def pod_log(self, namespace: str, pod: str, container: str) -> str:
        """A process-node container's output (there is no kubelet API, so no ``kubectl logs``)."""
        found = sorted((self.workdir / "pods").glob(f"*/{namespace}_{pod}_*/{container}.log"))
        if not found:
            raise TestbedError(f"no log for {namespace}/{pod} container {container} on a process node")
        return found[-1].read_text(errors="replace")

    def logs(self, lines: int = 30) -> str:
        return "\n".join(f"--- {p.name} ({p.log_path}):\n{p.log_tail(lines)}" for p in self.procs.values())

    def stop(self, keep_workdir: bool = False) -> None:
        """Stop every process this cluster started, newest first (process nodes kill their pods)."""
        for name in reversed(list(self.procs)):
            stop(self.procs[name], grace=15.0)
        self.procs.clear()
        if keep_workdir:
            shutil.rmtree(self.workdir / "etcd", ignore_errors=True)
            log.warning("test bed logs kept in %s", self.log_dir)
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _save_state(self) -> None:
        state = {
            "workdir": str(self.workdir),
            "kubeconfig": str(self.kubeconfig),
            "server": self.server,
            "process_nodes": [n.to_json() for n in self.process_nodes],
            "procs": [
                {"name": p.name, "pid": p.pid, "argv": p.argv, "log": str(p.log_path)}
                for p in self.procs.values()
            ],
        }
        (self.workdir / "state.json").write_text(json.dumps(state, indent=1))


def attach(kubeconfig: Path) -> Cluster:
    """The cluster that ``python -m testbed up`` started, from the state file beside its kubeconfig."""
    state_file = kubeconfig.parent / "state.json"
    if not state_file.exists():
        raise TestbedError(f"{state_file} not found: is {kubeconfig} from `python -m testbed up`?")
    state = json.loads(state_file.read_text())
    cluster = Cluster(
        config=ClusterConfig(workdir=Path(state["workdir"])),
        workdir=Path(state["workdir"]),
        server=state["server"],
    )
    cluster.process_nodes = [ProcessNodeConfig.from_json(n) for n in state.get("process_nodes", [])]
    for p in state["procs"]:
        cluster.procs[p["name"]] = Proc(name=p["name"], argv=p["argv"], log_path=Path(p["log"]), pid=p["pid"])
    return cluster


def start(config: ClusterConfig = ClusterConfig()) -> Cluster:
    """Bring up etcd, the API server, controllers, scheduler, KWOK (+ nodes) and process nodes."""
    workdir = Path(config.workdir or tempfile.mkdtemp(prefix="qmodel-testbed-"))
    cluster = Cluster(config=config, workdir=workdir, token=secrets.token_hex(16))
    cluster.log_dir.mkdir(parents=True, exist_ok=True)
    try:
        _start_control_plane(cluster)
        cluster.add_nodes(config.node_sets)
        for node in config.process_nodes:
            cluster.start_process_node(node)
    except BaseException:
        cluster.stop(keep_workdir=True)
        raise
    log.info("test bed up: %s (kubeconfig %s)", cluster.server, cluster.kubeconfig)
    return cluster


def _start_control_plane(cluster: Cluster) -> None:
    cfg, d = cluster.config, cluster.workdir
    _write_keys(d, cluster.token)
    etcd_port, etcd_peer, api_port = free_port(), free_port(), free_port()
    cluster.server = f"https://127.0.0.1:{api_port}"
    etcd = _spawn(cluster, "etcd", etcd_argv(d, etcd_port, etcd_peer))
    wait_until(lambda: _http_ok(f"http://127.0.0.1:{etcd_port}/health"), "etcd", cfg.timeout, [etcd])
    api = _spawn(cluster, "kube-apiserver", apiserver_argv(d, etcd_port, api_port))
    wait_until(lambda: _apiserver_ready(cluster), "kube-apiserver /readyz", cfg.timeout, [etcd, api])
    _write_kubeconfig(cluster)
    kcm_port, sched_port, kwok_port = free_port(), free_port(), free_port()
    kcm = _spawn(cluster, "kube-controller-manager", controller_manager_argv(cluster, kcm_port))
    sched = _spawn(cluster, "kube-scheduler", scheduler_argv(cluster, sched_port))
    stages = kwok.write_config(d / "kwok-stages.yaml")
    kw = _spawn(cluster, "kwok", kwok.argv(paths.binary("kwok"), cluster.kubeconfig, stages, kwok_port))
    everything = [etcd, api, kcm, sched, kw]
    for name, port in (("kube-controller-manager", kcm_port), ("kube-scheduler", sched_port)):
        wait_until(
            lambda p=port: _http_ok(f"https://127.0.0.1:{p}/healthz"),
            f"{name} /healthz",
            cfg.timeout,
            everything,
        )
    wait_until(
        lambda: _http_ok(f"http://127.0.0.1:{kwok_port}/healthz"), "kwok /healthz", cfg.timeout, everything
    )
    # Pods are refused until the namespace's "default" ServiceAccount exists (admission).
    wait_until(
        lambda: _default_sa_exists(cluster, "default"), "the default ServiceAccount", cfg.timeout, everything
    )


def _spawn(cluster: Cluster, name: str, argv: list[str]) -> Proc:
    proc = spawn(name, argv, cluster.log_dir, die_with_parent=cluster.config.die_with_parent)
    cluster.procs[name] = proc
    cluster._save_state()
    return proc


def etcd_argv(d: Path, port: int, peer_port: int) -> list[str]:
    return [
        str(paths.binary("etcd")),
        f"--data-dir={d / 'etcd'}",
        "--name=testbed",
        f"--listen-client-urls=http://127.0.0.1:{port}",
        f"--advertise-client-urls=http://127.0.0.1:{port}",
        f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
        f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
        f"--initial-cluster=testbed=http://127.0.0.1:{peer_port}",
        "--unsafe-no-fsync=true",  # test data: losing it on a crash is fine, fsync on 2 cores is not
        "--log-level=warn",
    ]


def apiserver_argv(d: Path, etcd_port: int, port: int) -> list[str]:
    return [
        str(paths.binary("kube-apiserver")),
        f"--etcd-servers=http://127.0.0.1:{etcd_port}",
        "--bind-address=127.0.0.1",
        "--advertise-address=127.0.0.1",  # required without a default route
        f"--secure-port={port}",
        f"--cert-dir={d / 'pki'}",
        f"--token-auth-file={d / 'tokens.csv'}",
        "--authorization-mode=RBAC",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        f"--service-account-key-file={d / 'sa.pub'}",
        f"--service-account-signing-key-file={d / 'sa.key'}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        "--allow-privileged=true",
        "--max-requests-inflight=1000",
        "--max-mutating-requests-inflight=500",
    ]


def controller_manager_argv(cluster: Cluster, port: int) -> list[str]:
    qps = cluster.config.controller_qps
    return [
        str(paths.binary("kube-controller-manager")),
        f"--kubeconfig={cluster.kubeconfig}",
        "--leader-elect=false",
        "--bind-address=127.0.0.1",
        f"--secure-port={port}",
        f"--service-account-private-key-file={cluster.workdir / 'sa.key'}",
        f"--root-ca-file={cluster.ca_file}",
        f"--kube-api-qps={qps}",
        f"--kube-api-burst={2 * qps}",
    ]


def scheduler_argv(cluster: Cluster, port: int) -> list[str]:
    qps = cluster.config.controller_qps
    return [
        str(paths.binary("kube-scheduler")),
        f"--kubeconfig={cluster.kubeconfig}",
        "--leader-elect=false",
        "--bind-address=127.0.0.1",
        f"--secure-port={port}",
        f"--kube-api-qps={qps}",
        f"--kube-api-burst={2 * qps}",
    ]


def _write_keys(d: Path, token: str) -> None:
    """The service-account signing key pair and the admin token (openssl: no Python crypto needed)."""
    (d / "tokens.csv").write_text(f'{token},admin,uid-admin,"system:masters"\n')
    (d / "tokens.csv").chmod(0o600)
    subprocess.run(["openssl", "genrsa", "-out", str(d / "sa.key"), "2048"], check=True, capture_output=True)
    subprocess.run(
        ["openssl", "rsa", "-in", str(d / "sa.key"), "-pubout", "-out", str(d / "sa.pub")],
        check=True,
        capture_output=True,
    )


def _write_kubeconfig(cluster: Cluster) -> None:
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "testbed",
                "cluster": {"server": cluster.server, "certificate-authority": str(cluster.ca_file)},
            }
        ],
        "users": [{"name": "admin", "user": {"token": cluster.token}}],
        "contexts": [{"name": "testbed", "context": {"cluster": "testbed", "user": "admin"}}],
        "current-context": "testbed",
    }
    cluster.kubeconfig.write_text(yaml.safe_dump(kubeconfig))
    cluster.kubeconfig.chmod(0o600)


def _ssl_context(ca_file: Path | None) -> ssl.SSLContext:
    if ca_file is None:  # controller-manager/scheduler serve a throwaway in-memory cert
        return ssl._create_unverified_context()
    return ssl.create_default_context(cafile=str(ca_file))


def _http_ok(url: str, token: str = "", ca_file: Path | None = None) -> bool:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    ctx = _ssl_context(ca_file) if url.startswith("https") else None
    with urllib.request.urlopen(req, timeout=5, context=ctx) as resp:
        return resp.status == 200


def _apiserver_ready(cluster: Cluster) -> bool:
    if not cluster.ca_file.exists():
        return False
    return _http_ok(f"{cluster.server}/readyz", cluster.token, cluster.ca_file)


def _default_sa_exists(cluster: Cluster, namespace: str) -> bool:
    url = f"{cluster.server}/api/v1/namespaces/{namespace}/serviceaccounts/default"
    try:
        return _http_ok(url, cluster.token, cluster.ca_file)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return False
        raise


def _nodes_ready(core, names: list[str]) -> bool:
    ready = set()
    for node in core.list_node().items:
        if any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or []):
            ready.add(node.metadata.name)
    return set(names) <= ready
