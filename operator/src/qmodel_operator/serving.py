"""Serving: where the runtime pods go and how big they are (pure), and their manifests.

``place()`` turns the GPU classes and the served revision's shape into one Deployment
(placement single) or one per fitting class (placement spread), each sized by the
estimator; when nothing fits it returns a ``NoFit`` whose message says by how much.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from qmodel_operator import estimator as est
from qmodel_operator import podspec as ps
from qmodel_operator.gpu import GpuClass
from qmodel_operator.settings import Settings
from qmodel_operator.spec import ModelFacts, QuantizedModelSpec, Serving

PORT = 8000
TERMINATION_LOG = "/dev/termination-log"  # the container's default terminationMessagePath
SERVER_CONTAINER = "server"
STARTUP_PERIOD_SECONDS = 10


@dataclass(frozen=True)
class Served:
    """The revision being served: what the Deployments run and what sizes them."""

    revision: str
    artifact_uri: str
    bits: int
    group_size: int
    model: ModelFacts


@dataclass(frozen=True)
class Placement:
    deployment: str
    gpu_class: GpuClass
    sizing: est.Sizing
    exact: bool  # spread: only this class; single: this class and every larger one


@dataclass(frozen=True)
class NoFit:
    reason: str
    message: str


def shape_of(facts: ModelFacts) -> est.ModelShape:
    return est.ModelShape(
        layers=facts.layers,
        hidden_size=facts.hidden_size,
        intermediate_size=facts.intermediate_size,
        heads=facts.heads,
        kv_heads=facts.kv_heads,
        head_dim=facts.head_dim,
        vocab_size=facts.vocab_size,
        tied_embeddings=facts.tied_embeddings,
        max_position_embeddings=facts.max_position_embeddings,
    )


def _no_fit(needed: int, classes: tuple[GpuClass, ...], max_model_len: int) -> NoFit:
    largest = classes[-1]
    products = f" ({', '.join(largest.products)})" if largest.products else ""
    return NoFit(
        "NoFittingGPU",
        f"needs {est.gib(needed)} per GPU for maxModelLen {max_model_len}; largest class has "
        f"{est.mib_to_gib(largest.memory_mib)}{products}. Lower serving.maxModelLen or "
        "serving.maxBatchSize, use fewer bits, or add larger GPUs",
    )


def place(
    model_name: str, serving: Serving, served: Served, classes: tuple[GpuClass, ...], budget: est.Budget
) -> tuple[Placement, ...] | NoFit:
    """The Deployments for ``served`` on the GPU classes available now."""
    shape = shape_of(served.model)
    context = shape.max_position_embeddings
    max_len = serving.max_model_len or est.default_max_model_len(shape, budget)
    if max_len > context:
        return NoFit(
            "MaxModelLenTooLong",
            f"serving.maxModelLen {max_len} exceeds the model's context of {context} tokens; "
            f"set it to at most {context}",
        )
    floor = serving.gpu.min_memory_mib or 0
    candidates = tuple(c for c in classes if c.memory_mib >= floor)
    if not candidates:
        wanted = f" with {', '.join(serving.gpu.products)}" if serving.gpu.products else ""
        above = f" of at least {floor} MiB" if floor else ""
        message = f"no schedulable node has GPUs{above}{wanted} (GPU Feature Discovery labels)"
        return NoFit("NoGPUNodes", message)
    sized = []
    for cls in candidates:
        sizing = est.size_for_gpu(
            shape, served.bits, served.group_size, cls.memory_mib, max_len, serving.max_batch_size, budget
        )
        if sizing is not None:
            sized.append((cls, sizing))
    if not sized:
        needed = est.required_memory_bytes(
            shape, served.bits, served.group_size, max_len, serving.max_batch_size, budget
        )
        return _no_fit(needed, candidates, max_len)
    if serving.placement == "single":
        cls, sizing = sized[0]
        return (Placement(model_name, cls, sizing, exact=False),)
    return tuple(Placement(f"{model_name}-{cls.name}", cls, sizing, exact=True) for cls, sizing in sized)


def endpoint(ref: ps.ModelRef) -> str:
    return f"http://{ref.name}.{ref.namespace}.svc:{PORT}/v1"


def build_service(ref: ps.ModelRef) -> dict[str, Any]:
    """One Service in front of every Deployment of the model."""
    return ps.with_spec_hash(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": ref.name,
                "namespace": ref.namespace,
                "labels": ps.labels(ref, ps.COMPONENT_SERVER),
                "ownerReferences": [ps.owner_reference(ref)],
            },
            "spec": {
                "type": "ClusterIP",
                "selector": {ps.LABEL_MODEL: ref.name, ps.LABEL_COMPONENT: ps.COMPONENT_SERVER},
                "ports": [{"name": "http", "port": PORT, "targetPort": "http", "protocol": "TCP"}],
            },
        }
    )


def _server_args(serving: Serving, served: Served, placement: Placement, model_name: str) -> list[str]:
    sizing = placement.sizing
    return [
        "--artifact", served.artifact_uri,
        "--port", str(PORT),
        "--served-model-name", serving.served_model_name or model_name,
        "--max-model-len", str(sizing.max_model_len),
        "--max-batch-size", str(sizing.max_batch_size),
        "--kv-cache-tokens", str(sizing.kv_cache_tokens),
        # A refused artifact: the reason becomes the container's last state (podhealth.py).
        "--termination-log", TERMINATION_LOG,
    ]  # fmt: skip


def _probes(serving: Serving) -> dict[str, Any]:
    def http(path: str) -> dict[str, Any]:
        return {"path": path, "port": "http"}

    return {
        # Fetching, verifying and loading a checkpoint can take many minutes; until the startup
        # probe passes, liveness does not run, so a slow load is never killed as a hang.
        "startupProbe": {
            "httpGet": http("/health/live"),
            "periodSeconds": STARTUP_PERIOD_SECONDS,
            "failureThreshold": math.ceil(serving.startup_timeout_seconds / STARTUP_PERIOD_SECONDS),
        },
        "readinessProbe": {"httpGet": http("/health/ready"), "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {
            "httpGet": http("/health/live"),
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": 6,
        },
    }


def _server_pod(
    ref: ps.ModelRef, spec: QuantizedModelSpec, served: Served, placement: Placement, settings: Settings
) -> dict[str, Any]:
    """The serving pod: the runtime with its sized arguments, probes, GPU and placement."""
    serving = spec.serving
    cls = placement.gpu_class
    claim = ps.pvc_claim(served.artifact_uri)
    pvc_volumes, pvc_mounts = ps.pvc_mounts([claim] if claim else [], (), settings.pvc_root)
    scratch, scratch_mounts = ps.scratch_volumes()
    affinity = (
        ps.gpu_affinity(memory_mib=[cls.memory_mib], products=serving.gpu.products)
        if placement.exact
        else ps.gpu_affinity(min_memory_mib=cls.memory_mib, products=serving.gpu.products)
    )
    container = {
        "name": SERVER_CONTAINER,
        "image": settings.runtime_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["python", "-m", "qmodel_runtime.serve"],
        "args": _server_args(serving, served, placement, ref.name),
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        "env": [*ps.base_env(settings.pvc_root), *ps.secret_env(spec.artifacts.credentials_secret)],
        "resources": ps.merge_resources(settings.serving_resources, serving.resources, serving.gpu.count),
        "volumeMounts": scratch_mounts + pvc_mounts,
        "securityContext": ps.container_security_context(),
        **_probes(serving),
    }
    return ps.pod_spec(
        container,
        scratch + pvc_volumes,
        serving,
        uid=settings.runtime_uid,
        default_tolerations=settings.tolerations,
        default_node_selector=settings.node_selector,
        service_account=settings.serving_service_account,
        affinity=affinity,
    )


def build_deployment(
    ref: ps.ModelRef, spec: QuantizedModelSpec, served: Served, placement: Placement, settings: Settings
) -> dict[str, Any]:
    """The runtime Deployment for one placement, owned by the model."""
    serving = spec.serving
    cls = placement.gpu_class
    selector = {ps.LABEL_MODEL: ref.name, ps.LABEL_DEPLOYMENT: placement.deployment}
    pod_labels = {
        **serving.pod_labels,
        **ps.labels(ref, ps.COMPONENT_SERVER, **{ps.LABEL_REVISION: served.revision}),
        ps.LABEL_DEPLOYMENT: placement.deployment,
        ps.LABEL_GPU_CLASS: cls.name,
    }
    rolling = {"maxSurge": serving.strategy.max_surge, "maxUnavailable": serving.strategy.max_unavailable}
    return ps.with_spec_hash(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {
                "name": placement.deployment,
                "namespace": ref.namespace,
                "labels": ps.labels(ref, ps.COMPONENT_SERVER, **{ps.LABEL_GPU_CLASS: cls.name}),
                "annotations": {ps.ANNOTATION_REVISION: served.revision},
                "ownerReferences": [ps.owner_reference(ref)],
            },
            "spec": {
                "replicas": serving.replicas,
                "revisionHistoryLimit": 3,
                "progressDeadlineSeconds": serving.startup_timeout_seconds + 600,
                "selector": {"matchLabels": selector},
                "strategy": {"type": "RollingUpdate", "rollingUpdate": rolling},
                "template": {
                    "metadata": {
                        "labels": pod_labels,
                        "annotations": {**serving.pod_annotations, ps.ANNOTATION_REVISION: served.revision},
                    },
                    "spec": _server_pod(ref, spec, served, placement, settings),
                },
            },
        }
    )
