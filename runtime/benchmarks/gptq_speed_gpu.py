"""GPTQ speed on a GPU: a Llama-2-7B-shaped model with random weights, ours beside the reference.

    python runtime/benchmarks/gptq_speed_gpu.py --reference /path/to/IST-DASLab/gptq [--layers 8]

Model: 32 decoder layers, hidden 4096, FFN 11008, 32 heads, fp16, random weights (std 0.02).
Calibration: 128 sequences x 2048 random tokens. Quantization: 4-bit, group 128, asymmetric
(``--sym`` for symmetric), true-sequential, no act-order, damp 0.01: the reference's llama.py
settings. For every timed layer both implementations start from the same weights and the same
input activations (ours' quantized-model inputs), and each layer's relative output error
||f_q(X) - f(X)||^2 / ||f(X)||^2 is measured on the first 16 calibration sequences.

The reference is IST-DASLab/gptq's gptq.py + quant.py imported unmodified from the checkout
given with ``--reference`` (never copied into this project), driven the way its llama.py
drives them: forward hooks per Linear, one sequence per forward call, one pass per
true-sequential group, then a final pass for the layer's outputs. Its "column loop" time is
the sum of the times fasterquant prints.

``--layers N`` times the first N layers and extrapolates to 32 (labelled as such); a run of
8 layers takes about 3 minutes on an H100.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from qmodel_runtime.quantizer import QuantConfig
from qmodel_runtime.sequential import quantize_layer
from qmodel_runtime.streaming import (
    LayerInputs,
    StreamedModel,
    build_skeleton,
    embed_all,
    forward_layer,
    run_layer,
)

LLAMA2_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
    max_position_embeddings=4096,
)
ERROR_SAMPLES = 16


class RandomWeights:
    """Deterministic random tensors under a model's state-dict names, made on the GPU on demand."""

    def __init__(self, shapes: dict[str, torch.Size], device: torch.device, dtype: torch.dtype):
        self.shapes, self.device, self.dtype = shapes, device, dtype

    def keys(self) -> list[str]:
        return list(self.shapes)

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        out = {}
        for key in keys:
            if key.endswith("norm.weight"):
                out[key] = torch.ones(self.shapes[key], dtype=self.dtype, device=self.device)
                continue
            seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") % 2**63
            gen = torch.Generator(self.device).manual_seed(seed)
            out[key] = (torch.randn(self.shapes[key], generator=gen, device=self.device) * 0.02).to(
                self.dtype
            )
        return out


# --smoke: the same code paths on a CPU in a minute (fp32, a 7B layer's shape divided by 16).
SMOKE = dict(
    hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=4, vocab_size=512
)


def random_model(layers: int, device: torch.device, smoke: bool) -> StreamedModel:
    from transformers import LlamaConfig

    shape = {**LLAMA2_7B, **(SMOKE if smoke else {}), "num_hidden_layers": layers}
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    skeleton = build_skeleton(LlamaConfig(**shape, tie_word_embeddings=False), dtype)
    shapes = {k: v.shape for k, v in skeleton.state_dict().items()}
    return StreamedModel(skeleton.eval(), RandomWeights(shapes, device, dtype), device, dtype)


def relative_error(fp_out: list[torch.Tensor], q_out: list[torch.Tensor]) -> float:
    num = sum(float((q.float() - f.float()).pow(2).sum()) for f, q in zip(fp_out, q_out, strict=True))
    den = sum(float(f.float().pow(2).sum()) for f in fp_out)
    return num / den


def outputs(layer, index: int, chunks: list[LayerInputs], device) -> list[torch.Tensor]:
    """The layer's output on the first ERROR_SAMPLES sequences."""
    out, left = [], ERROR_SAMPLES
    for c in chunks:
        if left <= 0:
            break
        x = c.hidden[:left].to(device)
        out.append(run_layer(layer, index, LayerInputs(x, c.calls)))
        left -= x.shape[0]
    return out


def sync_time() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.monotonic()


def reset_peak() -> None:
    if torch.cuda.is_available():
        reset_peak()


def peak() -> int:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0


# --------------------------------------------------------------------------- the reference


def load_reference(path: Path):
    """gptq.GPTQ and quant.Quantizer from an IST-DASLab/gptq checkout, unmodified."""
    if not (path / "gptq.py").is_file() or not (path / "quant.py").is_file():
        raise SystemExit(f"{path} is not an IST-DASLab/gptq checkout (gptq.py and quant.py expected)")
    sys.path.insert(0, str(path))
    import gptq as ref_gptq
    import quant as ref_quant

    return ref_gptq.GPTQ, ref_quant.Quantizer


