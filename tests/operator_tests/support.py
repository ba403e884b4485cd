"""Shared builders for the operator's tests: specs, observed worlds, Job results (no cluster)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qmodel_operator.gpu import GpuNode
from qmodel_operator.observed import DeploymentState, JobState, Observed, PodOutcome
from qmodel_operator.podspec import ModelRef
from qmodel_operator.revision import revision
from qmodel_operator.settings import Settings
from qmodel_operator.spec import QuantizedModelSpec, QuantizedModelStatus

REPO = Path(__file__).resolve().parents[2]
CRD_PATH = REPO / "crds" / "quantizedmodel.yaml"
NOW = "2026-11-23T18:00:00Z"
REF = ModelRef("ml", "smollm2", "0b6a1c2e-1111-4222-8333-444455556666")
# SmolLM2-135M as the quantize Job reports it (design.md: 30 layers, hidden 576, 9/3 heads).
SMOLLM2 = {
    "architecture": "LlamaForCausalLM", "layers": 30, "hiddenSize": 576, "intermediateSize": 1536,
    "heads": 9, "kvHeads": 3, "headDim": 64, "vocabSize": 49152, "tiedEmbeddings": True,
    "maxPositionEmbeddings": 8192, "parameters": 134515008,
}  # fmt: skip
# Llama-2-70B (config.json of meta-llama/Llama-2-70b-hf): does not fit a 24 GiB card at 4 bits.
LLAMA_70B = {
    "layers": 80, "hiddenSize": 8192, "intermediateSize": 28672, "heads": 64, "kvHeads": 8,
    "headDim": 128, "vocabSize": 32000, "tiedEmbeddings": False, "maxPositionEmbeddings": 4096,
}  # fmt: skip
A100 = GpuNode("gpu-a100-0", 81920, "NVIDIA-A100-SXM4-80GB", 8, True)
L4 = GpuNode("gpu-l4-0", 23034, "NVIDIA-L4", 1, True)


def spec_body(**sections: Any) -> dict[str, Any]:
    """A QuantizedModel spec as JSON; each keyword overrides keys of one section."""
    body: dict[str, Any] = {
        "source": {"uri": "s3://models/smollm2-135m/", "credentialsSecret": "models-s3"},
        "artifacts": {"uri": "s3://artifacts/qmodel/", "credentialsSecret": "artifacts-s3"},
    }
    for name, value in sections.items():
        body[name] = {**body.get(name, {}), **value}
    return body


def make_spec(**sections: Any) -> QuantizedModelSpec:
    return QuantizedModelSpec.model_validate(spec_body(**sections))


def settings(**overrides: Any) -> Settings:
    return Settings(runtime_image="registry.local/qmodel-runtime:test", **overrides)


def result_message(
    spec: QuantizedModelSpec, baseline: float = 14.09, quantized: float = 14.30, **extra: Any
) -> str:
    rev = revision(spec)
    doc = {
        "revision": rev,
        "baselinePerplexity": baseline,
        "quantizedPerplexity": quantized,
        "increasePercent": (quantized / baseline - 1) * 100,
        "passed": True,
        "artifact": {
            "uri": f"s3://artifacts/qmodel/smollm2/{rev}/",
            "manifestDigest": "sha256:" + "ab" * 32,
            "sizeBytes": 112622976,
            "compressionRatio": 3.2,
        },
        "timings": {"quantizeSeconds": 100.0, "evaluateSeconds": 50.0, "totalSeconds": 153.0},
        "model": SMOLLM2,
        **extra,
    }
    return json.dumps(doc)


def job(name: str, rev: str, *, state: str = "running", created: str = NOW, **kw: Any) -> JobState:
    """A quantize Job summary in one of the states: pending, running, complete, failed."""
    return JobState(
        name=name,
        owner_uid=REF.uid,
        component=kw.pop("component", "quantize"),
        revision=rev,
        created=created,
        active=1 if state in ("pending", "running") else 0,
        ready=1 if state == "running" else 0,
        succeeded=1 if state == "complete" else 0,
        failed=kw.pop("failed", 2 if state == "failed" else 0),
        complete=state == "complete",
        failed_final=state == "failed",
        failure="BackoffLimitExceeded: Job has reached the specified backoff limit"
        if state == "failed"
        else None,
        start_time=created,
        completion_time="2026-11-23T18:03:00Z" if state == "complete" else None,
        **kw,
    )


def deployment(
    name: str, rev: str, spec_hash: str | None, *, ready: int = 1, replicas: int = 1
) -> DeploymentState:
    return DeploymentState(
        name=name, owner_uid=REF.uid, revision=rev, spec_hash=spec_hash, replicas=replicas,
        ready_replicas=ready, updated_replicas=replicas, available_replicas=ready, generation=2,
        observed_generation=2,
    )  # fmt: skip


def observed(
    spec: QuantizedModelSpec,
    status: QuantizedModelStatus | None = None,
    *,
    pod: PodOutcome | None = None,
    nodes: tuple[GpuNode, ...] = (A100, L4),
    **kw: Any,
) -> Observed:
    return Observed(
        ref=REF,
        generation=kw.pop("generation", 1),
        deleting=kw.pop("deleting", False),
        finalizers=kw.pop("finalizers", ()),
        spec=spec,
        status=status or QuantizedModelStatus(),
        now=kw.pop("now", NOW),
        gpu_nodes=nodes,
        pod=pod,
        **kw,
    )
