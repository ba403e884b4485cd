"""The quantize Job's result, read from its pod's termination message (docs/contracts.md).

Exit 0: a JSON document (under 4 KiB). Non-zero: one line of plain text, the reason.
Unknown keys are ignored so a newer runtime image can add fields without breaking us.
"""

from __future__ import annotations

import json

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from qmodel_operator.spec import ModelFacts

# Kubernetes keeps at most 4096 bytes of a termination message; a reason shown in a condition
# and an Event is cut well below that so `kubectl get` and `describe` stay readable.
MAX_REASON_CHARS = 500


class ResultError(ValueError):
    """The termination message is not a result the operator can use."""


class _Result(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True)


class ResultArtifact(_Result):
    uri: str
    manifest_digest: str
    size_bytes: int | None = Field(None, ge=0)
    compression_ratio: float | None = Field(None, gt=0)


class Timings(_Result):
    load_seconds: float | None = None
    quantize_seconds: float | None = None
    evaluate_seconds: float | None = None
    upload_seconds: float | None = None
    total_seconds: float | None = None


class JobResult(_Result):
    revision: str
    baseline_perplexity: float = Field(ge=1)
    quantized_perplexity: float = Field(ge=1)
    increase_percent: float | None = None
    passed: bool | None = None
    artifact: ResultArtifact
    timings: Timings = Timings()
    model: ModelFacts


def parse_result(message: str | None) -> JobResult:
    """The JSON result of a Job that exited 0; ResultError says what is wrong with it."""
    if not message or not message.strip():
        raise ResultError("the quantize Job exited 0 but left no result in its termination message")
    try:
        data = json.loads(message)
    except json.JSONDecodeError as e:
        raise ResultError(f"the quantize Job's result is not JSON ({e.msg} at char {e.pos})") from None
    try:
        return JobResult.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "result"
        raise ResultError(f"the quantize Job's result is invalid at {where}: {first['msg']}") from None


def failure_reason(message: str | None, exit_code: int | None = None) -> str:
    """A one-line reason from a failed pod's termination message (or its exit code)."""
    lines = [line.strip() for line in (message or "").splitlines() if line.strip()]
    if not lines:
        return f"exit code {exit_code}" if exit_code is not None else "no reason given"
    # FallbackToLogsOnError puts the log's tail here: its last line is the traceback's verdict.
    reason = lines[0] if len(lines) == 1 else lines[-1]
    if len(reason) > MAX_REASON_CHARS:
        reason = reason[: MAX_REASON_CHARS - 3] + "..."
    return reason


# 128 + SIGKILL: the kernel's out-of-memory killer, or the kubelet enforcing the memory limit.
SIGKILL_EXIT = 137


def kill_note(exit_code: int | None, reason: str | None) -> str | None:
    """What a container killed for memory should tell its owner, or None for other exits.

    The kubelet reports ``OOMKilled`` when the container hit its memory limit; an exit code of
    137 without it is a SIGKILL from elsewhere (the node's OOM killer, an eviction), most often
    still memory. Neither leaves a termination message of its own."""
    if reason == "OOMKilled":
        return (
            "the container ran out of memory (OOMKilled, exit code 137); "
            "raise spec.jobs.resources.limits.memory"
        )
    if exit_code == SIGKILL_EXIT:
        return (
            "the container was killed by SIGKILL (exit code 137), most often for memory; "
            "raise spec.jobs.resources.limits.memory, or look for an eviction in the node's events"
        )
    return None
