"""The CRD is the single source of truth: the operator's pydantic models and the quantize Job's
input schema must agree with it field by field (names, types, enums, bounds, defaults,
patterns, required fields), and every status field the operator writes must be in the CRD
(the API server prunes the rest without a word)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from operator_tests.support import REF, REPO, make_spec

from qmodel_operator.jobs import build_job_input
from qmodel_operator.revision import revision
from qmodel_operator.spec import QuantizedModelSpec, QuantizedModelStatus

JOB_INPUT_SCHEMA = REPO / "runtime" / "src" / "qmodel_runtime" / "jobs" / "job-input.schema.json"
BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
LIMITS = ("maxLength", "maxItems", "maxProperties", "pattern")


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Follow $ref and fold pydantic's ``anyOf [X, null]`` into X with nullable."""
    node = dict(node)
    if "$ref" in node:
        target = defs[node.pop("$ref").split("/")[-1]]
        node = {**target, **node}
    options = node.get("anyOf")
    if options and any(o.get("type") == "null" for o in options):
        rest = [o for o in options if o.get("type") != "null"]
        node.pop("anyOf")
        node = {**(rest[0] if len(rest) == 1 else {"anyOf": rest}), **node, "nullable": True}
        return _resolve(node, defs)
    return node


def _bounds(node: dict[str, Any]) -> dict[str, Any]:
    """Bounds in one dialect: OpenAPI 3.0's boolean exclusiveMinimum becomes 2020-12's number."""
    out = {k: node[k] for k in BOUNDS if k in node}
    if out.get("exclusiveMinimum") is True:
        out["exclusiveMinimum"] = out.pop("minimum")
    if out.get("exclusiveMaximum") is True:
        out["exclusiveMaximum"] = out.pop("maximum")
    return {k: float(v) for k, v in out.items() if v is not False}


def _kind(node: dict[str, Any]) -> Any:
    if node.get("x-kubernetes-int-or-string") or {o.get("type") for o in node.get("anyOf", [])} == {
        "integer",
        "string",
    }:
        return "int-or-string"
    return node.get("type")


def compare(crd: dict, py: dict, defs: dict, path: str, *, values: bool = True) -> list[str]:
    """Differences between a CRD schema node and a JSON Schema node, recursively.

    ``values=False`` compares only structure (names and types), as for the status.
    """
    py = _resolve(py, defs)
    problems = []
    if _kind(crd) != _kind(py):
        return [f"{path}: type {_kind(crd)} in the CRD, {_kind(py)} in the model"]
    if values:
        for key in ("enum",):
            if sorted(map(str, crd.get(key, []))) != sorted(map(str, py.get(key, []))):
                problems.append(f"{path}: {key} {crd.get(key)} vs {py.get(key)}")
        # An int-or-string's bounds sit on the integer branch in the model (quantities: minimum 0).
        integer = next((o for o in py.get("anyOf", []) if o.get("type") == "integer"), py)
        if _bounds(crd) != _bounds(integer if _kind(crd) == "int-or-string" else py):
            problems.append(f"{path}: bounds {_bounds(crd)} vs {_bounds(py)}")
        for key in LIMITS:
            if key in ("pattern", "maxLength") and _kind(crd) == "int-or-string":
                continue  # these sit on the string branch in the model (checked below)
            if crd.get(key) != py.get(key):
                problems.append(f"{path}: {key} {crd.get(key)!r} vs {py.get(key)!r}")
        if crd.get("nullable") and not py.get("nullable"):
            problems.append(f"{path}: nullable in the CRD, not in the model")
        if "default" in crd and crd["default"] != {} and crd["default"] != py.get("default"):
            problems.append(f"{path}: default {crd['default']!r} vs {py.get('default')!r}")
        if sorted(crd.get("required", [])) != sorted(py.get("required", [])):
            problems.append(f"{path}: required {crd.get('required')} vs {py.get('required')}")
    if _kind(crd) == "int-or-string" and values:
        string = next((o for o in py.get("anyOf", []) if o.get("type") == "string"), {})
        for key in ("pattern", "maxLength"):
            if crd.get(key) != string.get(key):
                problems.append(f"{path}: quantity {key} {crd.get(key)!r} vs {string.get(key)!r}")
    problems += _compare_children(crd, py, defs, path, values)
    return problems


def _compare_children(crd: dict, py: dict, defs: dict, path: str, values: bool) -> list[str]:
    problems = []
    crd_props, py_props = crd.get("properties", {}), py.get("properties", {})
    for name in sorted(set(crd_props) | set(py_props)):
        if name not in py_props:
            problems.append(f"{path}.{name}: in the CRD, missing from the model")
        elif name not in crd_props:
            problems.append(f"{path}.{name}: in the model, missing from the CRD (the API server prunes it)")
        else:
            problems += compare(crd_props[name], py_props[name], defs, f"{path}.{name}", values=values)
    for key in ("items", "additionalProperties"):
        if isinstance(crd.get(key), dict) and isinstance(py.get(key), dict):
            problems += compare(crd[key], py[key], defs, f"{path}[{key}]", values=values)
        elif isinstance(crd.get(key), dict) != isinstance(py.get(key), dict):
            problems.append(f"{path}: {key} only on one side")
    return problems


