"""Scale benchmark: apply many QuantizedModels at once, time apply -> quantize Job created.

    python operator/benchmarks/scale.py --models 500 --nodes 100        # starts a test bed
    python operator/benchmarks/scale.py --kubeconfig /path/admin.kubeconfig --models 200

The baseline, measured in the same run on the same cluster, is the API server's own floor:
the same number of Jobs created directly by the client (create call -> the Job seen on a
watch). The operator's latency is create-QuantizedModel call -> its Job seen on the same
watch. Also reported: the operator's peak RSS (VmHWM) and CPU time. Prints a table; asserts
nothing (targets: p99 under 1 s, RSS under 150 MB).
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))  # the test bed lives with the tests

from kubernetes import client, watch  # noqa: E402
from operator_tests.k8s_support import Models, Operator, install_crd, with_result  # noqa: E402
from operator_tests.support import spec_body  # noqa: E402

from qmodel_operator.jobs import quantize_job_name  # noqa: E402
from qmodel_operator.revision import revision  # noqa: E402
from qmodel_operator.spec import QuantizedModelSpec  # noqa: E402
from testbed import cluster as tb_cluster  # noqa: E402
from testbed import nodes, paths  # noqa: E402

CLIENT_THREADS = 8  # like several `kubectl apply` at once


class JobWatch:
    """Records when each Job of a namespace is first seen (monotonic clock)."""

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self.seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._batch = client.BatchV1Api(api)
        self._ns = namespace
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        w = watch.Watch()
        while not self._stop.is_set():
            for event in w.stream(self._batch.list_namespaced_job, self._ns, timeout_seconds=5):
                name = event["object"].metadata.name
                self.seen.setdefault(name, time.monotonic())
                if self._stop.is_set():
                    break

    def wait(self, names: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while any(n not in self.seen for n in names) and time.monotonic() < deadline:
            time.sleep(0.1)

    def stop(self) -> None:
        self._stop.set()


def _create_all(items: list[tuple[str, object]], create) -> dict[str, float]:
    started: dict[str, float] = {}

    def one(item):
        name, body = item
        started[name] = time.monotonic()
        create(name, body)

    with ThreadPoolExecutor(CLIENT_THREADS) as pool:
        list(pool.map(one, items))
    return started


def _latencies(started: dict[str, float], seen: dict[str, float], job_of) -> list[float]:
    return sorted(seen[job_of(n)] - t for n, t in started.items() if job_of(n) in seen)


def _row(label: str, values: list[float], total: int) -> str:
    if not values:
        return f"| {label} | 0/{total} | - | - | - | - |"
    p = lambda q: values[min(len(values) - 1, int(q * len(values)))]  # noqa: E731
    return (
        f"| {label} | {len(values)}/{total} | {statistics.median(values) * 1000:.0f} | "
        f"{p(0.90) * 1000:.0f} | {p(0.99) * 1000:.0f} | {values[-1] * 1000:.0f} |"
    )


def _samples(text: str) -> dict[str, float]:
    """Unlabelled samples of a Prometheus text page."""
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if line and not line.startswith("#") and "{" not in name:
            out[name] = float(value)
    return out


def _proc_stats(pid: int) -> tuple[float, float]:
    """(peak RSS in MiB, CPU seconds) of a process."""
    status = Path(f"/proc/{pid}/status").read_text()
    hwm = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return hwm / 1024, (int(fields[11]) + int(fields[12])) / ticks


def run(api: client.ApiClient, kubeconfig: Path, models_n: int, workdir: Path) -> None:
    install_crd(api)
    core = client.CoreV1Api(api)
    ns = f"scale-{secrets.token_hex(3)}"
    core.create_namespace({"metadata": {"name": ns}})
    operator = Operator(kubeconfig, workdir)
    operator.start()
    jobs_watch = JobWatch(api, ns)
    try:
        models = Models(api, ns)
        time.sleep(2)  # the default ServiceAccount and the operator's first listing
        # Baseline: the same number of Jobs, created directly.
        template = {"apiVersion": "batch/v1", "kind": "Job",
                    "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [
                        {"name": "c", "image": "x", "command": ["true"]}]}}}}  # fmt: skip
        direct = [(f"direct-{i}", {**template, "metadata": {"name": f"direct-{i}"}}) for i in range(models_n)]
        started = _create_all(direct, lambda name, body: models.batch.create_namespaced_job(ns, body))
        jobs_watch.wait([n for n, _ in direct], 120)
        baseline = _latencies(started, jobs_watch.seen, lambda n: n)
        # The operator: one QuantizedModel per Job.
        specs = [(f"m{i}", with_result(spec_body(), f"m{i}")) for i in range(models_n)]
        job_name = {
            name: quantize_job_name(name, revision(QuantizedModelSpec.model_validate(spec)))
            for name, spec in specs
        }
        started = _create_all(specs, models.create)
        jobs_watch.wait(list(job_name.values()), 300)
        through = _latencies(started, jobs_watch.seen, job_name.__getitem__)
        rss, cpu = _proc_stats(operator.proc.pid)
        samples = _samples(operator.metrics())
    finally:
        jobs_watch.stop()
        operator.stop()
        core.delete_namespace(ns)
    print(
        f"\n{models_n} models, {len(core.list_node().items)} nodes; latency to the Job seen on a watch (ms)\n"
    )
    print("| path | Jobs | p50 | p90 | p99 | max |\n|---|---|---|---|---|---|")
    print(_row("baseline: client creates the Job", baseline, models_n))
    print(_row("operator: client creates the QuantizedModel", through, models_n))
    print(f"\noperator peak RSS {rss:.0f} MiB, CPU {cpu:.1f} s (targets: p99 < 1000 ms, RSS < 150 MiB)")
    count = samples.get("qmodel_reconcile_duration_seconds_count", 0)
    mean = samples.get("qmodel_reconcile_duration_seconds_sum", 0) / max(count, 1)
    print(f"reconciles {count:.0f} (mean {mean * 1000:.0f} ms including the wait for a slot)")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", type=int, default=500)
    parser.add_argument("--nodes", type=int, default=100, help="KWOK H100 nodes to add")
    parser.add_argument("--kubeconfig", type=Path, help="an existing test bed (default: start one)")
    args = parser.parse_args()
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"qmodel-scale-{secrets.token_hex(3)}"
    workdir.mkdir(parents=True)
    cluster = None
    if args.kubeconfig:
        cluster = tb_cluster.attach(args.kubeconfig)
        kubeconfig = args.kubeconfig
    else:
        paths.ensure_installed()
        cluster = tb_cluster.start(tb_cluster.ClusterConfig(workdir=workdir / "testbed"))
        kubeconfig = cluster.kubeconfig
    prefix = f"h100-{secrets.token_hex(2)}"
    h100 = nodes.NodeSet(
        prefix, count=args.nodes, gpus=8, gpu_product="NVIDIA-H100-80GB-HBM3", gpu_memory_mib=81559
    )
    cluster.add_nodes((h100,))
    api = cluster.api_client()
    try:
        run(api, kubeconfig, args.models, workdir)
    finally:
        core = client.CoreV1Api(api)
        for name in h100.names():
            core.delete_node(name)
        if not args.kubeconfig:
            cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
