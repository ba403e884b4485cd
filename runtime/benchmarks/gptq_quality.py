"""GPTQ quality benchmark: perplexity of SmolLM2-135M quantized every way, beside fp32 and RTN.

    python runtime/benchmarks/gptq_quality.py                       # the full grid, full eval split
    python runtime/benchmarks/gptq_quality.py --windows 100 --bits 4 3 --groups 64 --sym asym \\
        --act-order off                                            # the CI settings' rows

Calibration: ``--calibration`` windows (default 64) of ``--seq`` tokens (512) at seeded random
offsets of wiki-vital's calibration split. Evaluation: the first ``--windows`` non-overlapping
windows of its evaluation split (default: all of them). Every quantized model is written as a
GPTQ v1 checkpoint and evaluated as read back, layers streamed. The table gives perplexity,
the increase over fp32, and wall seconds for quantization and evaluation; ``--json`` also
writes the rows to a file. Numbers are for the machine it runs on: compare rows of one run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from qmodel_runtime import assets, data, evaluate, streaming
from qmodel_runtime.checkpoint import open_quantized
from qmodel_runtime.quantizer import QuantConfig
from qmodel_runtime.sequential import quantize_checkpoint


@dataclass
class Row:
    method: str
    bits: int | None
    group: int | None
    sym: bool | None
    act_order: bool | None
    static: bool | None
    clip: int
    perplexity: float
    increase: float
    quantize_s: float
    evaluate_s: float


def variants(args) -> list[QuantConfig]:
    out = []
    for method, bits, group, sym, act in itertools.product(
        args.methods, args.bits, args.groups, args.sym, args.act_order
    ):
        if method == "rtn" and act != "off":
            continue  # act-order is a GPTQ ordering; RTN has no column order
        for static in [False] + ([True] if args.static_groups and act == "on" else []):
            out.append(
                QuantConfig(
                    bits=bits,
                    group_size=group,
                    sym=sym == "sym",
                    desc_act=act == "on",
                    static_groups=static,
                    method=method,
                    damp_percent=args.damp,
                    clip_steps=args.clip_steps,
                )
            )
    return out


def run_variant(cfg: QuantConfig, source: Path, calib, evaluation, args, baseline: float) -> Row:
    work = Path(tempfile.mkdtemp(prefix="gptq-bench-"))
    try:
        t0 = time.monotonic()
        quantize_checkpoint(source, work, cfg, calib, args.device, args.batch_size)
        t1 = time.monotonic()
        ppl = streaming.perplexity(
            open_quantized(work, args.device), evaluation, args.batch_size, "quantized"
        )
        t2 = time.monotonic()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Row(
        cfg.method,
        cfg.bits,
        cfg.group_size,
        cfg.sym,
        cfg.desc_act,
        cfg.static_groups,
        cfg.clip_steps,
        ppl.perplexity,
        100 * (ppl.perplexity / baseline - 1),
        t1 - t0,
        t2 - t1,
    )


def print_row(row: Row) -> None:
    def flag(v):
        return "-" if v is None else ("yes" if v else "no")

    sym = "-" if row.sym is None else ("sym" if row.sym else "asym")
    print(
        f"| {row.method:8} | {row.bits or '-':>4} | {row.group or '-':>5} | {sym:4} "
        f"| {flag(row.act_order):3} "
        f"| {flag(row.static):6} | {row.clip:4} | {row.perplexity:10.3f} | {row.increase:+7.2f}% "
        f"| {row.quantize_s:8.1f} | {row.evaluate_s:8.1f} |",
        flush=True,
    )


def eval_speed(source: Path, evaluation: torch.Tensor, device: str) -> None:
    """Ways to evaluate the same windows: the whole model (``evaluate.perplexity``, batch 4)
    against the layer-streamed evaluation at several batch sizes and under inference_mode.
    Every variant must give the same perplexity; the table shows which is fastest."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval().to(device)
    variants = [
        (
            "whole model, batch 4, no_grad (evaluate.perplexity)",
            lambda: evaluate.perplexity(model, evaluation, batch_size=4, device=device),
        ),
    ]
    for batch in (4, 8, 32):
        variants.append(
            (
                f"streamed layers, batch {batch}, no_grad",
                lambda b=batch: streaming.perplexity(
                    streaming.StreamedModel.open(source, device), evaluation, b
                ),
            )
        )
    variants.append(
        ("streamed layers, batch 8, inference_mode", lambda: _inference(source, evaluation, device))
    )
    print(
        f"| evaluation of {tuple(evaluation.shape)} windows | seconds | x first | perplexity | nll vs first |"
    )
    print("|---|---:|---:|---:|---:|")
    first = None
    for label, fn in variants:
        t0 = time.monotonic()
        result = fn()
        seconds = time.monotonic() - t0
        first = first or (seconds, result.nll_sum)
        print(
            f"| {label} | {seconds:.1f} | {seconds / first[0]:.2f} | {result.perplexity:.4f} "
            f"| {result.nll_sum / first[1] - 1:+.1e} |",
            flush=True,
        )


