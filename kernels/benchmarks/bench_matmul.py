"""W4A16 matmul benchmark: our Triton kernels vs fp16 cuBLAS vs torch's int4 (tinygemm), one process.

    python kernels/benchmarks/bench_matmul.py                 # the GPU machine (< 10 min with tuning)
    TRITON_INTERPRET=1 python kernels/benchmarks/bench_matmul.py --smoke   # CPU: checks it runs

For M in {1, 4, 16, 64, 256} and the Llama-7B/70B layer shapes of ../shared/anchors.md it
prints microseconds for y = x @ W (x [M, K] fp16, W [K, N]): fp16 cuBLAS (``x @ W``), our
int4 g128 kernel (symmetric, the GPTQ default), torch's ``_weight_int4pack_mm`` (bf16 x,
g128); the ratios to fp16, the goals of issue 4, and our bandwidth against the int4 floor
(int4 weights + an fp16 scale and zero per 128-group, over the copy bandwidth measured in
the same run). A second table compares the ways to run act-order checkpoints.

Timing: every call is captured once in a CUDA graph and replayed with L2 flushed before
each replay (a 256 MB write), median of the replays. Graphs take host launch overhead out,
as the serving runtime's decode step does; the flush stops 12-50 MB weights from staying
in the 50 MB L2 between repetitions. The same timer serves all three methods. The eager
column times our Python entry point with ``triton.testing.do_bench`` (launch overhead in).
The first call of each (shape, M bucket) tunes our kernel (tuning.py) and is not timed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import triton
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources

from qmodel_kernels import layout
from qmodel_kernels.matmul import choose_path, quant_matmul
from qmodel_kernels.quant_weight import QuantWeight, prepare

SHAPES = {
    "7B qkv": (4096, 12288),
    "7B gate_up": (4096, 22016),
    "7B down": (11008, 4096),
    "70B gate_up": (8192, 57344),
    "70B down": (28672, 8192),
}
MS = (1, 4, 16, 64, 256)
ACT_ORDER_SHAPES = ("7B qkv", "7B down")
ACT_ORDER_MS = (1, 16, 256)
SMOKE_SHAPES = {"smoke": (256, 128)}
GROUP = 128
# issue 4's goals, as ratios to fp16 cuBLAS (and to tinygemm at M=1)
GOALS = {1: 3.5, 16: 2.5, 64: 1.5, 256: 1.0}
GOAL_VS_TINYGEMM = {1: 1.5}
BENCH_ERRORS = (RuntimeError, ValueError, CompilationError, OutOfResources)


@dataclass
class Row:
    shape: str
    k: int
    n: int
    m: int
    us: dict[str, float] = field(default_factory=dict)  # method -> microseconds
    notes: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- timing


class Timer:
    """Graph replay with L2 flushed (GPU), or one wall-clock call (the CPU smoke run)."""

    def __init__(self, device: torch.device, reps: int) -> None:
        self.device, self.reps = device, reps
        self.flush = (
            torch.empty(256 << 20, dtype=torch.int8, device=device) if device.type == "cuda" else None
        )

    def __call__(self, fn) -> float:
        fn()  # compile, tune, allocate
        if self.flush is None:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e6
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()  # warm up on a side stream before capture, as torch.cuda.graph asks
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(self.reps)
        ]
        for start, end in events:
            self.flush.zero_()
            start.record()
            graph.replay()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in events) * 1e3

    def eager(self, fn) -> float:
        if self.flush is None:
            return self(fn)
        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3


def copy_bandwidth(device: torch.device) -> float:
    """Device-to-device copy, bytes read + written per second (the anchors' 3.00 TB/s on H100)."""
    if device.type != "cuda":
        return float("nan")
    a = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=25, rep=200, return_mode="median")
    return 2 * a.numel() / (ms * 1e-3)


# --------------------------------------------------------------------------- weights


