"""The GPU serving benchmark's CPU smoke mode runs and prints its table (numbers not checked:
benchmarks never assert on times)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "runtime" / "benchmarks" / "serve_bench_gpu.py"


def test_serve_benchmark_smoke_prints_the_comparison():
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke"], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and "x |" in line]
    assert [r.split("|")[1].strip() for r in rows] == [
        "decode tok/s, batch 1",
        "TTFT ms, 16-token prompt",
        "throughput tok/s, 2 concurrent",
        "throughput tok/s, 4 concurrent",
    ]
    for row in rows:
        fp16, int4 = (float(c) for c in row.split("|")[2:4])
        assert fp16 > 0 and int4 > 0
