"""Pydantic models of the QuantizedModel custom resource, mirroring crds/quantizedmodel.yaml.

The CRD is the source of truth: names, types, enums, bounds and defaults here are checked
against it field by field (tests/operator_tests/test_crd_drift.py), and so is every status
field the operator writes (the API server prunes fields the schema does not list).
The cross-field rules repeat the CRD's CEL rules so that a spec built in Python (tests, the
demo) fails the same way the API server would.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator
from pydantic.alias_generators import to_camel

# One pattern per URI kind, identical to the CRD's (the drift test compares them).
STORAGE_URI = (
    r"^(s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\x00-\x20\x7f-\x9f]*)?|file:///[^\x00-\x20\x7f-\x9f]*"
    r"|pvc://[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?(/[^\x00-\x20\x7f-\x9f]*)?)$"
)
DATASET = (
    r"^(wiki-vital|s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/\S+|file:///\S+"
    r"|pvc://[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?/\S+)$"
)
SECRET_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# Non-negative, and exponents of at most two digits: given "1e-7907297307251171", which an
# earlier pattern admitted, the API server spent minutes and gigabytes comparing it with a limit
# and never answered the Job's create (tests/reliability_tests/test_bad_input.py: 4.7 GB in 3 min).
QUANTITY = r"^\+?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE][+-]?[0-9]{1,2}))?$"
# Kubernetes label values, and toleration keys (a label key, or empty).
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"
TOLERATION_KEY = (
    r"^(([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"
)
NO_CONTROL = r"^[^\x00-\x1f\x7f-\x9f]*$"
RESERVED_LABEL_PREFIXES = ("qmodel.dev/", "app.kubernetes.io/")


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


# --- spec ---------------------------------------------------------------------------------


class Source(_Model):
    uri: str = Field(pattern=STORAGE_URI, max_length=1024)
    credentials_secret: str | None = Field(None, pattern=SECRET_NAME, max_length=253)


class Calibration(_Model):
    dataset: str = Field("wiki-vital", pattern=DATASET, max_length=1024)
    samples: int = Field(128, ge=1, le=4096)
    sequence_length: int = Field(2048, ge=16, le=131072)
    seed: int = Field(0, ge=0, le=4294967295)


class Quantization(_Model):
    method: Literal["gptq", "rtn"] = "gptq"
    bits: Literal[2, 3, 4, 8] = 4
    group_size: int = Field(128, ge=-1, le=65536)
    desc_act: bool = False
    symmetric: bool = True
    damp_percent: float = Field(0.01, gt=0, le=1)
    static_groups: bool = False
    true_sequential: bool = True
    calibration: Calibration = Calibration()

    @model_validator(mode="after")
    def _cel_rules(self) -> Quantization:
        if self.group_size == 0:
            raise ValueError("groupSize must be -1 (per output channel) or a positive number of rows")
        if self.static_groups and not self.desc_act:
            raise ValueError("staticGroups requires descAct")
        if self.static_groups and self.group_size == -1:
            raise ValueError("staticGroups needs groups; set groupSize to a positive value")
        if self.method != "gptq" and (self.desc_act or self.static_groups):
            raise ValueError("descAct and staticGroups apply to method gptq only")
        return self


class Validation(_Model):
    dataset: str = Field("wiki-vital", pattern=DATASET, max_length=1024)
    sequence_length: int = Field(2048, ge=16, le=131072)
    max_samples: int | None = Field(None, ge=1, le=1000000)
    max_perplexity_increase_percent: float = Field(2.0, ge=0, le=10000)
    max_perplexity: float | None = Field(None, ge=1)


class Artifacts(_Model):
    uri: str = Field(pattern=STORAGE_URI, max_length=1024)
    credentials_secret: str | None = Field(None, pattern=SECRET_NAME, max_length=253)
    delete_policy: Literal["Retain", "Delete"] = "Retain"


Quantity = Annotated[int, Field(ge=0)] | Annotated[str, StringConstraints(max_length=64, pattern=QUANTITY)]
LabelValue = Annotated[str, StringConstraints(max_length=63, pattern=LABEL_VALUE)]


# What each quantity suffix multiplies by: binary (Ki..Ei) and decimal (n..E).
_SUFFIXES = {
    **{s: Decimal(1024) ** (i + 1) for i, s in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"))},
    **{s: Decimal(1000) ** (i - 3) for i, s in enumerate(("n", "u", "m", "", "k", "M", "G", "T", "P", "E"))},
}


def quantity_value(value: int | str) -> Decimal:
    """A Kubernetes quantity as a number ("1.5Gi", "100m", "1e3", 2), for comparing amounts."""
    if isinstance(value, int):
        return Decimal(value)
    number = re.match(r"\+?([0-9.]+)", value)
    if not number or not re.fullmatch(QUANTITY, value):
        raise ValueError(f"{value!r} is not a Kubernetes quantity (such as 4, 500m or 16Gi)")
    suffix = value[number.end() :]
    if suffix[:1] in ("e", "E"):
        return Decimal(number.group(1)) * Decimal(10) ** int(suffix[1:])
    return Decimal(number.group(1)) * _SUFFIXES[suffix]


class Resources(_Model):
    requests: dict[str, Quantity] = Field({}, max_length=32)
    limits: dict[str, Quantity] = Field({}, max_length=32)


class Toleration(_Model):
    key: str | None = Field(None, max_length=317, pattern=TOLERATION_KEY)
    operator: Literal["Exists", "Equal"] | None = None
    value: LabelValue | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute", ""] | None = None
    toleration_seconds: int | None = None


class PodPlacement(_Model):
    """What the serving pods and the Job's pod share: resources and where they may run."""

    resources: Resources = Resources()
    node_selector: dict[str, LabelValue] = Field({}, max_length=64)
    tolerations: list[Toleration] = Field([], max_length=64)
    pod_annotations: dict[str, str] = Field({}, max_length=64)
    pod_labels: dict[str, LabelValue] = Field({}, max_length=64)

    @model_validator(mode="after")
    def _reserved_labels(self) -> PodPlacement:
        reserved = [k for k in self.pod_labels if k.startswith(RESERVED_LABEL_PREFIXES)]
        if reserved:
            raise ValueError(
                f"podLabels may not use the qmodel.dev/ or app.kubernetes.io/ prefixes: {reserved}"
            )
        return self


