"""Rendering the chart with the test bed's helm binary (``make testbed`` builds it)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml

from testbed import paths

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "qmodel"
CRD_FILE = REPO / "crds" / "quantizedmodel.yaml"
RELEASE, NAMESPACE = "qm", "qmodel-system"
# The test bed's API server version: `helm template` otherwise assumes an old default.
KUBE_VERSION = "v" + paths.versions()["K8S_VERSION"]


def helm_binary() -> Path:
    path = paths.bin_dir() / "helm"
    if not path.is_file():
        pytest.skip("helm is not built: run `make testbed` (tests/testbed/install.sh)")
    return path


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [str(helm_binary()), *args], capture_output=True, text=True, timeout=120, check=False
    )
    if check and out.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({out.returncode}):\n{out.stderr}")
    return out


def render_args(values: dict[str, Any] | None = None, files: Iterable[Path] = ()) -> list[str]:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION]
    for f in files:
        args += ["--values", str(f)]
    if values:
        # --set-json keeps types exactly (--set would turn "true" and 1 into guesses).
        for key, value in values.items():
            args += ["--set-json", f"{key}={json.dumps(value)}"]
    return args


def render(values: dict[str, Any] | None = None, files: Iterable[Path] = ()) -> list[dict[str, Any]]:
    """Every object ``helm template`` renders, parsed."""
    out = helm(*render_args(values, files))
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def render_error(values: dict[str, Any]) -> str:
    """The error ``helm template`` fails with for these values (fails the test if it renders)."""
    out = helm(*render_args(values), check=False)
    assert out.returncode != 0, f"rendered although it should not: {values}"
    return out.stderr


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def operator_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


def load_crd_file() -> dict[str, Any]:
    return yaml.safe_load(CRD_FILE.read_text())
