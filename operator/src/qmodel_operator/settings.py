"""Operator settings: read from the environment once at startup into a frozen object.

Nothing here runs at import time; ``Settings.from_env(os.environ)`` is called by ``__main__``
and the result is passed explicitly to everything that needs it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from qmodel_operator import __version__

# Our own prefix, so the runtime's QMODEL_* variables in a shared shell never collide and an
# unknown name under it can be rejected as a typo.
PREFIX = "QMODEL_OPERATOR_"
LOG_FORMATS = ("plain", "json")
PULL_POLICIES = ("Always", "IfNotPresent", "Never")


class SettingsError(ValueError):
    """A setting in the environment cannot be used; the message names it and says how to fix it."""


@dataclass(frozen=True)
class Settings:
    """Everything the operator can be configured with (environment variable in brackets)."""

    # Namespaces to watch [QMODEL_OPERATOR_NAMESPACES, comma-separated]; empty watches all namespaces.
    namespaces: tuple[str, ...] = ()
    # The image of the quantize Jobs, runtime pods and clean-up Jobs [QMODEL_OPERATOR_RUNTIME_IMAGE].
    runtime_image: str = f"ghcr.io/qmodel-dev/qmodel-runtime:{__version__}"
    image_pull_policy: str = "IfNotPresent"  # [QMODEL_OPERATOR_IMAGE_PULL_POLICY]
    # Default resources, merged under each model's spec.jobs/spec.serving resources
    # [QMODEL_OPERATOR_JOB_RESOURCES, QMODEL_OPERATOR_SERVING_RESOURCES]: JSON such as
    # {"requests": {"cpu": "2"}, "limits": {"memory": "8Gi"}}.
    # A quantize Job holds one decoder layer and the calibration activations on the GPU but
    # streams the model through host memory: 16 GiB covers a 7B model's fp16 shards being read.
    job_resources: Mapping[str, Any] = field(
        default_factory=lambda: {"requests": {"cpu": "2", "memory": "16Gi"}, "limits": {"memory": "32Gi"}}
    )
    serving_resources: Mapping[str, Any] = field(
        default_factory=lambda: {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"memory": "16Gi"}}
    )
    # GPU memory a quantize Job asks for while the model's shape is not known yet
    # [QMODEL_OPERATOR_JOB_MIN_GPU_MEMORY_MIB]. The estimator puts a 13B Llama at 10.9 GiB with
    # 128 x 2048 calibration tokens (7B: 8.5 GiB, 70B: 22.2 GiB; set spec.jobs.gpu for those).
    job_min_gpu_memory_mib: int = 16384
    job_service_account: str = ""  # [QMODEL_OPERATOR_JOB_SERVICE_ACCOUNT]; "" = the namespace default
    serving_service_account: str = ""  # [QMODEL_OPERATOR_SERVING_SERVICE_ACCOUNT]
    # The uid/gid the runtime image runs as [QMODEL_OPERATOR_RUNTIME_UID]; pods run as non-root.
    runtime_uid: int = 10001
    # Where claims are mounted, as the runtime expects them [QMODEL_OPERATOR_PVC_ROOT].
    pvc_root: str = "/mnt/pvc"
    # Finished quantize Jobs of old revisions kept for their logs and results, besides the current
    # and the serving revision's [QMODEL_OPERATOR_JOB_HISTORY].
    job_history: int = 3
    # The artifact clean-up Job: pod retries and wall-clock bound [QMODEL_OPERATOR_CLEANUP_BACKOFF_LIMIT,
    # QMODEL_OPERATOR_CLEANUP_DEADLINE_SECONDS]; after that the finalizer is removed with a Warning event.
    cleanup_backoff_limit: int = 2
    cleanup_deadline_seconds: int = 900
    # Reconcile every model again at this interval even without events [QMODEL_OPERATOR_RESYNC_SECONDS].
    resync_seconds: float = 300.0
    # Reconciles running at once [QMODEL_OPERATOR_WORKERS], twice: once for new or changed models,
    # once for the rest. Bounds the burst on the API server (its default in-flight limit is 400).
    workers: int = 64
    log_format: str = "plain"  # [QMODEL_OPERATOR_LOG_FORMAT] plain | json
    log_level: str = "INFO"  # [QMODEL_OPERATOR_LOG_LEVEL]
    health_port: int = 8080  # [QMODEL_OPERATOR_HEALTH_PORT] kopf's liveness endpoint /healthz; 0 disables
    metrics_port: int = 8081  # [QMODEL_OPERATOR_METRICS_PORT] Prometheus /metrics; 0 disables
    # Placement defaults for every pod the operator creates (quantize, serving and clean-up):
    # tolerations added to the always-present nvidia.com/gpu one [QMODEL_OPERATOR_TOLERATIONS, a JSON
    # list] (e.g. AKS GPU pools carry sku=gpu:NoSchedule), and node labels required unless the
    # model's own nodeSelector sets the same key [QMODEL_OPERATOR_NODE_SELECTOR, a JSON object].
    tolerations: tuple[Mapping[str, Any], ...] = ()
    node_selector: Mapping[str, str] = field(default_factory=dict)
    # kopf peering [QMODEL_OPERATOR_PEERING]: "" runs standalone (one replica, the chart's default);
    # a name uses kopf's KopfPeering objects so only one of several replicas is active.
    peering: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Parse ``QMODEL_OPERATOR_*`` variables; unknown ones are rejected so typos do not pass silently."""
        known = {f"{PREFIX}{name}" for name in _PARSERS}
        unknown = sorted(k for k in env if k.startswith(PREFIX) and k not in known)
        if unknown:
            raise SettingsError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        values = {}
        for name, (attr, parse) in _PARSERS.items():
            raw = env.get(f"{PREFIX}{name}")
            if raw is None or raw == "":
                continue
            try:
                values[attr] = parse(raw)
            except (ValueError, TypeError) as e:
                raise SettingsError(f"{PREFIX}{name}={raw!r}: {e}") from None
        return cls(**values)


