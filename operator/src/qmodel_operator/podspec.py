"""Pieces every pod the operator builds shares: labels, owner, credentials, volumes, placement.

All pure functions returning plain dicts (the shapes of the Kubernetes API).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from qmodel_operator.gpu import GPU_RESOURCE, MEMORY_LABEL, PRODUCT_LABEL
from qmodel_operator.spec import PodPlacement, Resources, Toleration, quantity_value

GROUP = "qmodel.dev"
API_VERSION = f"{GROUP}/v1alpha1"
KIND = "QuantizedModel"
MANAGED_BY = "qmodel-operator"
FIELD_MANAGER = "qmodel-operator"

LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_MODEL = f"{GROUP}/model"
LABEL_REVISION = f"{GROUP}/revision"
LABEL_DEPLOYMENT = f"{GROUP}/deployment"
LABEL_GPU_CLASS = f"{GROUP}/gpu-class"
ANNOTATION_REVISION = f"{GROUP}/revision"
ANNOTATION_SPEC_HASH = f"{GROUP}/spec-hash"

COMPONENT_QUANTIZE = "quantize"
COMPONENT_SERVER = "server"
COMPONENT_CLEANUP = "cleanup"

# The keys a credentials Secret may hold (each optional), as the runtime's storage reads them.
SECRET_KEYS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_REGION",
)
CACHE_DIR = "/var/cache/qmodel"


@dataclass(frozen=True)
class ModelRef:
    """Identity of one QuantizedModel: enough to name, label and own its children."""

    namespace: str
    name: str
    uid: str


def owner_reference(ref: ModelRef) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": ref.name,
        "uid": ref.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def labels(ref: ModelRef, component: str, **extra: str) -> dict[str, str]:
    return {
        LABEL_NAME: "qmodel",
        LABEL_INSTANCE: ref.name,
        LABEL_COMPONENT: component,
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_MODEL: ref.name,
        **extra,
    }


def secret_env(secret: str | None, prefix: str = "") -> list[dict[str, Any]]:
    """Environment variables from a credentials Secret, by reference (never by value)."""
    if not secret:
        return []
    env = [
        {
            "name": f"{prefix}{key}",
            "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": True}},
        }
        for key in SECRET_KEYS
    ]
    # boto3 reads AWS_DEFAULT_REGION; the Secret has one region key for both names.
    env.append(
        {
            "name": f"{prefix}AWS_DEFAULT_REGION",
            "valueFrom": {"secretKeyRef": {"name": secret, "key": "AWS_REGION", "optional": True}},
        }
    )
    return env


def pvc_claim(uri: str) -> str | None:
    """The claim of a ``pvc://claim/path`` URI, else None."""
    if not uri.startswith("pvc://"):
        return None
    return uri[len("pvc://") :].split("/", 1)[0]


