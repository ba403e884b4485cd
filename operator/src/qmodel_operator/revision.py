"""The revision: a digest of everything that changes the quantize Job's output.

That is the source, every quantization setting (calibration included) and how perplexity is
measured (dataset, window length, sample cap). It leaves out the gate's thresholds (a changed
threshold re-gates the stored numbers without quantizing again), the artifact location
(immutable), credentials, serving and Job placement.

Upgrading the operator must never re-quantize existing models, so the digest covers a fixed
list of fields (``_FIELDS``). A field added to the CRD later joins the digest only when it
differs from its default (``_LATER_FIELDS``), which keeps every existing revision unchanged.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from qmodel_operator.spec import QuantizedModelSpec

# Version 1 of the digest input; bump only together with a migration note in the README.
_SCHEME = "qmodel.dev/revision/v1"
_FIELDS = (
    ("source", "uri"),
    ("quantization", "method"),
    ("quantization", "bits"),
    ("quantization", "groupSize"),
    ("quantization", "descAct"),
    ("quantization", "symmetric"),
    ("quantization", "dampPercent"),
    ("quantization", "staticGroups"),
    ("quantization", "trueSequential"),
    ("quantization", "calibration", "dataset"),
    ("quantization", "calibration", "samples"),
    ("quantization", "calibration", "sequenceLength"),
    ("quantization", "calibration", "seed"),
    ("validation", "dataset"),
    ("validation", "sequenceLength"),
    ("validation", "maxSamples"),
)
# (path, default): fields introduced after v1 of the digest. Empty so far.
_LATER_FIELDS: tuple[tuple[tuple[str, ...], Any], ...] = ()


def _get(tree: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def digest_input(spec: QuantizedModelSpec) -> dict[str, Any]:
    """The exact values the revision covers, keyed by dotted path (shown in `describe`-style logs)."""
    tree = spec.model_dump(by_alias=True, mode="json")
    values = {".".join(path): _get(tree, path) for path in _FIELDS}
    for path, default in _LATER_FIELDS:
        value = _get(tree, path)
        if value != default:
            values[".".join(path)] = value
    return values


def revision(spec: QuantizedModelSpec) -> str:
    """``r-`` and 12 hex digits: 48 bits, so two of a model's first 4096 revisions collide with p ~ 3e-8."""
    canonical = json.dumps([_SCHEME, digest_input(spec)], sort_keys=True, separators=(",", ":"))
    return "r-" + hashlib.sha256(canonical.encode()).hexdigest()[:12]