def _namespaces(raw: str) -> tuple[str, ...]:
    return tuple(sorted({ns.strip() for ns in raw.split(",") if ns.strip()}))


def _resources(raw: str) -> dict[str, Any]:
    value = json.loads(raw)
    if not isinstance(value, dict) or set(value) - {"requests", "limits"}:
        raise ValueError('expected JSON like {"requests": {"cpu": "2"}, "limits": {"memory": "8Gi"}}')
    return value


TOLERATION_KEYS = {"key", "operator", "value", "effect", "tolerationSeconds"}


def _tolerations(raw: str) -> tuple[dict[str, Any], ...]:
    value = json.loads(raw)
    if not isinstance(value, list) or not all(
        isinstance(t, dict) and t and set(t) <= TOLERATION_KEYS for t in value
    ):
        raise ValueError(
            'expected a JSON list of tolerations like [{"key": "sku", "operator": "Equal", "value": "gpu", '
            f'"effect": "NoSchedule"}}] (keys: {", ".join(sorted(TOLERATION_KEYS))})'
        )
    return tuple(value)


def _node_selector(raw: str) -> dict[str, str]:
    value = json.loads(raw)
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ValueError('expected a JSON object of node labels like {"node-pool": "gpu"}')
    return value


def _choice(options: tuple[str, ...]):
    def parse(raw: str) -> str:
        for option in options:
            if raw.lower() == option.lower():
                return option
        raise ValueError(f"expected one of {', '.join(options)}")

    return parse


def _int_at_least(low: int):
    def parse(raw: str) -> int:
        value = int(raw)
        if value < low:
            raise ValueError(f"must be >= {low}")
        return value

    return parse


def _positive_float(raw: str) -> float:
    value = float(raw)
    if value <= 0:
        raise ValueError("must be > 0")
    return value


def _port(raw: str) -> int:
    value = int(raw)
    if not 0 <= value <= 65535:
        raise ValueError("must be a TCP port (0 disables)")
    return value


_PARSERS = {
    "NAMESPACES": ("namespaces", _namespaces),
    "RUNTIME_IMAGE": ("runtime_image", str),
    "IMAGE_PULL_POLICY": ("image_pull_policy", _choice(PULL_POLICIES)),
    "JOB_RESOURCES": ("job_resources", _resources),
    "SERVING_RESOURCES": ("serving_resources", _resources),
    "JOB_MIN_GPU_MEMORY_MIB": ("job_min_gpu_memory_mib", _int_at_least(0)),
    "JOB_SERVICE_ACCOUNT": ("job_service_account", str),
    "SERVING_SERVICE_ACCOUNT": ("serving_service_account", str),
    "RUNTIME_UID": ("runtime_uid", _int_at_least(1)),
    "PVC_ROOT": ("pvc_root", str),
    "JOB_HISTORY": ("job_history", _int_at_least(0)),
    "CLEANUP_BACKOFF_LIMIT": ("cleanup_backoff_limit", _int_at_least(0)),
    "CLEANUP_DEADLINE_SECONDS": ("cleanup_deadline_seconds", _int_at_least(30)),
    "RESYNC_SECONDS": ("resync_seconds", _positive_float),
    "WORKERS": ("workers", _int_at_least(1)),
    "LOG_FORMAT": ("log_format", _choice(LOG_FORMATS)),
    "LOG_LEVEL": ("log_level", _choice(("DEBUG", "INFO", "WARNING", "ERROR"))),
    "HEALTH_PORT": ("health_port", _port),
    "METRICS_PORT": ("metrics_port", _port),
    "TOLERATIONS": ("tolerations", _tolerations),
    "NODE_SELECTOR": ("node_selector", _node_selector),
    "PEERING": ("peering", str),
}
