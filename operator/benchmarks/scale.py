"""Scale benchmark: apply many QuantizedModels at once; time apply -> quantize Job and -> Ready.

    python operator/benchmarks/scale.py --models 500 --nodes 100        # starts its own test bed
    python operator/benchmarks/scale.py --kubeconfig /path/admin.kubeconfig --models 200

The test bed has only KWOK GPU nodes (no process node): each quantize Job's pod succeeds at
once with the planted result as its termination message, serving pods turn Ready, so every
model walks Pending -> Quantizing -> Deploying -> Ready through the real controllers.

The baseline, measured in the same run on the same cluster, is the API server's own floor:
the same number of Jobs created directly by the client (create call -> the Job seen on a
watch). The operator's latency is create-QuantizedModel call -> its Job seen on the same
watch; then create -> phase Ready, the time until every model is Ready, Jobs per model
(a duplicate is a bug), and the operator's peak RSS (VmHWM) and CPU time. Prints a table;
asserts nothing (targets: p99 apply -> Job under 1 s, RSS under 150 MB).
tests/reliability_tests/test_scale.py runs a smaller size of ``scale_run`` and asserts what
is robust on a loaded CI machine.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import re
import secrets
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))  # the test bed lives with the tests

from kubernetes import client, watch  # noqa: E402
from kubernetes.client.exceptions import ApiException  # noqa: E402
from operator_tests.k8s_support import GROUP, PLURAL, VERSION, Models, Operator, install_crd, with_result  # noqa: E402
from operator_tests.support import spec_body  # noqa: E402

from qmodel_operator import podspec as ps  # noqa: E402
from qmodel_operator.jobs import quantize_job_name  # noqa: E402
from qmodel_operator.revision import revision  # noqa: E402
from qmodel_operator.spec import QuantizedModelSpec  # noqa: E402
from testbed import cluster as tb_cluster  # noqa: E402
from testbed import nodes, paths  # noqa: E402

CLIENT_THREADS = 8  # like several `kubectl apply` at once


class RawWatch(watch.Watch):
    """A watch whose events stay plain dicts. The client's default turns every Job event into
    V1Job objects; in this thread, beside 8 creating threads, that took long enough to delay
    when an event is *noticed* by hundreds of ms in a 500-model burst: the client's cost,
    charged to the API server and the operator."""

    def get_return_type(self, func: Callable[..., Any]) -> None:
        return None

    def unmarshal_event(self, data: str, return_type: Any) -> Any:
        event = super().unmarshal_event(data, None)
        if event and isinstance(event.get("object"), dict):
            version = (event["object"].get("metadata") or {}).get("resourceVersion")
            self.resource_version = version or self.resource_version
        return event


class FirstSeen:
    """Records when each object of a namespace first satisfies each of ``conditions`` (monotonic
    clock), from one watch kept open in a thread (resumed from its resourceVersion, relisted
    after a 410). ``seen[condition][name]``."""

    def __init__(
        self, list_fn: Callable[..., Any], *args: Any, conditions: dict[str, Callable[[Any], bool]]
    ) -> None:
        self.seen: dict[str, dict[str, float]] = {c: {} for c in conditions}
        self._list, self._args, self._conditions = list_fn, args, conditions
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        w = RawWatch()
        version = None
        while not self._stop.is_set():
            try:
                for event in w.stream(self._list, *self._args, timeout_seconds=10, resource_version=version):
                    now = time.monotonic()
                    obj = event["object"]
                    name = obj["metadata"]["name"]
                    for condition, when in self._conditions.items():
                        if when(obj):
                            self.seen[condition].setdefault(name, now)
                    if self._stop.is_set():
                        return
                version = w.resource_version
            except ApiException as e:
                if e.status != 410:
                    raise
                version = None  # too old: list again

    def wait(self, condition: str, names: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while any(n not in self.seen[condition] for n in names) and time.monotonic() < deadline:
            time.sleep(0.2)

    def stop(self) -> None:
        self._stop.set()


def _is_ready(model: dict[str, Any]) -> bool:
    return (model.get("status") or {}).get("phase") == "Ready"


def _create_all(
    items: list[tuple[str, Any]], create: Callable[[str, Any], Any]
) -> tuple[dict[str, float], dict[str, float]]:
    """Create from CLIENT_THREADS threads; when each call started, and when it returned."""
    started: dict[str, float] = {}
    returned: dict[str, float] = {}

    def one(item: tuple[str, Any]) -> None:
        name, body = item
        started[name] = time.monotonic()
        create(name, body)
        returned[name] = time.monotonic()

    with ThreadPoolExecutor(CLIENT_THREADS) as pool:
        list(pool.map(one, items))
    return started, returned


def _latencies(started: dict[str, float], seen: dict[str, float], key: Callable[[str], str]) -> list[float]:
    return sorted(seen[key(n)] - t for n, t in started.items() if key(n) in seen)


def percentile(values: list[float], q: float) -> float:
    """The q-quantile of sorted values (nearest rank), 0 for none."""
    return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0


def _samples(text: str) -> dict[str, float]:
    """Unlabelled samples of a Prometheus text page (labelled ones keep their labels in the key)."""
    out = {}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if line and not line.startswith("#"):
            out[name] = float(value)
    return out


def _labels(key: str) -> tuple[str, dict[str, str]]:
    name, _, rest = key.partition("{")
    return name, dict(re.findall(r'(\w+)="([^"]*)"', rest))


def histograms(samples: dict[str, float], name: str) -> dict[str, tuple[float, float, float]]:
    """{labels: (count, mean, the bucket bound under which 99% fall)} of one Prometheus histogram."""
    series: dict[str, dict[str, Any]] = {}
    for key, value in samples.items():
        metric, labels = _labels(key)
        le = labels.pop("le", None)
        entry = series.setdefault(",".join(f'{k}="{v}"' for k, v in sorted(labels.items())), {"buckets": []})
        if metric == f"{name}_count":
            entry["count"] = value
        elif metric == f"{name}_sum":
            entry["sum"] = value
        elif metric == f"{name}_bucket" and le is not None:
            entry["buckets"].append((float(le), value))
    out = {}
    for labels, entry in series.items():
        count = entry.get("count")
        if count:
            p99 = next((b for b, v in sorted(entry["buckets"]) if v >= 0.99 * count), float("inf"))
            out[f"{{{labels}}}" if labels else ""] = (count, entry.get("sum", 0.0) / count, p99)
    return out


def proc_stats(pid: int) -> tuple[float, float]:
    """(peak RSS in MiB, CPU seconds) of a process."""
    status = Path(f"/proc/{pid}/status").read_text()
    hwm = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return hwm / 1024, (int(fields[11]) + int(fields[12])) / ticks


@dataclass
class ScaleResult:
    models: int
    nodes: int
    baseline: list[float] = field(default_factory=list)  # s, client create -> Job seen
    create_call: list[float] = field(default_factory=list)  # s, the create call of a QuantizedModel
    model_seen: list[float] = field(default_factory=list)  # s, create QuantizedModel -> seen on a watch
    to_job: list[float] = field(default_factory=list)  # s, create QuantizedModel -> its Job seen
    seen_to_job: list[float] = field(default_factory=list)  # s, QuantizedModel seen -> its Job seen
    to_ready: list[float] = field(default_factory=list)  # s, create QuantizedModel -> phase Ready
    apply_seconds: float = 0.0  # first create call -> last create call returned
    all_ready_seconds: float | None = None  # first create -> the last model Ready (None: not all)
    jobs_per_model: dict[str, int] = field(default_factory=dict)
    rss_mib: float = 0.0
    cpu_seconds: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def not_ready(self) -> int:
        return self.models - len(self.to_ready)

    @property
    def duplicates(self) -> dict[str, int]:
        return {name: n for name, n in self.jobs_per_model.items() if n > 1}

    def table(self) -> str:
        def row(label: str, values: list[float]) -> str:
            ms = [f"{percentile(values, q) * 1000:.0f}" for q in (0.5, 0.9, 0.99, 1.0)]
            return f"| {label} | {len(values)}/{self.models} | {' | '.join(ms)} |"

        lines = [
            f"{self.models} models on {self.nodes} nodes; latency from the create call, ms",
            "",
            "| path | seen | p50 | p90 | p99 | max |",
            "|---|---|---|---|---|---|",
        ]
        if self.baseline:
            lines.append(row("baseline: client creates the Job -> Job seen", self.baseline))
        lines.append(row("QuantizedModel: the create call returned", self.create_call))
        lines.append(row("QuantizedModel: seen on a watch", self.model_seen))
        lines.append(row("operator: QuantizedModel created -> its Job seen", self.to_job))
        lines.append(row("operator's share: QuantizedModel seen -> its Job seen", self.seen_to_job))
        lines.append(row("operator: QuantizedModel created -> phase Ready", self.to_ready))
        ready = f"{self.all_ready_seconds:.1f} s" if self.all_ready_seconds is not None else "NOT all Ready"
        reconciles = self.metrics.get('qmodel_reconciles_total{result="ok"}', 0)
        errors = self.metrics.get('qmodel_reconciles_total{result="error"}', 0)
        lines += [
            "",
            f"creates took {self.apply_seconds:.1f} s; all Ready {ready} after the first create; "
            f"{self.not_ready} not Ready; {len(self.duplicates)} models with duplicate Jobs",
            f"operator: peak RSS {self.rss_mib:.0f} MiB, CPU {self.cpu_seconds:.1f} s, "
            f"reconciles {reconciles:.0f} ok / {errors:.0f} failed",
            "",
            "| operator histogram | count | mean ms | p99 <= ms |",
            "|---|---|---|---|",
        ]
        for name in ("qmodel_reconcile_queue_seconds", "qmodel_api_request_duration_seconds"):
            for labels, (count, mean, p99) in sorted(histograms(self.metrics, name).items()):
                bound = f"{p99 * 1000:.0f}" if p99 != float("inf") else "> 30000"
                lines.append(f"| {name}{labels} | {count:.0f} | {mean * 1000:.0f} | {bound} |")
        return "\n".join(lines)


def _count_jobs(batch: client.BatchV1Api, namespace: str) -> dict[str, int]:
    selector = f"{ps.LABEL_COMPONENT}={ps.COMPONENT_QUANTIZE}"
    counts: collections.Counter[str] = collections.Counter()
    for job in batch.list_namespaced_job(namespace, label_selector=selector).items:
        counts[job.metadata.labels.get(ps.LABEL_MODEL, "")] += 1
    return dict(counts)


def _baseline(models: Models, jobs_watch: FirstSeen, count: int) -> list[float]:
    """The same number of Jobs, created directly: the API server's own floor."""
    template = {"apiVersion": "batch/v1", "kind": "Job",
                "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [
                    {"name": "c", "image": "x", "command": ["true"]}]}}}}  # fmt: skip
    direct = [(f"direct-{i}", {**template, "metadata": {"name": f"direct-{i}"}}) for i in range(count)]
    started, _ = _create_all(direct, lambda name, body: models.batch.create_namespaced_job(models.ns, body))
    jobs_watch.wait("seen", [n for n, _ in direct], 120)
    for name, _ in direct:
        models.batch.delete_namespaced_job(name, models.ns, propagation_policy="Background")
    return _latencies(started, jobs_watch.seen["seen"], lambda n: n)


