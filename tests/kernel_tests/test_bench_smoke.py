"""The GPU benchmark script runs end to end (tiny shapes; interpreted on a CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "kernels" / "benchmarks" / "bench_matmul.py"


def test_bench_matmul_smoke(kernels, tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0")}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--reps", "3", "--json", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "| smoke 256x128 | 1 |" in proc.stdout and "| smoke 256x128 | 16 |" in proc.stdout
    data = json.loads(out.read_text())
    assert [r["m"] for r in data["main"]] == [1, 16]
    for row in data["main"]:  # every method timed, nothing fell into the error column
        assert row["us"]["ours"] > 0 and row["us"]["fp16"] > 0, row
    assert set(data["act_order"][0]["us"]) == {
        "no act-order",
        "sorted+perm in kernel",
        "sorted+torch gather",
        "g_idx kernel",
    }
