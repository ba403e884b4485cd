#!/usr/bin/env bash
# checkov (the chart's security scan, tests/reliability_tests/test_security.py) in a virtualenv of
# its own: its pins (boto3, networkx, packaging) conflict with the project's constraints.txt.
# Installed once per version under ~/.cache/qmodel-tools; prints the checkov binary's path.
set -euo pipefail
version=3.3.30
here=$(cd "$(dirname "$0")" && pwd)
venv=${QMODEL_TOOLS:-$HOME/.cache/qmodel-tools}/checkov-$version
python=${PYTHON:-python3}
if [ ! -x "$venv/bin/checkov" ]; then
  mkdir -p "$(dirname "$venv")"
  exec 9>"$venv.lock"
  flock 9
  if [ ! -x "$venv/bin/checkov" ]; then
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check \
      -c "$here/checkov-constraints.txt" "checkov==$version" >&2
  fi
fi
echo "$venv/bin/checkov"