def scale_run(
    api: client.ApiClient,
    operator: Operator,
    namespace: str,
    count: int,
    *,
    baseline: bool = True,
    ready_timeout: float = 600.0,
) -> ScaleResult:
    """Apply ``count`` models to ``namespace`` (the operator already running) and measure."""
    models = Models(api, namespace)
    result = ScaleResult(models=count, nodes=len(client.CoreV1Api(api).list_node().items))
    jobs_watch = FirstSeen(models.batch.list_namespaced_job, namespace, conditions={"seen": lambda _: True})
    list_models = (models.custom.list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL)
    models_watch = FirstSeen(*list_models, conditions={"seen": lambda _: True, "ready": _is_ready})
    try:
        if baseline:
            result.baseline = _baseline(models, jobs_watch, count)
        specs = [(f"m{i}", with_result(spec_body(), f"m{i}")) for i in range(count)]
        job_name = {
            name: quantize_job_name(name, revision(QuantizedModelSpec.model_validate(spec)))
            for name, spec in specs
        }
        # The first writes of a new CRD's objects wait for its storage (2 s here), the API server's
        # start-up and not the operator's: one dry run first.
        models.create("warm-up", spec_body(), dry_run=True)
        first = time.monotonic()
        started, returned = _create_all(specs, models.create)
        result.apply_seconds = time.monotonic() - first
        result.create_call = _latencies(started, returned, lambda n: n)
        jobs_watch.wait("seen", list(job_name.values()), ready_timeout)
        jobs_seen, models_seen = jobs_watch.seen["seen"], models_watch.seen["seen"]
        result.to_job = _latencies(started, jobs_seen, job_name.__getitem__)
        result.model_seen = _latencies(started, models_seen, lambda n: n)
        # The operator's own share: from the model on a watch (as the operator's watch gets it)
        # to its Job on a watch.
        result.seen_to_job = _latencies(models_seen, jobs_seen, job_name.__getitem__)
        models_watch.wait("ready", list(job_name), max(1.0, ready_timeout - (time.monotonic() - first)))
        ready_seen = models_watch.seen["ready"]
        result.to_ready = _latencies(started, ready_seen, lambda n: n)
        if len(result.to_ready) == count:
            result.all_ready_seconds = max(ready_seen.values()) - first
    finally:
        for watcher in (jobs_watch, models_watch):
            watcher.stop()
    result.jobs_per_model = _count_jobs(models.batch, namespace)
    assert operator.proc is not None
    result.rss_mib, result.cpu_seconds = proc_stats(operator.proc.pid)
    result.metrics = _samples(operator.metrics())
    return result


