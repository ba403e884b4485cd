"""Serving benchmark: our runtime with int4 weights against the same runtime with fp16 weights.

A Llama-2-7B-shaped model with random weights (the speed of a matmul does not depend on the
values), run through the real engine (scheduler, CUDA-graph decode, sampling, detokenization),
both variants in one process, one after the other:

- decode tokens/s at batch 1 (one request, greedy, ``--tokens`` tokens after the first),
- time to first token at batch 1 (median of 5, ``--prompt-len`` tokens of prompt),
- throughput (generated tokens/s over the wall time) at 8, 32 and 64 concurrent requests.

Goals (issue 6): batch-1 decode >= 450 tok/s on an H100 and >= 3x our own fp16.

    python runtime/benchmarks/serve_bench_gpu.py          # the GPU run, < 10 minutes on an H100
    python runtime/benchmarks/serve_bench_gpu.py --smoke  # tiny shape on CPU, seconds (a test runs it)

Prints a table; never asserts on times.
"""

from __future__ import annotations

import argparse
import gc
import logging
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field

import torch

from qmodel_runtime import loader
from qmodel_runtime.engine import Engine, EngineConfig, SamplingParams
from qmodel_runtime.model import ModelArgs, try_compiled_ops

log = logging.getLogger("serve_bench")


class ByteTokenizer:
    """Detokenization at a realistic cost without a tokenizer file: id -> one byte-ish char."""

    def decode(self, ids, **_):
        return "".join(chr(32 + i % 95) for i in ids)


@dataclass
class Run:
    submitted: float
    times: list[float] = field(default_factory=list)
    tokens: int = 0
    done: threading.Event = field(default_factory=threading.Event)

    def emit(self, out) -> None:
        self.times.append(time.perf_counter())
        self.tokens = out.completion_tokens
        if out.finished:
            self.done.set()


def submit(engine: Engine, rid: str, prompt: list[int], tokens: int) -> Run:
    run = Run(time.perf_counter())
    engine.submit(rid, prompt, SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True), run.emit)
    return run


def measure(engine: Engine, args: ModelArgs, opts) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, args.vocab_size, (opts.prompt_len,), generator=g).tolist()
    results: dict[str, float] = {}
    submit(engine, "warm", prompt, 8).done.wait()
    one = submit(engine, "b1", prompt, opts.tokens + 1)
    one.done.wait()
    results["decode tok/s, batch 1"] = opts.tokens / (one.times[-1] - one.times[0])
    ttfts = []
    for i in range(5):
        r = submit(engine, f"ttft{i}", prompt, 1)
        r.done.wait()
        ttfts.append(r.times[0] - r.submitted)
    results[f"TTFT ms, {opts.prompt_len}-token prompt"] = statistics.median(ttfts) * 1000
    for n in opts.concurrency:
        start = time.perf_counter()
        runs = [submit(engine, f"c{n}-{i}", prompt[i % 7 :], opts.tokens) for i in range(n)]
        for r in runs:
            r.done.wait()
        results[f"throughput tok/s, {n} concurrent"] = sum(r.tokens for r in runs) / (
            time.perf_counter() - start
        )
    return results


def run_variant(name: str, args: ModelArgs, opts) -> tuple[dict[str, float], dict[str, float]]:
    device = torch.device(opts.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    quant = loader.QuantConfig(bits=4, group_size=opts.group_size) if name == "int4" else None
    t0 = time.perf_counter()
    model = loader.random_model(args, device, dtype, quant)
    if device.type == "cuda" and not opts.no_compile:
        model.ops = try_compiled_ops(device, dtype)
    weights = loader.module_bytes(model)
    slots = max(opts.concurrency)
    model.setup_caches(slots, opts.max_model_len, dtype, device)
    config = EngineConfig(
        slots, opts.max_model_len, max_queue=4 * slots, prefill_tokens=opts.prefill_chunk, device=str(device)
    )
    engine = Engine(model, ByteTokenizer(), config)
    info = {"weights GiB": weights / 2**30, "build s": time.perf_counter() - t0}
    if device.type == "cuda" and not opts.no_graphs:
        info["graph capture s"] = engine.capture_graphs()
    engine.start()
    try:
        results = measure(engine, args, opts)
    finally:
        engine.shutdown(grace=0.0)
    if device.type == "cuda":
        info["peak GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
    del engine, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return results, info


def table(rows: dict[str, dict[str, float]], infos: dict[str, dict[str, float]], device: str) -> str:
    fp16, int4 = rows["fp16"], rows["int4"]
    goals = {"decode tok/s, batch 1": ">= 450 and >= 3x"}
    lines = [
        f"device: {device}",
        "",
        f"| {'metric':<34} | {'fp16':>10} | {'int4':>10} | {'int4/fp16':>9} | goal             |",
        f"|{'-' * 36}|{'-' * 12}|{'-' * 12}|{'-' * 11}|{'-' * 18}|",
    ]
    for key in fp16:
        ratio = int4[key] / fp16[key] if fp16[key] else float("nan")
        lines.append(
            f"| {key:<34} | {fp16[key]:>10.1f} | {int4[key]:>10.1f} | {ratio:>8.2f}x | "
            f"{goals.get(key, ''):<16} |"
        )
    lines.append("")
    for name, info in infos.items():
        lines.append(f"{name}: " + ", ".join(f"{k} {v:.2f}" for k, v in info.items()))
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama-2-7b", help="a shape from qmodel_runtime.model.NAMED")
    p.add_argument("--tokens", type=int, default=256, help="generated tokens per request")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[8, 32, 64])
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--prefill-chunk", type=int, default=2048)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--device", default="cuda")
    p.add_argument("--no-graphs", action="store_true", help="eager decode (to see what the graphs buy)")
    p.add_argument(
        "--no-compile", action="store_true", help="eager elementwise ops (to see what fusion buys)"
    )
    p.add_argument(
        "--smoke", action="store_true", help="tiny shape on CPU: checks the script, measures nothing"
    )
    opts = p.parse_args(argv)
    if opts.smoke:
        opts.model, opts.device, opts.tokens, opts.prompt_len = "tiny", "cpu", 8, 16
        opts.concurrency, opts.max_model_len, opts.group_size = [2, 4], 64, 32
    return opts


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    opts = parse(argv)
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: run on the GPU machine, or use --smoke on CPU", file=sys.stderr)
        return 2
    args = ModelArgs.from_name(opts.model)
    rows, infos = {}, {}
    for name in ("fp16", "int4"):
        log.info("%s: building a random %s model on %s", name, opts.model, opts.device)
        rows[name], infos[name] = run_variant(name, args, opts)
        log.info("%s: %s", name, rows[name])
    device = torch.cuda.get_device_name(opts.device) if opts.device.startswith("cuda") else "cpu"
    print(table(rows, infos, device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
