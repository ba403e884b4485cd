"""What the quantize Job reports: the perplexity gate, the manifest's metadata and the result
JSON of the termination log (docs/contracts.md). Pure functions, except the final write."""

from __future__ import annotations

import json
import logging
import math
import platform
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata as pkg_metadata
from pathlib import Path

from qmodel_runtime import manifest
from qmodel_runtime.evaluate import PerplexityResult
from qmodel_runtime.jobs.inspect import ModelInfo
from qmodel_runtime.jobs.spec import JobInput, Validation

log = logging.getLogger(__name__)

# Kubernetes keeps 4096 bytes of a termination message; stay well inside.
MAX_RESULT_BYTES = 4000
MAX_REASON_CHARS = 1000
TOOLS = ("qmodel-runtime", "qmodel-kernels", "torch", "transformers", "safetensors", "triton")


class Clock:
    """Wall time per phase (a phase may run more than once: the seconds add up)."""

    def __init__(self):
        self.start = time.monotonic()
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str):
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] += time.monotonic() - t0

    def timings(self) -> dict:
        out = {
            f"{k}Seconds": round(self.seconds.get(k, 0.0), 3)
            for k in ("load", "quantize", "evaluate", "upload")
        }
        out["totalSeconds"] = round(time.monotonic() - self.start, 3)
        return out


@dataclass(frozen=True)
class Gate:
    increase_percent: float
    passed: bool


def gate(baseline: float, quantized: float, validation: Validation) -> Gate:
    """Passed when the increase is within maxPerplexityIncreasePercent and, if set, the quantized
    perplexity is at most maxPerplexity (informative: the operator makes the decision)."""
    increase = 100.0 * (quantized - baseline) / baseline
    passed = increase <= validation.max_perplexity_increase_percent and (
        validation.max_perplexity is None or quantized <= validation.max_perplexity
    )
    return Gate(increase, passed and math.isfinite(quantized))


def artifact_uri(job: JobInput) -> str:
    """``<artifacts.uri>/<model.name>/<revision>/`` in the user's own terms (pvc:// stays pvc://)."""
    return f"{job.artifacts.uri.rstrip('/')}/{job.model.name}/{job.revision}/"


def folder_digest(folder: Path) -> str:
    """The source's identity: sha256 over every file's name, size and sha256 (its manifest's
    file table), so the artifact records exactly which weights it came from."""
    files = manifest.build_manifest(folder)["files"]
    return manifest.digest(manifest.dumps({"files": files}))


def tool_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in TOOLS:
        try:
            versions[name] = pkg_metadata.version(name)
        except pkg_metadata.PackageNotFoundError:
            continue
    return versions


def _ppl(result: PerplexityResult) -> dict:
    return {
        "perplexity": result.perplexity,
        "tokens": result.tokens,
        "windows": result.windows,
        "seconds": round(result.seconds, 3),
    }


def manifest_metadata(
    job: JobInput, info: ModelInfo, source_digest: str, baseline, quantized, g: Gate, layers, clock: Clock
) -> dict:
    """Everything a reader of the artifact may want to know about how it was made."""
    return {
        "producer": "qmodel quantize job",
        "revision": job.revision,
        "model": {"namespace": job.model.namespace, "name": job.model.name, **info.to_json()},
        "source": {"uri": job.source.uri, "digest": source_digest},
        "quantization": job.quantization.model_dump(by_alias=True, mode="json"),
        "validation": {
            **job.validation.model_dump(by_alias=True, mode="json"),
            "baseline": _ppl(baseline),
            "quantized": _ppl(quantized),
            "increasePercent": g.increase_percent,
            "passed": g.passed,
        },
        "layers": [{"index": r.index, "seconds": round(r.seconds, 3), "stages": r.stages} for r in layers],
        "tools": tool_versions(),
        "timings": clock.timings(),
    }


def _weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def build_result(
    job: JobInput,
    info: ModelInfo,
    baseline,
    quantized,
    g: Gate,
    uri: str,
    uploaded,
    digest: str,
    stage: Path,
    clock: Clock,
) -> dict:
    """The termination-log document. compressionRatio: the model's size in fp16 (2 bytes per
    parameter) over the size of the checkpoint's weight files."""
    weights = _weights_bytes(stage)
    return {
        "revision": job.revision,
        "baselinePerplexity": round(baseline.perplexity, 6),
        "quantizedPerplexity": round(quantized.perplexity, 6),
        "increasePercent": round(g.increase_percent, 4),
        "passed": g.passed,
        "artifact": {
            "uri": uri,
            "manifestDigest": digest,
            "sizeBytes": uploaded.size_bytes,
            "compressionRatio": round(2 * info.parameters / weights, 3) if weights else None,
        },
        "timings": clock.timings(),
        "model": info.to_json(),
    }


def result_json(result: dict) -> str:
    text = json.dumps(result, separators=(",", ":"), sort_keys=True)
    if len(text.encode()) > MAX_RESULT_BYTES:
        raise ValueError(
            f"result is {len(text.encode())} bytes; the termination log keeps {MAX_RESULT_BYTES}"
        )
    return text


def one_line(reason: str) -> str:
    line = " ".join(reason.split())
    return line if len(line) <= MAX_REASON_CHARS else line[: MAX_REASON_CHARS - 3] + "..."


def summary(result: dict) -> str:
    return (
        f"perplexity {result['baselinePerplexity']:.3f} -> {result['quantizedPerplexity']:.3f} "
        f"({result['increasePercent']:+.2f}%, {'passed' if result['passed'] else 'not passed'}), "
        f"artifact {result['artifact']['uri']}"
    )


def write_termination(path: Path, text: str) -> None:
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text, encoding="utf-8")
    except OSError as exc:  # the result still reaches the log
        log.error("cannot write the termination log %s: %s; result: %s", path, exc, text)
