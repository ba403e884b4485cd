"""values.yaml documents every key (`## @param path description`) and values.schema.json knows them all."""

from __future__ import annotations

import json
import re
from typing import Any

import yaml
from chart_tests.chart_support import CHART

VALUES_TEXT = (CHART / "values.yaml").read_text()
VALUES = yaml.safe_load(VALUES_TEXT)
SCHEMA = json.loads((CHART / "values.schema.json").read_text())
PARAM = re.compile(r"^\s*## @param (\S+) (\S.*)$", re.M)


def documented() -> dict[str, str]:
    return dict(PARAM.findall(VALUES_TEXT))


def undocumented(values: dict[str, Any], docs: dict[str, str], prefix: str = "") -> list[str]:
    """Key paths with no @param of their own or of an enclosing object (a documented object's
    contents, such as resources, are Kubernetes types described as a whole)."""
    missing = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        if path in docs:
            continue
        if isinstance(value, dict) and value:
            missing += undocumented(value, docs, path + ".")
        else:
            missing.append(path)
    return missing


def lookup(tree: dict[str, Any], path: str) -> Any:
    node = tree
    for part in path.split("."):
        node = node[part]
    return node


def schema_node(path: str) -> dict[str, Any]:
    node = SCHEMA
    for part in path.split("."):
        node = node["properties"][part]
    return node


def strict_schema_paths(node: dict[str, Any], prefix: str = "") -> list[str]:
    """Key paths of every property of the schema's closed objects (additionalProperties: false)."""
    paths = []
    for key, sub in node.get("properties", {}).items():
        path = f"{prefix}{key}"
        if node.get("additionalProperties") is False:
            paths.append(path)
        paths += strict_schema_paths(sub, path + ".")
    return paths


def test_every_key_is_documented():
    assert undocumented(VALUES, documented()) == []


def test_every_param_names_a_real_key_and_says_something():
    for path, description in documented().items():
        lookup(VALUES, path)  # KeyError: a @param for a key that does not exist
        assert len(description) > 10, path


def test_schema_knows_every_documented_key_and_types_it():
    kinds = {str: "string", bool: "boolean", int: "integer", list: "array", dict: "object"}
    for path in documented():
        node, value = schema_node(path), lookup(VALUES, path)
        expected = kinds[type(value)]
        types = {node.get("type")} | {n.get("type") for n in node.get("anyOf", [])}
        assert expected in types or (expected == "integer" and "number" in types), (path, node)


def test_schema_has_no_stale_keys():
    stale = [p for p in strict_schema_paths(SCHEMA) if p != "global" and not _exists(p)]
    assert stale == []


def _exists(path: str) -> bool:
    try:
        lookup(VALUES, path)
    except KeyError:
        return False
    return True


def test_our_objects_are_closed():
    """Objects the chart defines reject unknown keys; Kubernetes types (resources, affinity, ...) do not."""
    for path in (
        "",
        "crds",
        "watch",
        "operator",
        "operator.image",
        "runtime",
        "runtime.jobs",
        "s3",
        "metrics",
    ):
        node = schema_node(path) if path else SCHEMA
        assert node.get("additionalProperties") is False, path