def _inference(source, evaluation, device):
    with torch.inference_mode():
        return streaming.perplexity(streaming.StreamedModel.open(source, device), evaluation, 8)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--windows", type=int, default=None, help="evaluation windows (default: the whole split)")
    p.add_argument("--calibration", type=int, default=64, help="calibration windows")
    p.add_argument("--seq", type=int, default=512, help="tokens per window")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", nargs="+", default=["rtn", "gptq"], choices=["rtn", "gptq"])
    p.add_argument("--bits", nargs="+", type=int, default=[2, 3, 4, 8])
    p.add_argument("--groups", nargs="+", type=int, default=[32, 64, 128])
    p.add_argument("--sym", nargs="+", default=["sym", "asym"], choices=["sym", "asym"])
    p.add_argument("--act-order", nargs="+", default=["off", "on"], choices=["off", "on"])
    p.add_argument("--static-groups", action="store_true", help="also act-order with static groups")
    p.add_argument("--clip-steps", type=int, default=0, help="MSE clipping search steps (0: min/max grid)")
    p.add_argument("--damp", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--no-baseline", action="store_true", help="skip the fp32 row (increase shown vs --baseline)"
    )
    p.add_argument("--baseline", type=float, default=None)
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument(
        "--eval-speed", action="store_true", help="only compare ways to evaluate (no quantization)"
    )
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # progress on stderr

    source = assets.model_path("smollm2-135m", "float32")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source)
    calib = data.calibration_windows(
        data.tokenize(tok, assets.wiki_text("calibration")), args.calibration, args.seq, args.seed
    )
    evaluation = data.token_windows(
        data.tokenize(tok, assets.wiki_text("evaluation")), args.seq, args.windows
    )
    print(
        f"SmolLM2-135M fp32 on {args.device} ({torch.get_num_threads()} threads): calibration "
        f"{tuple(calib.shape)}, evaluation {tuple(evaluation.shape)}\n"
    )
    if args.eval_speed:
        eval_speed(source, evaluation, args.device)
        return
    print(
        "| method   | bits | group | sym  | act | static | clip | perplexity | vs fp32  "
        "| quant s  | eval s   |"
    )
    print(
        "|----------|-----:|------:|------|-----|--------|-----:|-----------:|---------:|---------:|---------:|"
    )
    rows = []
    if args.no_baseline:
        baseline = args.baseline or float("nan")
    else:
        t0 = time.monotonic()
        base = streaming.perplexity(
            streaming.StreamedModel.open(source, args.device), evaluation, args.batch_size
        )
        baseline = base.perplexity
        rows.append(Row("fp32", None, None, None, None, None, 0, baseline, 0.0, 0.0, time.monotonic() - t0))
        print_row(rows[-1])
    for cfg in variants(args):
        rows.append(run_variant(cfg, source, calib, evaluation, args, baseline))
        print_row(rows[-1])
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))


if __name__ == "__main__":
    main()
