"""The quantize Job's input document (docs/contracts.md), validated before any heavy work.

The fields mirror the CRD's spec sections (crds/quantizedmodel.yaml is the source of truth;
tests/runtime_tests/test_quantize_job_spec.py compares them field by field). The operator
cannot import this module (its image has no torch), so the shared contract is the JSON
Schema generated from it, ``job-input.schema.json`` beside this file, kept in sync by a
test: regenerate it with ``python -m qmodel_runtime.jobs.spec``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from qmodel_runtime.quantizer import GPTQ_CLIP_STEPS, QuantConfig

SCHEMA_PATH = Path(__file__).with_name("job-input.schema.json")
API_VERSION = "qmodel.dev/v1alpha1"
KIND = "QuantizeJobInput"

# The CRD's patterns, verbatim.
STORAGE_URI = (
    r"^(s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\x00-\x20\x7f-\x9f]*)?|file:///[^\x00-\x20\x7f-\x9f]*"
    r"|pvc://[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?(/[^\x00-\x20\x7f-\x9f]*)?)$"
)
DATASET = (
    r"^(wiki-vital|s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/\S+|file:///\S+"
    r"|pvc://[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?/\S+)$"
)
SECRET_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# A DNS label: the revision and the model name become path segments and label values.
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"


class InputError(ValueError):
    """The input document is invalid; the message is one line saying what to fix."""


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class ModelRef(_Model):
    namespace: str = Field(pattern=DNS_LABEL, max_length=63)
    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$", max_length=253)


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

    @field_validator("group_size", mode="before")
    @classmethod
    def _group_size(cls, value):
        if isinstance(value, int) and not isinstance(value, bool) and value < 1 and value != -1:
            raise ValueError(
                "groupSize must be -1 (per output channel) or a positive number of rows, "
                f"such as 128; got {value}"
            )
        return value

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Quantization:
        # The CRD's CEL rules, so a document that skipped the API server fails the same way.
        if self.static_groups and not self.desc_act:
            raise ValueError(
                "staticGroups requires descAct (static groups only change act-order quantization)"
            )
        if self.static_groups and self.group_size == -1:
            raise ValueError(
                "staticGroups needs groups; set groupSize to a positive value or staticGroups to false"
            )
        if self.method != "gptq" and (self.desc_act or self.static_groups):
            raise ValueError("descAct and staticGroups apply to method gptq only; set them to false for rtn")
        return self

    def to_quant_config(self) -> QuantConfig:
        """The engine's frozen settings (the quantizer never sees pydantic objects)."""
        return QuantConfig(
            bits=self.bits,
            group_size=self.group_size,
            sym=self.symmetric,
            desc_act=self.desc_act,
            static_groups=self.static_groups,
            damp_percent=self.damp_percent,
            true_sequential=self.true_sequential,
            method=self.method,
            clip_steps=GPTQ_CLIP_STEPS if self.method == "gptq" else 0,
        )


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


class JobInput(_Model):
    """One quantize Job: which model, which revision, and the spec sections that shape it."""

    api_version: Literal["qmodel.dev/v1alpha1"]
    kind: Literal["QuantizeJobInput"]
    model: ModelRef
    revision: str = Field(pattern=DNS_LABEL, max_length=63)
    source: Source
    quantization: Quantization = Quantization()
    validation: Validation = Validation()
    artifacts: Artifacts


def parse_input(text: str) -> JobInput:
    """JSON text -> JobInput, or InputError with one line naming the first problem."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(
            f"the job input is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:  # thousands of nested brackets: no input document looks like that
        raise InputError("the job input is not a QuantizeJobInput document: nested too deeply") from None
    try:
        return JobInput.model_validate(data)
    except ValidationError as exc:
        raise InputError(describe_error(exc)) from None


def describe_error(exc: ValidationError) -> str:
    """pydantic's first error in the user's terms: the camelCase path, the value, the rule."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "input"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return f"{where}: unknown field (check its spelling against the QuantizedModel CRD)"
    if first["type"] == "literal_error":
        return f"{where} must be {first['ctx']['expected']}; got {first['input']!r}"
    if first["type"] == "missing":
        return f"{where} is required"
    if "input" in first and not isinstance(first["input"], dict):
        return f"{where}: {message}; got {first['input']!r}"
    return f"{where}: {message}"


def json_schema() -> dict:
    return JobInput.model_json_schema(by_alias=True)


def schema_text() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    SCHEMA_PATH.write_text(schema_text())
    print(SCHEMA_PATH)
