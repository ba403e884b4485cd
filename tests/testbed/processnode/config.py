"""A process node's settings, frozen and passed explicitly (to its subprocess as JSON)."""

from __future__ import annotations

import dataclasses
import ipaddress
import sys
from dataclasses import dataclass, field
from pathlib import Path

PROCESS_NODE_TAINT = "testbed.qmodel.dev/process-node"


@dataclass(frozen=True)
class ProcessNodeConfig:
    name: str = "process-0"
    # Pod IPs are taken from this loopback /16, one per pod; every process node needs its own.
    pod_cidr: str = "127.201.0.0/16"
    # Tainted by default so that only pods which tolerate it (tests aimed at this node, the
    # demo) really run here, not every pod an operator test creates.
    taint: bool = True
    labels: dict[str, str] = field(default_factory=dict)
    # A CPU "GPU" for the demo: GFD-style labels and nvidia.com/gpu capacity, so pods that ask
    # for a GPU can be scheduled here (the runtime then finds no CUDA and runs on the CPU).
    gpus: int = 0
    gpu_product: str = "TESTBED-CPU-AS-GPU"
    gpu_memory_mib: int = 16384
    # The taint real GPU nodes often carry (nvidia.com/gpu=present:NoSchedule, as NodeSet.gpu_taint):
    # pods that tolerate it, such as the operator's GPU pods, run here without extra placement.
    gpu_taint: bool = False
    cpu: str = "16"
    memory: str = "64Gi"
    pods: str = "32"
    isolation: str = "auto"  # "mount" (private mount namespace + overlay root), "none", or "auto"
    venv_bin: str = field(default_factory=lambda: str(Path(sys.executable).parent))
    # The "image": the virtualenv and the checkout its editable installs point into. A volume
    # mounted over one of them (the charts' emptyDir at /tmp, with the checkout under /tmp) would
    # hide Python from the pod; these are bound back on top, read-only, as an image's files would be.
    image_dirs: tuple[str, ...] = field(
        default_factory=lambda: (sys.prefix, str(Path(__file__).resolve().parents[3]))
    )
    heartbeat_seconds: float = 10.0
    # The node's env vars that its pods inherit, as an image's ENV would set them.
    env_passthrough: tuple[str, ...] = ("QMODEL_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")

    def __post_init__(self) -> None:
        net = ipaddress.ip_network(self.pod_cidr)
        if not net.subnet_of(ipaddress.ip_network("127.0.0.0/8")) or net.prefixlen > 24:
            raise ValueError(f"pod_cidr must be a loopback range of /24 or larger, got {self.pod_cidr!r}")
        if self.isolation not in ("auto", "mount", "none"):
            raise ValueError(f"isolation must be auto, mount or none, got {self.isolation!r}")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> ProcessNodeConfig:
        data = dict(data)
        data["env_passthrough"] = tuple(data.get("env_passthrough", ()))
        if "image_dirs" in data:
            data["image_dirs"] = tuple(data["image_dirs"])
        return cls(**data)
