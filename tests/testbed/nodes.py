"""Simulated GPU nodes for KWOK: node sets as frozen data, Node manifests from a pure builder.

Labels follow NVIDIA GPU Feature Discovery (``nvidia.com/gpu.memory`` is MiB per GPU), the
resource is ``nvidia.com/gpu``, as on a real GPU cluster. KWOK takes over every node that
carries the annotation ``kwok.x-k8s.io/node: fake`` (see kwok.py's selector).
"""

from __future__ import annotations

from dataclasses import dataclass, field

KWOK_ANNOTATION = {"kwok.x-k8s.io/node": "fake"}
GPU_RESOURCE = "nvidia.com/gpu"
NODE_KIND_LABEL = "testbed.qmodel.dev/node-kind"


@dataclass(frozen=True)
class NodeSet:
    """``count`` identical nodes named ``{prefix}-{i}``; ``gpus == 0`` means a CPU-only node."""

    prefix: str
    count: int = 1
    gpus: int = 0
    gpu_product: str = ""
    gpu_memory_mib: int = 0
    cpu: str = "32"
    memory: str = "256Gi"
    pods: str = "110"
    # Real GPU nodes often carry this taint (GKE adds it); pods then need a toleration.
    gpu_taint: bool = False
    labels: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.count < 0 or self.gpus < 0:
            raise ValueError(f"node set {self.prefix!r}: count and gpus must be >= 0")
        if self.gpus and (not self.gpu_product or self.gpu_memory_mib <= 0):
            raise ValueError(f"node set {self.prefix!r}: GPU nodes need gpu_product and gpu_memory_mib")

    def names(self) -> list[str]:
        return [f"{self.prefix}-{i}" for i in range(self.count)]


A100_80GB = NodeSet(
    "a100",
    count=2,
    gpus=8,
    gpu_product="NVIDIA-A100-SXM4-80GB",
    gpu_memory_mib=81920,
    cpu="96",
    memory="1024Gi",
)
L4_24GB = NodeSet(
    "l4", count=2, gpus=1, gpu_product="NVIDIA-L4", gpu_memory_mib=23034, cpu="8", memory="32Gi"
)
CPU_ONLY = NodeSet("cpu", count=1, cpu="16", memory="64Gi")
# The default cluster: two GPU classes of very different memory, and a node without GPUs.
DEFAULT_NODE_SETS: tuple[NodeSet, ...] = (A100_80GB, L4_24GB, CPU_ONLY)


def gpu_labels(gpus: int, product: str, memory_mib: int) -> dict[str, str]:
    """The GPU Feature Discovery labels for a node with ``gpus`` GPUs (none for a CPU node)."""
    if not gpus:
        return {}
    return {
        "nvidia.com/gpu.present": "true",
        "nvidia.com/gpu.product": product,
        "nvidia.com/gpu.memory": str(memory_mib),
        "nvidia.com/gpu.count": str(gpus),
    }


def build_node(spec: NodeSet, name: str) -> dict:
    """The Node manifest KWOK will manage (status is filled in by KWOK's node-initialize stage)."""
    resources = {"cpu": spec.cpu, "memory": spec.memory, "pods": spec.pods}
    if spec.gpus:
        resources[GPU_RESOURCE] = str(spec.gpus)
    labels = {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "type": "kwok",
        NODE_KIND_LABEL: "kwok",
        **gpu_labels(spec.gpus, spec.gpu_product, spec.gpu_memory_mib),
        **spec.labels,
    }
    node: dict = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "annotations": dict(KWOK_ANNOTATION), "labels": labels},
        "spec": {},
        "status": {"capacity": resources, "allocatable": dict(resources)},
    }
    if spec.gpus and spec.gpu_taint:
        node["spec"]["taints"] = [{"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"}]
    return node


def build_nodes(sets: tuple[NodeSet, ...]) -> list[dict]:
    names = [n for s in sets for n in s.names()]
    if len(names) != len(set(names)):
        raise ValueError(f"node sets give duplicate node names: {sorted(names)}")
    return [build_node(s, name) for s in sets for name in s.names()]
