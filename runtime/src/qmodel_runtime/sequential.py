"""Quantize a streamed model layer by layer (the GPTQ paper's sequential procedure).

Each decoder layer is loaded onto the device, its Linear layers are quantized on inputs
that come from the already-quantized layers before it, and its output (computed with the
quantized weights) becomes the next layer's input.

Within a layer, the Linear layers are found by walking the module and watching one
forward pass: Linears that receive the very same input tensor form a stage, and stages
are ordered by their first call. For the Llama family that gives q/k/v, then o, then
gate/up, then down, without naming any of them. With ``true_sequential`` each stage's
Hessian is collected on inputs produced by the stages already quantized (and the forward
pass stops right where that stage's input is ready); otherwise all Hessians come from one
pass over the unquantized layer. Linears of a stage share one Hessian and are quantized
as one matrix (their rows stacked), which gives the same result as one by one: GPTQ
treats rows independently.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from qmodel_runtime.checkpoint import DEFAULT_MAX_SHARD_BYTES, CheckpointWriter
from qmodel_runtime.gptq import GPTQ, GPTQStats
from qmodel_runtime.progress import Progress
from qmodel_runtime.quantizer import QuantConfig, QuantizedWeight, rtn
from qmodel_runtime.streaming import LayerInputs, StreamedModel, _Stop, embed_all, forward_layer, run_layer

log = logging.getLogger(__name__)

# Called after each layer with (layer index, {linear name in the layer: result}).
LayerSink = Callable[[int, dict[str, QuantizedWeight]], None]


@dataclass(frozen=True)
class LayerReport:
    index: int
    seconds: float
    stages: list[dict]  # per stage: linears, loss, damp, dead columns


def linear_stages(layer: nn.Module, index: int, sample: LayerInputs) -> list[list[str]]:
    """Names of the layer's Linears grouped by shared input, in call order (one forward on
    ``sample``). Raises ValueError if a Linear is never called."""
    linears = {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
    seen: list[tuple[str, torch.Tensor]] = []  # holding the inputs keeps their memory from reuse
    hooks = [
        m.register_forward_pre_hook(lambda _m, args, name=name: seen.append((name, args[0])))
        for name, m in linears.items()
    ]
    try:
        run_layer(layer, index, sample)
    finally:
        for h in hooks:
            h.remove()
    stages: list[list[str]] = []
    owner: list[torch.Tensor] = []
    for name, inp in seen:
        match = [i for i, t in enumerate(owner) if _same_tensor(t, inp)]
        if match:
            if name not in stages[match[0]]:
                stages[match[0]].append(name)
        else:
            owner.append(inp)
            stages.append([name])
    unused = set(linears) - {n for s in stages for n in s}
    if unused:
        raise ValueError(f"Linear layers never called in a forward pass: {sorted(unused)}")
    return stages


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


def collect_hessians(
    layer: nn.Module, index: int, stages: list[list[str]], chunks: list[LayerInputs], device
) -> list[GPTQ]:
    """One Hessian per given stage, from a forward pass over every chunk that stops as soon as
    the last given stage's input has been seen (the rest of the layer is not needed)."""
    modules = dict(layer.named_modules())
    hessians = [GPTQ(modules[s[0]].in_features, device) for s in stages]

    def hook(stage: int):
        def record(_module, args):
            hessians[stage].add_batch(args[0])
            if stage == len(stages) - 1:
                raise _Stop()

        return record

    handles = [modules[s[0]].register_forward_pre_hook(hook(i)) for i, s in enumerate(stages)]
    try:
        for inputs in chunks:
            try:
                run_layer(layer, index, LayerInputs(inputs.hidden.to(device), inputs.calls))
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return hessians


def quantize_stage(
    layer: nn.Module, names: list[str], hessian: GPTQ | None, cfg: QuantConfig
) -> tuple[dict[str, QuantizedWeight], dict]:
    """Quantize the stage's Linears as one stacked matrix; their weights become the dequantized
    values (so later stages and layers see the quantized model)."""
    modules = dict(layer.named_modules())
    weights = [modules[n].weight for n in names]
    stacked = torch.cat([w.detach() for w in weights], dim=0)
    if cfg.method == "rtn":
        result, stats = rtn(stacked, cfg), None
    else:
        result, stats = hessian.quantize(stacked, cfg)
        hessian.free()
    out, start = {}, 0
    dequantized = result.dequantize()
    for name, w in zip(names, weights, strict=True):
        stop = start + w.shape[0]
        out[name] = result.rows(start, stop)
        w.data.copy_(dequantized[start:stop])
        start = stop
    return out, _stage_report(names, stats)