def scale_cluster_config(node_count: int, workdir: Path) -> tb_cluster.ClusterConfig:
    """A test bed of ``node_count`` KWOK H100 nodes (8 GPUs each) and nothing else."""
    h100 = nodes.NodeSet(
        "h100", count=node_count, gpus=8, gpu_product="NVIDIA-H100-80GB-HBM3", gpu_memory_mib=81559
    )
    return tb_cluster.ClusterConfig(node_sets=(h100,), process_nodes=(), workdir=workdir)


@contextlib.contextmanager
def scale_bed(
    node_count: int, workdir: Path, kubeconfig: Path | None = None
) -> Iterator[tuple[client.ApiClient, Operator, str]]:
    """(API client, running operator, fresh namespace) on a test bed of its own, or on
    ``kubeconfig``'s. Its own by default: another operator watching every namespace (the
    operator tests' one, in a whole-suite run) would share the work and skew every number."""
    if kubeconfig is not None:
        cluster = tb_cluster.attach(kubeconfig)
    else:
        if not (paths.bin_dir() / "kwok").is_file():
            paths.ensure_installed()
        cluster = tb_cluster.start(scale_cluster_config(node_count, workdir / "testbed"))
    api = cluster.api_client()
    core = client.CoreV1Api(api)
    namespace = f"scale-{secrets.token_hex(3)}"
    operator = Operator(cluster.kubeconfig, workdir)
    try:
        install_crd(api)
        core.create_namespace({"metadata": {"name": namespace}})
        operator.start()
        yield api, operator, namespace
    finally:
        operator.stop()
        if kubeconfig is not None:
            core.delete_namespace(namespace)
        else:
            cluster.stop()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", type=int, default=500)
    parser.add_argument("--nodes", type=int, default=100, help="KWOK H100 nodes (8 GPUs each)")
    parser.add_argument("--kubeconfig", type=Path, help="an existing test bed (default: start one)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the direct-Job baseline")
    parser.add_argument("--ready-timeout", type=float, default=600.0)
    args = parser.parse_args()
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"qmodel-scale-{secrets.token_hex(3)}"
    workdir.mkdir(parents=True)
    with scale_bed(args.nodes, workdir, args.kubeconfig) as (api, operator, namespace):
        result = scale_run(
            api,
            operator,
            namespace,
            args.models,
            baseline=not args.no_baseline,
            ready_timeout=args.ready_timeout,
        )
        load = os.getloadavg()
    print(f"\n{os.cpu_count()} CPUs, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} (1, 5, 15 min)")
    print(result.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
