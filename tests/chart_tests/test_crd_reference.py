"""The README's CRD reference is generated from crds/quantizedmodel.yaml and kept in sync."""

from __future__ import annotations

import importlib.util
from typing import Any

import yaml
from chart_tests.chart_support import CRD_FILE, REPO

_spec = importlib.util.spec_from_file_location("crd_reference", REPO / "scripts" / "crd-reference.py")
crd_reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(crd_reference)
README = REPO / "README.md"


def field_paths(schema: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for name, sub in schema.get("properties", {}).items():
        path = f"{prefix}{name}"
        out.append(path)
        if sub.get("type") == "array":
            out += field_paths(sub.get("items", {}), f"{path}[].")
        else:
            out += field_paths(sub, f"{path}.")
    return out


def test_readme_section_is_up_to_date():
    assert crd_reference.main(["--check", str(README)]) == 0, (
        "README.md's CRD reference is stale: make crd-sync"
    )


def test_every_field_and_rule_is_in_the_reference():
    crd = yaml.safe_load(CRD_FILE.read_text())
    root = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    section = crd_reference.render(crd)
    for part in ("spec", "status"):
        for path in field_paths(root["properties"][part]):
            assert f"| `{path}`" in section, path
    assert "Rule: artifacts.uri is immutable" in section
    assert "| `quantization.calibration.seed` | integer | `0` |" in section
    assert "<= 4294967295" in section  # numbers as written, not 4.29497e+09


def test_a_changed_description_makes_the_check_fail(tmp_path):
    crd = yaml.safe_load(CRD_FILE.read_text())
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["description"] = "changed"
    stale = tmp_path / "README.md"
    stale.write_text(README.read_text())
    fresh = crd_reference.splice(stale.read_text(), crd_reference.render(crd))
    assert fresh != stale.read_text() and "\nchanged\n" in fresh