class ServingGpu(_Model):
    count: int = Field(1, ge=1, le=1)
    min_memory_mib: int | None = Field(None, ge=1024, le=4194304, alias="minMemoryMiB")
    products: list[LabelValue] = Field([], max_length=32)


class Strategy(_Model):
    max_surge: int = Field(0, ge=0, le=100)
    max_unavailable: int = Field(1, ge=0, le=100)

    @model_validator(mode="after")
    def _can_progress(self) -> Strategy:
        if self.max_surge + self.max_unavailable < 1:
            raise ValueError("maxSurge and maxUnavailable cannot both be 0")
        return self


class Serving(PodPlacement):
    enabled: bool = True
    replicas: int = Field(1, ge=0, le=1000)
    served_model_name: str | None = Field(None, max_length=253, pattern=NO_CONTROL)
    max_model_len: int | None = Field(None, ge=16, le=1048576)
    max_batch_size: int | None = Field(None, ge=1, le=4096)
    placement: Literal["single", "spread"] = "single"
    gpu: ServingGpu = ServingGpu()
    strategy: Strategy = Strategy()
    startup_timeout_seconds: int = Field(1800, ge=60, le=86400)


class JobGpu(_Model):
    min_memory_mib: int | None = Field(None, ge=1024, le=4194304, alias="minMemoryMiB")
    products: list[LabelValue] = Field([], max_length=32)


class Jobs(PodPlacement):
    backoff_limit: int = Field(1, ge=0, le=10)
    active_deadline_seconds: int = Field(21600, ge=60, le=604800)
    gpu: JobGpu = JobGpu()


class QuantizedModelSpec(_Model):
    source: Source
    quantization: Quantization = Quantization()
    validation: Validation = Validation()
    artifacts: Artifacts
    serving: Serving = Serving()
    jobs: Jobs = Jobs()


# --- status -------------------------------------------------------------------------------

Phase = Literal["Pending", "Quantizing", "Validating", "Deploying", "Ready", "Rejected", "Failed"]
ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(_Model):
    """metav1.Condition."""

    type: str
    status: ConditionStatus
    reason: str
    message: str
    observed_generation: int | None = None
    last_transition_time: str


class QuantizationStatus(_Model):
    revision: str | None = None
    job: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    seconds: float | None = None
    quantize_seconds: float | None = None
    evaluate_seconds: float | None = None


class ValidationStatus(_Model):
    baseline_perplexity: float | None = None
    quantized_perplexity: float | None = None
    increase_percent: float | None = None
    max_perplexity_increase_percent: float | None = None
    passed: bool | None = None


class ArtifactStatus(_Model):
    uri: str | None = None
    manifest_digest: str | None = None
    size_bytes: int | None = None
    compression_ratio: float | None = None


class ModelFacts(_Model):
    """The model's shape as the quantize Job reports it (docs/contracts.md, result.model).

    ``source_uri`` is not in the Job's report: the operator records which source it describes.
    Unknown keys are ignored so a newer runtime image may report more.
    """

    model_config = ConfigDict(extra="ignore")

    source_uri: str | None = None
    architecture: str | None = None
    layers: int
    hidden_size: int
    intermediate_size: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    tied_embeddings: bool = False
    max_position_embeddings: int
    parameters: int | None = None


class DeploymentStatus(_Model):
    name: str
    gpu_class: str | None = None
    gpu_memory_mib: int | None = Field(None, alias="gpuMemoryMiB")
    replicas: int | None = None
    ready_replicas: int | None = None
    max_model_len: int | None = None
    max_batch_size: int | None = None
    kv_cache_tokens: int | None = None


class ServingStatus(_Model):
    revision: str | None = None
    artifact_uri: str | None = None
    bits: int | None = None
    group_size: int | None = None
    model: ModelFacts | None = None
    deployments: list[DeploymentStatus] = []
    service: str | None = None
    replicas: int | None = None
    ready_replicas: int | None = None
    endpoint: str | None = None


class QuantizedModelStatus(_Model):
    phase: Phase | None = None
    observed_generation: int | None = None
    revision: str | None = None
    conditions: list[Condition] = []
    quantization: QuantizationStatus = QuantizationStatus()
    validation: ValidationStatus = ValidationStatus()
    artifact: ArtifactStatus = ArtifactStatus()
    model: ModelFacts | None = None
    serving: ServingStatus = ServingStatus()

    def condition(self, type_: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_), None)

    def to_body(self) -> dict:
        """The JSON written to the status subresource (absent values left out)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")
