"""GPU classes from the node labels NVIDIA GPU Feature Discovery sets (pure).

A node is a GPU candidate when it carries ``nvidia.com/gpu.memory`` (MiB per GPU); nodes
with the same memory size form one class, which is what sizing cares about.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

MEMORY_LABEL = "nvidia.com/gpu.memory"
PRODUCT_LABEL = "nvidia.com/gpu.product"
COUNT_LABEL = "nvidia.com/gpu.count"
GPU_RESOURCE = "nvidia.com/gpu"


@dataclass(frozen=True)
class GpuNode:
    name: str
    memory_mib: int
    product: str
    count: int
    schedulable: bool


@dataclass(frozen=True)
class GpuClass:
    """All schedulable nodes whose GPUs have ``memory_mib`` each."""

    memory_mib: int
    products: tuple[str, ...]
    nodes: int
    max_gpus_per_node: int

    @property
    def name(self) -> str:
        """A DNS-label-safe class name used in Deployment names and labels: ``81920mib``."""
        return f"{self.memory_mib}mib"


def _int_label(labels: Mapping[str, str], key: str) -> int | None:
    try:
        value = int(labels.get(key, ""))
    except ValueError:
        return None
    return value if value > 0 else None


def gpu_node(body: Mapping[str, Any]) -> GpuNode | None:
    """The GPU facts of a Node object, or None when its labels do not describe a GPU."""
    meta = body.get("metadata") or {}
    labels = meta.get("labels") or {}
    memory = _int_label(labels, MEMORY_LABEL)
    if memory is None:
        return None
    # GFD sets gpu.count; fall back to the allocatable resource, then to one GPU.
    allocatable = ((body.get("status") or {}).get("allocatable") or {}).get(GPU_RESOURCE)
    count = _int_label(labels, COUNT_LABEL) or _int_label({"n": str(allocatable or "")}, "n") or 1
    return GpuNode(
        name=meta.get("name", ""),
        memory_mib=memory,
        product=labels.get(PRODUCT_LABEL, ""),
        count=count,
        schedulable=not (body.get("spec") or {}).get("unschedulable", False),
    )


def gpu_classes(
    nodes: Iterable[GpuNode], products: Iterable[str] = (), min_gpus: int = 1
) -> tuple[GpuClass, ...]:
    """Schedulable GPU nodes grouped by memory size, smallest class first.

    Only nodes with at least ``min_gpus`` GPUs and, when ``products`` is not empty, one of
    those ``nvidia.com/gpu.product`` values count.
    """
    wanted = frozenset(products)
    groups: dict[int, list[GpuNode]] = {}
    for node in nodes:
        if node.schedulable and node.count >= min_gpus and (not wanted or node.product in wanted):
            groups.setdefault(node.memory_mib, []).append(node)
    return tuple(
        GpuClass(
            memory_mib=memory,
            products=tuple(sorted({n.product for n in members if n.product})),
            nodes=len(members),
            max_gpus_per_node=max(n.count for n in members),
        )
        for memory, members in sorted(groups.items())
    )