def pvc_mounts(
    read_only: Iterable[str], writable: Iterable[str], pvc_root: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, volumeMounts) mounting each claim at ``<pvc_root>/<claim>``, as the runtime expects.

    A claim used both ways is mounted writable once.
    """
    rw = sorted(set(writable))
    ro = sorted(set(read_only) - set(rw))
    volumes, mounts = [], []
    for i, (claim, readonly) in enumerate([(c, False) for c in rw] + [(c, True) for c in ro]):
        volume = f"pvc-{i}"
        volumes.append({"name": volume, "persistentVolumeClaim": {"claimName": claim, "readOnly": readonly}})
        mounts.append({"name": volume, "mountPath": f"{pvc_root.rstrip('/')}/{claim}", "readOnly": readonly})
    return volumes, mounts


def scratch_volumes() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """/tmp and the download cache as emptyDirs: the root filesystem is read-only."""
    volumes = [{"name": "tmp", "emptyDir": {}}, {"name": "cache", "emptyDir": {}}]
    mounts = [{"name": "tmp", "mountPath": "/tmp"}, {"name": "cache", "mountPath": CACHE_DIR}]
    return volumes, mounts


def base_env(pvc_root: str) -> list[dict[str, Any]]:
    return [
        {"name": "QMODEL_CACHE", "value": CACHE_DIR},
        {"name": "QMODEL_PVC_ROOT", "value": pvc_root},
        {"name": "HOME", "value": "/tmp"},
    ]


def merge_resources(defaults: Mapping[str, Any], spec: Resources, gpus: int) -> dict[str, Any]:
    """The operator's defaults, overridden key by key by the spec, with the GPU count set.

    A default never contradicts the spec: a request above the default limit raises that limit,
    and a limit below the default request lowers that request (the API server would refuse a
    request over its limit). Both sides given in the spec are the CRD's to check.
    """
    requests = {**(defaults.get("requests") or {}), **spec.requests}
    limits = {**(defaults.get("limits") or {}), **spec.limits}
    for key in requests.keys() & limits.keys():
        if quantity_value(requests[key]) <= quantity_value(limits[key]):
            continue
        if key in spec.requests and key not in spec.limits:
            limits[key] = requests[key]
        elif key in spec.limits and key not in spec.requests:
            requests[key] = limits[key]
    if gpus:
        requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = gpus
    return {part: merged for part, merged in (("requests", requests), ("limits", limits)) if merged}


def gpu_affinity(
    *, min_memory_mib: int | None = None, memory_mib: Iterable[int] = (), products: Iterable[str] = ()
) -> dict[str, Any]:
    """Required node affinity to GPU nodes: at least ``min_memory_mib``, or exactly one of
    ``memory_mib``, and one of ``products`` when given. Nodes without GFD labels never match."""
    sizes = sorted(set(memory_mib))
    if sizes:
        memory = {"key": MEMORY_LABEL, "operator": "In", "values": [str(m) for m in sizes]}
    elif min_memory_mib:
        memory = {"key": MEMORY_LABEL, "operator": "Gt", "values": [str(min_memory_mib - 1)]}
    else:
        memory = {"key": MEMORY_LABEL, "operator": "Exists"}
    expressions = [memory]
    wanted = sorted(set(products))
    if wanted:
        expressions.append({"key": PRODUCT_LABEL, "operator": "In", "values": wanted})
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": expressions}]
            }
        }
    }


def tolerations(
    extra: Iterable[Toleration], defaults: Iterable[Mapping[str, Any]] = ()
) -> list[dict[str, Any]]:
    """Tolerate the taint GPU node pools usually carry, the operator's defaults, and the spec's own."""
    gpu = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
    return [
        gpu,
        *(dict(t) for t in defaults),
        *(t.model_dump(by_alias=True, exclude_none=True) for t in extra),
    ]


def pod_security_context(uid: int) -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": uid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def pod_spec(
    container: dict[str, Any],
    volumes: list[dict[str, Any]],
    placement: PodPlacement,
    *,
    uid: int,
    service_account: str = "",
    affinity: dict[str, Any] | None = None,
    restart_policy: str | None = None,
    default_tolerations: Iterable[Mapping[str, Any]] = (),
    default_node_selector: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A hardened pod: no API token, non-root, the GPU toleration plus the operator's default
    placement and the spec's own (the spec's nodeSelector wins key by key)."""
    spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "securityContext": pod_security_context(uid),
        "tolerations": tolerations(placement.tolerations, default_tolerations),
        "containers": [container],
        "volumes": volumes,
    }
    if restart_policy:
        spec["restartPolicy"] = restart_policy
    if affinity:
        spec["affinity"] = affinity
    node_selector = {**(default_node_selector or {}), **placement.node_selector}
    if node_selector:
        spec["nodeSelector"] = node_selector
    if service_account:
        spec["serviceAccountName"] = service_account
    return spec


def spec_hash(manifest: Mapping[str, Any]) -> str:
    """A digest of a desired manifest; stored on the object so unchanged ones are not re-sent."""
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def with_spec_hash(manifest: dict[str, Any]) -> dict[str, Any]:
    manifest["metadata"].setdefault("annotations", {})[ANNOTATION_SPEC_HASH] = spec_hash(manifest)
    return manifest


def prefix_uri(uri: str, *segments: str) -> str:
    """``prefix_uri("s3://b/p", "m", "")`` -> ``s3://b/p/m/`` (segments joined below the prefix)."""
    base = uri if uri.endswith("/") else uri + "/"
    return base + "/".join(segments)