def _model_schema(model) -> tuple[dict, dict]:
    schema = model.model_json_schema(by_alias=True)
    return schema, schema.get("$defs", {})


def test_spec_models_match_the_crd(crd_schema):
    py, defs = _model_schema(QuantizedModelSpec)
    problems = compare(crd_schema["properties"]["spec"], py, defs, "spec")
    assert problems == []


def test_status_models_match_the_crd(crd_schema):
    py, defs = _model_schema(QuantizedModelStatus)
    problems = compare(crd_schema["properties"]["status"], py, defs, "status", values=False)
    assert problems == []


def test_the_comparison_catches_drift(crd_schema):
    """The walk above must fail on a renamed field, a changed bound and a dropped enum value."""
    spec = json.loads(json.dumps(crd_schema["properties"]["spec"]))
    quant = spec["properties"]["quantization"]["properties"]
    quant["bits"]["enum"] = [2, 4, 8]
    quant["calibration"]["properties"]["samples"]["maximum"] = 999
    quant["dampPct"] = quant.pop("dampPercent")
    py, defs = _model_schema(QuantizedModelSpec)
    problems = "\n".join(compare(spec, py, defs, "spec"))
    assert "spec.quantization.bits: enum" in problems
    assert "spec.quantization.calibration.samples: bounds" in problems
    assert "spec.quantization.dampPct: in the CRD, missing from the model" in problems
    assert "spec.quantization.dampPercent: in the model, missing from the CRD" in problems


def test_every_field_has_a_description(crd_schema):
    missing = []

    def walk(node: dict, path: str) -> None:
        for name, child in node.get("properties", {}).items():
            if path.startswith("spec") and "description" not in child:
                missing.append(f"{path}.{name}")
            walk(child, f"{path}.{name}")
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}[]")

    walk(crd_schema["properties"]["spec"], "spec")
    # Toleration items mirror core/v1 Toleration; their fields are documented by Kubernetes.
    assert [m for m in missing if ".tolerations[]." not in m] == []


# --- the quantize Job's input schema (owned by the runtime; generated and kept in sync there) --


def _job_schema() -> dict[str, Any]:
    if not JOB_INPUT_SCHEMA.exists():
        pytest.skip(f"{JOB_INPUT_SCHEMA.relative_to(REPO)} does not exist yet (the runtime generates it)")
    return json.loads(JOB_INPUT_SCHEMA.read_text())


def _check_document(doc: Any, node: dict, defs: dict, path: str) -> list[str]:
    """A small JSON Schema check of the operator's document: keys, required, types, enums."""
    node = _resolve(node, defs)
    if doc is None:
        return [] if node.get("nullable") else [f"{path}: null not allowed"]
    if "enum" in node and doc not in node["enum"]:
        return [f"{path}: {doc!r} not in {node['enum']}"]
    if "const" in node and doc != node["const"]:
        return [f"{path}: {doc!r} != {node['const']!r}"]
    if not isinstance(doc, dict):
        return []
    props = node.get("properties", {})
    problems = [
        f"{path}.{k}: required by the Job, not sent" for k in node.get("required", []) if k not in doc
    ]
    for key, value in doc.items():
        if key not in props:
            if node.get("additionalProperties") is False:
                problems.append(f"{path}.{key}: sent, unknown to the Job (it rejects unknown keys)")
            continue
        problems += _check_document(value, props[key], defs, f"{path}.{key}")
    return problems


def test_job_input_is_valid_for_the_job_schema():
    schema = _job_schema()
    spec = make_spec(validation={"maxPerplexity": 20.0, "maxSamples": 64})
    doc = build_job_input(REF, spec, revision(spec))
    assert _check_document(doc, schema, schema.get("$defs", {}), "input") == []


@pytest.mark.parametrize("section", ["quantization", "validation"])
def test_job_input_schema_matches_the_crd(crd_schema, section):
    schema = _job_schema()
    defs = schema.get("$defs", {})
    job_section = _resolve(schema["properties"][section], defs)
    crd_section = crd_schema["properties"]["spec"]["properties"][section]
    problems = []
    for name, crd_node in crd_section["properties"].items():
        if name not in job_section.get("properties", {}):
            problems.append(f"{section}.{name}: in the CRD, unknown to the Job")
            continue
        job_node = job_section["properties"][name]
        if crd_node.get("type") == "object":
            problems += compare(crd_node, job_node, defs, f"{section}.{name}")
        else:
            # The Job may be stricter only where the CRD cannot be (patterns); values must agree.
            problems += [
                p for p in compare(crd_node, job_node, defs, f"{section}.{name}") if "pattern" not in p
            ]
    assert problems == []