def random_layer(k: int, n: int, device, act_order: bool = False) -> layout.PackedWeight:
    """A symmetric 4-bit g128 layer: every int32 word is 8 valid codes, so random words do."""
    gen = torch.Generator(device=device).manual_seed(k * 7 + n)
    qweight = torch.randint(-(2**31), 2**31 - 1, (k // 8, n), dtype=torch.int32, device=device, generator=gen)
    groups = layout.num_groups(k, GROUP)
    qzeros = torch.full((groups, n // 8), 0x77777777, dtype=torch.int32, device=device)
    scales = (torch.rand(groups, n, device=device, generator=gen) * 0.01 + 0.001).half()
    g_idx = layout.default_g_idx(k, GROUP, device)
    if act_order:
        g_idx = g_idx[torch.randperm(k, device=device, generator=gen)]
    return layout.PackedWeight(qweight, qzeros, scales, g_idx, 4, GROUP)


def tinygemm_weight(k: int, n: int, device):
    """Random weights packed for torch.ops.aten._weight_int4pack_mm (g128, inner k tiles 8)."""
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32, device=device)
    pairs = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)  # torch >= 2.5: two codes a byte
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack(pairs, 8)
    except RuntimeError:  # older torch: one int32 code per element
        packed = torch.ops.aten._convert_weight_to_int4pack(codes, 8)
    scale_zero = torch.randn(k // GROUP, n, 2, dtype=torch.bfloat16, device=device) * 0.01
    return packed, scale_zero


def int4_floor_bytes(k: int, n: int) -> float:
    return k * n / 2 + (k // GROUP) * n * 4  # as ../shared/anchors.md: int4 + fp16 scale & zero


# --------------------------------------------------------------------------- the tables


def _measure(row: Row, name: str, fn, timer) -> None:
    try:
        row.us[name] = timer(fn)
    except BENCH_ERRORS as exc:  # one failing cell must not lose the whole run
        row.notes[name] = f"{type(exc).__name__}: {str(exc)[:120]}"


def main_table(args, device, timer: Timer, deadline: float) -> list[Row]:
    rows: list[Row] = []
    for shape, (k, n) in args.shapes.items():
        if not _shape_rows(args, shape, k, n, device, timer, deadline, rows):
            print(f"# time budget spent: stopped in {shape}", flush=True)
            break
    return rows


def _shape_rows(args, shape, k, n, device, timer, deadline, rows) -> bool:
    """Every M for one shape; False when the time budget ran out."""
    weight = torch.randn(k, n, dtype=torch.float16, device=device) / math.sqrt(k)
    qw = prepare(random_layer(k, n, device))
    tiny_ok = device.type == "cuda" and hasattr(torch.ops.aten, "_weight_int4pack_mm")
    tiny = _try(lambda: tinygemm_weight(k, n, device)) if tiny_ok else None
    for m in args.ms:
        if time.monotonic() > deadline:
            return False
        row = Row(shape, k, n, m)
        x = torch.randn(m, k, dtype=torch.float16, device=device)
        _measure(row, "fp16", lambda x=x: x @ weight, timer)
        _measure(row, "ours", lambda x=x: quant_matmul(x, qw), timer)
        if args.eager:
            _measure(row, "ours_eager", lambda x=x: quant_matmul(x, qw), timer.eager)
        if tiny is not None:
            xb = x.to(torch.bfloat16)
            _measure(
                row,
                "tinygemm",
                lambda xb=xb: torch.ops.aten._weight_int4pack_mm(xb, tiny[0], GROUP, tiny[1]),
                timer,
            )
        row.notes["path"] = choose_path(m)
        rows.append(row)
        print(format_main(row, args.bandwidth), flush=True)
    return True


def _try(make):
    try:
        return make()
    except BENCH_ERRORS as exc:
        print(f"# tinygemm unavailable: {str(exc)[:160]}", flush=True)
        return None


def act_order_table(args, device, timer: Timer, deadline: float) -> list[Row]:
    """Plain layer vs act-order: rows sorted at load + x gathered in-kernel (our default),
    rows sorted + x permuted by torch before a plain kernel, and the g_idx-aware kernel."""
    rows: list[Row] = []
    for shape in args.act_shapes:
        if not _act_rows(args, shape, device, timer, deadline, rows):
            print(f"# time budget spent: stopped in act-order {shape}", flush=True)
            break
    return rows


def _act_rows(args, shape, device, timer, deadline, rows) -> bool:
    k, n = args.shapes[shape]
    plain = prepare(random_layer(k, n, device))
    act = random_layer(k, n, device, act_order=True)
    fused, gidx = prepare(act, "reorder"), prepare(act, "g_idx")
    sorted_plain = QuantWeight(fused.qweight, fused.qzeros, fused.scales, None, None, 4, GROUP, fused.zero)
    perm = fused.perm.long()
    variants = {
        "no act-order": lambda x: quant_matmul(x, plain),
        "sorted+perm in kernel": lambda x: quant_matmul(x, fused),
        "sorted+torch gather": lambda x: quant_matmul(x[:, perm], sorted_plain),
        "g_idx kernel": lambda x: quant_matmul(x, gidx),
    }
    for m in args.act_ms:
        if time.monotonic() > deadline:
            return False
        row = Row(shape, k, n, m)
        x = torch.randn(m, k, dtype=torch.float16, device=device)
        for name, fn in variants.items():
            _measure(row, name, lambda fn=fn, x=x: fn(x), timer)
        rows.append(row)
        print(format_act(row), flush=True)
    return True


def _cell(row: Row, name: str, fmt: str = "{:.1f}") -> str:
    return fmt.format(row.us[name]) if name in row.us else "err"


def format_main(row: Row, bandwidth: float) -> str:
    fp16, ours, tiny = row.us.get("fp16"), row.us.get("ours"), row.us.get("tinygemm")
    ratio = fp16 / ours if fp16 and ours else float("nan")
    vs_tiny = tiny / ours if tiny and ours else float("nan")
    floor_us = int4_floor_bytes(row.k, row.n) / bandwidth * 1e6
    of_floor = floor_us / ours if ours else float("nan")
    goal = GOALS.get(row.m)
    met = (
        "-"
        if goal is None
        else "yes"
        if ratio >= goal and vs_tiny >= GOAL_VS_TINYGEMM.get(row.m, 0)
        else "NO"
    )
    cells = [
        f"{row.shape} {row.k}x{row.n}",
        str(row.m),
        _cell(row, "fp16"),
        _cell(row, "ours"),
        _cell(row, "ours_eager"),
        _cell(row, "tinygemm"),
        f"{ratio:.2f}x",
        f"{vs_tiny:.2f}x",
        f"{floor_us:.1f}",
        f"{of_floor:.0%}",
        f">={goal}x" if goal else "-",
        met,
    ]
    return "| " + " | ".join(cells) + " |"


ACT_METHODS = ("no act-order", "sorted+perm in kernel", "sorted+torch gather", "g_idx kernel")
MAIN_HEADER = (
    "| shape (K x N) | M | fp16 us | ours us | ours eager us | tinygemm us | ours vs fp16 | "
    "ours vs tinygemm | int4 floor us | floor/ours | goal | met |"
)


def format_act(row: Row) -> str:
    return (
        "| "
        + " | ".join([f"{row.shape} {row.k}x{row.n}", str(row.m), *(_cell(row, m) for m in ACT_METHODS)])
        + " |"
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes, for CI under TRITON_INTERPRET=1")
    p.add_argument(
        "--budget-s", type=float, default=540, help="stop starting new rows after this (default 540)"
    )
    p.add_argument("--reps", type=int, default=50, help="graph replays per timing")
    p.add_argument("--no-eager", dest="eager", action="store_false", help="skip the eager (do_bench) column")
    p.add_argument("--no-act-order", dest="act_order", action="store_false", help="skip the act-order table")
    p.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "bench_matmul.json"))
    args = p.parse_args(argv)
    args.shapes = SMOKE_SHAPES if args.smoke else SHAPES
    args.ms = (1, 16) if args.smoke else MS
    args.act_shapes = tuple(args.shapes) if args.smoke else ACT_ORDER_SHAPES
    args.act_ms = (1,) if args.smoke else ACT_ORDER_MS
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    deadline = start + args.budget_s
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("no CUDA device: run with TRITON_INTERPRET=1 and --smoke to check the script on a CPU")
        return 2
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"
    args.bandwidth = copy_bandwidth(device)
    print(
        f"# device: {name}; torch {torch.__version__}; triton {triton.__version__}; "
        f"copy bandwidth {args.bandwidth / 1e12:.2f} TB/s",
        flush=True,
    )
    timer = Timer(device, args.reps)
    print(MAIN_HEADER + "\n|" + "---|" * 12, flush=True)
    rows = main_table(args, device, timer, deadline)
    act_rows = []
    if args.act_order:
        print(
            "\n| act-order (K x N) | M | " + " us | ".join(ACT_METHODS) + " us |\n|" + "---|" * 6, flush=True
        )
        act_rows = act_order_table(args, device, timer, deadline)
    with open(args.json, "w") as f:
        json.dump(
            {
                "device": name,
                "torch": torch.__version__,
                "triton": triton.__version__,
                "copy_bandwidth": args.bandwidth,
                "main": [asdict(r) for r in rows],
                "act_order": [asdict(r) for r in act_rows],
            },
            f,
            indent=1,
        )
    print(f"# {len(rows)} + {len(act_rows)} rows in {time.monotonic() - start:.0f} s; json: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
