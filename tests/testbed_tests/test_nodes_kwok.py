"""Node sets and KWOK's stage config, without a cluster."""

from __future__ import annotations

import pytest
import yaml

from testbed import kwok
from testbed.nodes import DEFAULT_NODE_SETS, NodeSet, build_nodes
from testbed.processnode.agent import build_node as build_process_node
from testbed.processnode.config import ProcessNodeConfig


def test_default_nodes_carry_gfd_labels_and_gpu_capacity():
    nodes = {n["metadata"]["name"]: n for n in build_nodes(DEFAULT_NODE_SETS)}
    assert sorted(nodes) == ["a100-0", "a100-1", "cpu-0", "l4-0", "l4-1"]
    a100 = nodes["a100-0"]
    assert a100["metadata"]["labels"]["nvidia.com/gpu.memory"] == "81920"
    assert a100["metadata"]["labels"]["nvidia.com/gpu.count"] == "8"
    assert a100["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    assert a100["metadata"]["annotations"] == {"kwok.x-k8s.io/node": "fake"}
    assert "taints" not in a100["spec"]
    cpu = nodes["cpu-0"]
    assert not any(k.startswith("nvidia.com/") for k in cpu["metadata"]["labels"])
    assert "nvidia.com/gpu" not in cpu["status"]["capacity"]


def test_gpu_taint_and_bad_sets():
    tainted = build_nodes((NodeSet("t", gpus=1, gpu_product="X", gpu_memory_mib=1024, gpu_taint=True),))[0]
    assert tainted["spec"]["taints"] == [
        {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
    ]
    with pytest.raises(ValueError, match="duplicate node names"):
        build_nodes((NodeSet("x"), NodeSet("x")))
    with pytest.raises(ValueError, match="need gpu_product"):
        NodeSet("g", gpus=2)


def test_process_node_can_pose_as_a_gpu_node():
    node = build_process_node(ProcessNodeConfig(name="p", gpus=1, gpu_memory_mib=16384, taint=False))
    assert node["status"]["capacity"]["nvidia.com/gpu"] == "1"
    assert node["metadata"]["labels"]["nvidia.com/gpu.memory"] == "16384"
    assert node["spec"]["taints"] == []
    with pytest.raises(ValueError, match="loopback"):
        ProcessNodeConfig(pod_cidr="10.0.0.0/16")
    gpu_tainted = build_process_node(ProcessNodeConfig(name="g", gpus=1, taint=False, gpu_taint=True))
    assert gpu_tainted["spec"]["taints"] == [
        {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
    ]


def test_kwok_config_keeps_defaults_and_adds_ours(tmp_path):
    stages = tmp_path / "defaults"
    stages.mkdir()
    for name in kwok.KEPT_DEFAULT_STAGES:  # stand-ins for the files install.sh copies from kwok
        stage = name.removesuffix(".yaml")
        (stages / name).write_text(
            f"apiVersion: kwok.x-k8s.io/v1alpha1\nkind: Stage\nmetadata: {{name: {stage}}}\n"
        )
    docs = list(yaml.safe_load_all(kwok.write_config(tmp_path / "kwok.yaml", stages).read_text()))
    names = [d["metadata"]["name"] for d in docs]
    assert names == [
        "node-initialize",
        "node-heartbeat-with-lease",
        "pod-ready",
        "pod-delete",
        "testbed-pod-complete",
        "testbed-pod-fail",
    ]
    fail = docs[-1]["spec"]
    assert {"key": f'.metadata.labels["{kwok.FAIL_LABEL}"]', "operator": "In", "values": ["true"]} in fail[
        "selector"
    ]["matchExpressions"]
    assert "phase: Failed" in fail["next"]["statusTemplate"]
