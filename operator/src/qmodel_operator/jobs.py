"""Pure builders of the quantize Job, its input document, and the artifact clean-up Job."""

from __future__ import annotations

import json
from typing import Any

from qmodel_operator import podspec as ps
from qmodel_operator.settings import Settings
from qmodel_operator.spec import QuantizedModelSpec

QUANTIZE_CONTAINER = "quantize"
CLEANUP_CONTAINER = "cleanup"
JOB_INPUT_ENV = "QMODEL_JOB_INPUT"
JOB_INPUT_KIND = "QuantizeJobInput"


def quantize_job_name(model: str, revision: str) -> str:
    """Deterministic per revision, so a restarted operator finds the Job instead of adding one.

    At most 45 + 3 + 12 = 60 characters (the CRD caps names at 45): Job names become the
    ``job-name`` label on pods, which must stay within 63.
    """
    return f"{model}-q-{revision.removeprefix('r-')}"


def cleanup_job_name(ref: ps.ModelRef) -> str:
    # The uid, not a counter: a new model of the same name never adopts an old clean-up Job.
    return f"{ref.name}-cleanup-{ref.uid[:8]}"


def model_prefix(spec: QuantizedModelSpec, model: str) -> str:
    """``<artifacts.uri>/<model>/``: every revision of this model lives below it."""
    return ps.prefix_uri(spec.artifacts.uri, model, "")


def build_job_input(ref: ps.ModelRef, spec: QuantizedModelSpec, revision: str) -> dict[str, Any]:
    """The document ``python -m qmodel_runtime.jobs.quantize`` reads (docs/contracts.md).

    Credentials are not in it: the pod gets them from the Secrets as environment variables.
    """
    return {
        "apiVersion": ps.API_VERSION,
        "kind": JOB_INPUT_KIND,
        "model": {"namespace": ref.namespace, "name": ref.name},
        "revision": revision,
        "source": {"uri": spec.source.uri},
        "quantization": spec.quantization.model_dump(by_alias=True, mode="json"),
        "validation": spec.validation.model_dump(by_alias=True, mode="json", exclude_none=True),
        "artifacts": {"uri": spec.artifacts.uri},
    }


def _uris(spec: QuantizedModelSpec) -> tuple[list[str], list[str]]:
    """(read-only, writable) storage URIs the quantize Job touches."""
    reads = [spec.source.uri, spec.quantization.calibration.dataset, spec.validation.dataset]
    return reads, [spec.artifacts.uri]


def _claims(uris: list[str]) -> list[str]:
    return [c for c in (ps.pvc_claim(u) for u in uris) if c]


def _quantize_container(
    ref: ps.ModelRef, spec: QuantizedModelSpec, revision: str, settings: Settings
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(container, volumes) of the quantize pod: its input in the environment, credentials by
    reference, the storage claims it reads and writes mounted."""
    reads, writes = _uris(spec)
    pvc_volumes, pvc_mounts = ps.pvc_mounts(_claims(reads), _claims(writes), settings.pvc_root)
    scratch, scratch_mounts = ps.scratch_volumes()
    job_input = build_job_input(ref, spec, revision)
    env = [
        {"name": JOB_INPUT_ENV, "value": json.dumps(job_input, sort_keys=True, separators=(",", ":"))},
        *ps.base_env(settings.pvc_root),
        *ps.secret_env(spec.artifacts.credentials_secret),
        *ps.secret_env(spec.source.credentials_secret, prefix="QMODEL_SOURCE_"),
    ]
    container = {
        "name": QUANTIZE_CONTAINER,
        "image": settings.runtime_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["python", "-m", "qmodel_runtime.jobs.quantize"],
        "env": env,
        "resources": ps.merge_resources(settings.job_resources, spec.jobs.resources, gpus=1),
        "volumeMounts": scratch_mounts + pvc_mounts,
        "securityContext": ps.container_security_context(),
        # On a crash without a result, the log's tail becomes the reason shown in the status.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    return container, scratch + pvc_volumes


def build_quantize_job(
    ref: ps.ModelRef,
    spec: QuantizedModelSpec,
    revision: str,
    settings: Settings,
    min_gpu_memory_mib: int | None,
) -> dict[str, Any]:
    """The quantize Job of one revision: one GPU, on a node with enough GPU memory, owned by the model."""
    jobs = spec.jobs
    container, volumes = _quantize_container(ref, spec, revision, settings)
    pod_labels = ps.labels(ref, ps.COMPONENT_QUANTIZE, **{ps.LABEL_REVISION: revision})
    pod_spec = ps.pod_spec(
        container,
        volumes,
        jobs,
        uid=settings.runtime_uid,
        default_tolerations=settings.tolerations,
        default_node_selector=settings.node_selector,
        service_account=settings.job_service_account,
        affinity=ps.gpu_affinity(min_memory_mib=min_gpu_memory_mib, products=jobs.gpu.products),
        restart_policy="Never",
    )
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": quantize_job_name(ref.name, revision),
            "namespace": ref.namespace,
            "labels": pod_labels,
            "annotations": {ps.ANNOTATION_REVISION: revision},
            "ownerReferences": [ps.owner_reference(ref)],
        },
        "spec": {
            "backoffLimit": jobs.backoff_limit,
            "activeDeadlineSeconds": jobs.active_deadline_seconds,
            "template": {
                "metadata": {
                    "labels": {**jobs.pod_labels, **pod_labels},
                    "annotations": dict(jobs.pod_annotations),
                },
                "spec": pod_spec,
            },
        },
    }


def build_cleanup_job(ref: ps.ModelRef, spec: QuantizedModelSpec, settings: Settings) -> dict[str, Any]:
    """Removes ``<artifacts.uri>/<model>/`` (every revision) when the model is deleted.

    Not owned by the model: a foreground deletion would garbage-collect it before it ran. The
    operator deletes it itself once it has finished; ttlSecondsAfterFinished is the backstop.
    It runs where the quantize Job may (spec.jobs node selector, tolerations, pod labels and
    annotations) but needs no GPU.
    """
    claims = _claims([spec.artifacts.uri])
    pvc_volumes, pvc_mounts = ps.pvc_mounts((), claims, settings.pvc_root)
    scratch, scratch_mounts = ps.scratch_volumes()
    pod_labels = ps.labels(ref, ps.COMPONENT_CLEANUP)
    container = {
        "name": CLEANUP_CONTAINER,
        "image": settings.runtime_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["python", "-m", "qmodel_runtime.storage", "rm", model_prefix(spec, ref.name)],
        "env": [*ps.base_env(settings.pvc_root), *ps.secret_env(spec.artifacts.credentials_secret)],
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        "volumeMounts": scratch_mounts + pvc_mounts,
        "securityContext": ps.container_security_context(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec = ps.pod_spec(
        container,
        scratch + pvc_volumes,
        spec.jobs,
        uid=settings.runtime_uid,
        default_tolerations=settings.tolerations,
        default_node_selector=settings.node_selector,
        service_account=settings.job_service_account,
        restart_policy="Never",
    )
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": cleanup_job_name(ref), "namespace": ref.namespace, "labels": pod_labels},
        "spec": {
            "backoffLimit": settings.cleanup_backoff_limit,
            "activeDeadlineSeconds": settings.cleanup_deadline_seconds,
            "ttlSecondsAfterFinished": 3600,
            "template": {
                "metadata": {
                    "labels": {**spec.jobs.pod_labels, **pod_labels},
                    "annotations": dict(spec.jobs.pod_annotations),
                },
                "spec": pod_spec,
            },
        },
    }