def _stage_report(names: list[str], stats: GPTQStats | None) -> dict:
    report = {"linears": names}
    if stats is not None:
        report.update(loss=stats.loss, damp=stats.damp_percent, dead=stats.dead_columns)
    return report


def quantize_layer(
    layer: nn.Module, index: int, chunks: list[LayerInputs], cfg: QuantConfig, device
) -> tuple[dict[str, QuantizedWeight], list[dict]]:
    """GPTQ of all Linears of one decoder layer, in true-sequential order when configured. The
    stage reports carry the seconds spent on forward passes + Hessians and on quantizing."""
    sample = LayerInputs(chunks[0].hidden[:1].to(device), chunks[0].calls)
    stages = linear_stages(layer, index, sample)
    results: dict[str, QuantizedWeight] = {}
    reports: list[dict] = []
    clock = _StageClock(device)
    hessians = [None] * len(stages)
    if not cfg.true_sequential:  # all from the unquantized layer
        hessians = collect_hessians(layer, index, stages, chunks, device)
    shared_seconds = clock.lap()
    for s, names in enumerate(stages):
        if cfg.true_sequential:  # inputs from the stages quantized so far
            hessians[s] = collect_hessians(layer, index, [names], chunks, device)[0]
        hessian_seconds = clock.lap() + (shared_seconds if s == 0 else 0.0)
        stage_results, report = quantize_stage(layer, names, hessians[s], cfg)
        hessians[s] = None
        report.update(forward_seconds=round(hessian_seconds, 4), quantize_seconds=round(clock.lap(), 4))
        results.update(stage_results)
        reports.append(report)
    return results, reports


def rtn_layer(layer: nn.Module, cfg: QuantConfig) -> tuple[dict[str, QuantizedWeight], list[dict]]:
    """Round-to-nearest of every Linear in the layer (each its own matrix, no inputs needed)."""
    results, reports = {}, []
    for name, module in layer.named_modules():
        if isinstance(module, nn.Linear):
            stage_results, report = quantize_stage(layer, [name], None, cfg)
            results.update(stage_results)
            reports.append(report)
    return results, reports


class _StageClock:
    """Wall time between laps, with the GPU's queue drained at each lap (else launches return early)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.last = self._now()

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.monotonic()

    def lap(self) -> float:
        now = self._now()
        elapsed, self.last = now - self.last, now
        return elapsed


@torch.no_grad()
def quantize_model(
    sm: StreamedModel, windows: torch.Tensor, cfg: QuantConfig, sink: LayerSink, batch_size: int = 8
) -> list[LayerReport]:
    """Quantize every decoder layer of ``sm`` on calibration ``windows`` [n, T]; each layer's
    results go to ``sink`` as soon as the layer is done. RTN needs no calibration: it rounds
    each layer's weights without running the model."""
    progress = Progress(f"{cfg.method} {cfg.bits}-bit", sm.num_layers, unit="layers")
    chunks = embed_all(sm, windows, batch_size) if cfg.method == "gptq" else None
    reports = []
    for i in range(sm.num_layers):
        start = time.monotonic()
        layer = sm.load_layer(i)
        if chunks is None:
            results, stages = rtn_layer(layer, cfg)
        else:
            results, stages = quantize_layer(layer, i, chunks, cfg, sm.device)
            forward_layer(sm, layer, i, chunks)  # the next layer sees this layer quantized
        sm.release_layer(i)
        sink(i, results)
        reports.append(LayerReport(i, time.monotonic() - start, stages))
        progress.update(1, note=_layer_note(stages))
    return reports


def _layer_note(stages: list[dict]) -> str:
    parts = [
        f"{'/'.join(n.rsplit('.', 1)[-1] for n in s['linears'])} {s['loss']:.3g}"
        for s in stages
        if "loss" in s
    ]
    return ("error " + ", ".join(parts)) if parts else ""


def quantize_checkpoint(
    source,
    dest,
    cfg: QuantConfig,
    windows: torch.Tensor,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> tuple[CheckpointWriter, list[LayerReport]]:
    """The model folder ``source`` quantized into the checkpoint folder ``dest``: every file but
    the manifest (call ``writer.write_manifest`` once the checkpoint has been evaluated)."""
    sm = StreamedModel.open(source, device)
    writer = CheckpointWriter(dest, source, sm.prefix, cfg, max_shard_bytes)
    reports = quantize_model(sm, windows, cfg, writer.add_layer, batch_size)
    writer.write_files()
    return writer, reports