def reference_layer(ref, layer, index: int, chunks: list[LayerInputs], args) -> tuple[float, float]:
    """Quantize ``layer`` as the reference's llama.py does; -> (seconds, column-loop seconds)."""
    GPTQ, Quantizer = ref
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    groups = [
        ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"],
        ["self_attn.o_proj"],
        ["mlp.up_proj", "mlp.gate_proj"],
        ["mlp.down_proj"],
    ]
    samples = [(c, j) for c in chunks for j in range(c.hidden.shape[0])]

    def one_pass():
        for c, j in samples:  # one sequence per call, as llama.py
            run_layer(layer, index, LayerInputs(c.hidden[j : j + 1], c.calls))

    printed = io.StringIO()
    start = sync_time()
    for names in groups:
        gptq = {}
        for name in names:
            gptq[name] = GPTQ(linears[name])
            gptq[name].quantizer = Quantizer()
            gptq[name].quantizer.configure(args.bits, perchannel=True, sym=args.sym, mse=False)
        handles = [
            linears[n].register_forward_hook(
                lambda _m, inp, out, n=n, g=gptq: g[n].add_batch(inp[0].data, out.data)
            )
            for n in names
        ]
        one_pass()
        for h in handles:
            h.remove()
        with contextlib.redirect_stdout(printed):
            for name in names:
                gptq[name].fasterquant(percdamp=0.01, groupsize=args.group_size, actorder=False)
                gptq[name].free()
    one_pass()  # the layer's outputs (discarded here: ours feed the next layer)
    seconds = sync_time() - start
    loop = sum(float(t) for t in re.findall(r"time ([0-9.]+)", printed.getvalue()))
    return seconds, loop


# --------------------------------------------------------------------------- the run


def run(args) -> None:
    device = torch.device("cpu" if args.smoke else "cuda")
    cfg = QuantConfig(bits=args.bits, group_size=args.group_size, sym=args.sym, desc_act=False)
    sm = random_model(args.layers, device, args.smoke)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, sm.config.vocab_size, (args.samples, args.seq), generator=gen)
    chunks = embed_all(sm, ids, args.batch_size)
    ref = load_reference(args.reference) if args.reference else None
    rows = []
    for i in range(args.layers):
        row = {"layer": i}
        fp = sm.load_layer(i)
        fp_out = outputs(fp, i, chunks, device)
        sm.release_layer(i)
        if ref is not None:
            layer = sm.load_layer(i)
            reset_peak()
            row["ref_s"], row["ref_loop_s"] = reference_layer(ref, layer, i, chunks, args)
            row["ref_peak"] = peak()
            row["ref_err"] = relative_error(fp_out, outputs(layer, i, chunks, device))
            sm.release_layer(i)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        reset_peak()
        start = sync_time()
        layer = sm.load_layer(i)
        _, stages = quantize_layer(layer, i, chunks, cfg, device)
        row["ours_err"] = relative_error(fp_out, outputs(layer, i, chunks, device))
        forward_layer(sm, layer, i, chunks)
        row["ours_s"] = sync_time() - start
        row["ours_loop_s"] = sum(s["quantize_seconds"] for s in stages)
        row["ours_peak"] = peak()
        sm.release_layer(i)
        rows.append(row)
        print(f"layer {i}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "layer"), flush=True)
    report(rows, args, ref is not None)


def device_line() -> str:
    import triton

    if not torch.cuda.is_available():
        return f"CPU ({torch.get_num_threads()} threads), SMOKE RUN: shapes divided by 16, not a measurement"
    props = torch.cuda.get_device_properties(0)
    memory = props.total_memory / 2**30
    return f"{props.name}, {memory:.0f} GiB; torch {torch.__version__}, triton {triton.__version__}"


def report(rows: list[dict], args, with_ref: bool) -> None:
    print("\n" + device_line())
    print(
        f"Llama-2-7B shape, {args.samples} x {args.seq} calibration, {args.bits}-bit g{args.group_size} "
        f"{'sym' if args.sym else 'asym'}, true-sequential; {len(rows)} of 32 layers timed"
        + ("" if len(rows) == 32 else " (32-layer totals EXTRAPOLATED from the mean)")
        + "\n"
    )
    print(
        "| implementation | s / layer | column loop s / layer | forward + Hessian s / layer "
        "| 32 layers (min) | peak GPU GiB | rel. output error |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    impls = ([("reference (IST-DASLab gptq.py)", "ref")] if with_ref else []) + [("qmodel", "ours")]
    for label, key in impls:
        per_layer = statistics.mean(r[f"{key}_s"] for r in rows)
        loop = statistics.mean(r[f"{key}_loop_s"] for r in rows)
        peak = max(r[f"{key}_peak"] for r in rows) / 2**30
        err = statistics.mean(r[f"{key}_err"] for r in rows)
        print(
            f"| {label} | {per_layer:.2f} | {loop:.2f} | {per_layer - loop:.2f} | {per_layer * 32 / 60:.1f} "
            f"| {peak:.1f} | {err:.3e} |"
        )
    if with_ref:
        speedup = sum(r["ref_s"] for r in rows) / sum(r["ours_s"] for r in rows)
        better = sum(r["ours_err"] <= r["ref_err"] for r in rows)
        print(
            f"\nspeed-up: {speedup:.2f}x; our output error <= the reference's on {better}/{len(rows)} layers"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reference", type=Path, help="path of an IST-DASLab/gptq checkout (omit: ours only)")
    p.add_argument("--layers", type=int, default=32, help="layers to time (totals extrapolated to 32)")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--sym", action="store_true")
    p.add_argument("--batch-size", type=int, default=8, help="our sequences per forward call")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script runs")
    args = p.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU (or --smoke to check it on a CPU)")
    if not 1 <= args.layers <= 32:
        raise SystemExit("--layers must be within 1..32")
    with torch.no_grad():
        run(args)


if __name__ == "__main__":
    main()
