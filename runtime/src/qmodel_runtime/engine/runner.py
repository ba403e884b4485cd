"""Model calls for the engine: prefill and decode as free functions over the model, plus the
CUDA-graph path for decode.

Decode runs over the slot range [0, B): row b is slot b, idle rows feed token 0 at the
scratch position ``max_len`` (written, never read). On a GPU the step is replayed from a CUDA
graph captured per (batch bucket, attention-length bucket): at batch 1 a 7B decode step is
~450 small kernels, and launching them one by one from Python costs more than the GPU time
of the step (anchors.md: int4 weights move in ~1.3 ms, launches ~5 us each). Idle rows and
the unused tail of an attention bucket are masked, so a bucketed step computes the same
logits as an exact one for the real rows.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import Tensor

from qmodel_runtime.model import Transformer

log = logging.getLogger(__name__)


def buckets(limit: int, start: int, factor: float = 2.0) -> list[int]:
    """start, start*factor, ... capped by and ending with ``limit``."""
    out, b = [], start
    while b < limit:
        out.append(int(b))
        b = max(b + 1, int(b * factor))
    return [*out, limit]


def bucket_for(n: int, sizes: list[int]) -> int:
    for b in sizes:
        if n <= b:
            return b
    raise ValueError(f"{n} is beyond the largest bucket {sizes[-1]}")


@torch.inference_mode()
def prefill(model: Transformer, chunks: list[tuple[int, int, list[int]]], device) -> Tensor:
    """chunks: (slot, start position, prompt tokens) -> logits [n, V] at each chunk's last token.
    Rows are right-padded; padding writes only the scratch position or positions that decode
    overwrites before reading."""
    longest = max(len(t) for _, _, t in chunks)
    tokens = torch.zeros(len(chunks), longest, dtype=torch.long)
    pos = torch.full((len(chunks), longest), model.max_len, dtype=torch.long)
    for i, (_, start, toks) in enumerate(chunks):
        tokens[i, : len(toks)] = torch.tensor(toks)
        pos[i, : len(toks)] = torch.arange(start, start + len(toks))
    last = torch.tensor([len(t) - 1 for _, _, t in chunks])
    slots = torch.tensor([s for s, _, _ in chunks])
    attn_len = max(start + len(t) for _, start, t in chunks)
    return model(tokens.to(device), pos.to(device), attn_len, last.to(device), slots.to(device))


def decode_inputs(rows: list[tuple[int, int, int]], batch: int, max_len: int) -> tuple[Tensor, Tensor]:
    """rows: (slot, token, position) -> tokens, pos [batch, 1] with idle slots at the scratch column."""
    tokens = torch.zeros(batch, 1, dtype=torch.long)
    pos = torch.full((batch, 1), max_len, dtype=torch.long)
    for slot, token, p in rows:
        tokens[slot, 0], pos[slot, 0] = token, p
    return tokens, pos


@torch.inference_mode()
def decode_eager(model: Transformer, rows: list[tuple[int, int, int]], device) -> Tensor:
    """One token for every row: -> logits [len(rows), V] in the order of ``rows``."""
    batch = max(slot for slot, _, _ in rows) + 1
    tokens, pos = decode_inputs(rows, batch, model.max_len)
    attn_len = max(p for _, _, p in rows) + 1
    last = torch.zeros(batch, dtype=torch.long, device=device)
    logits = model(tokens.to(device), pos.to(device), attn_len, last)
    return logits[torch.tensor([slot for slot, _, _ in rows], device=device)]


class DecodeGraphs:
    """CUDA graphs of the decode step, one per (batch bucket, length bucket), sharing a pool."""

    def __init__(self, model: Transformer, slots: int, device):
        self.model, self.device = model, device
        self.batch_sizes = buckets(slots, 1)
        self.lengths = buckets(model.max_len, min(256, model.max_len))
        self.tokens = torch.zeros(slots, 1, dtype=torch.long, device=device)
        self.pos = torch.full((slots, 1), model.max_len, dtype=torch.long, device=device)
        self.last = torch.zeros(slots, dtype=torch.long, device=device)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, Tensor]] = {}

    @torch.inference_mode()
    def capture_all(self) -> float:
        """Capture every bucket now (so memory is known before serving); -> seconds taken."""
        t0 = time.monotonic()
        for b in reversed(self.batch_sizes):  # largest first: the pool is sized once
            for n in reversed(self.lengths):
                self._capture(b, n)
        torch.cuda.synchronize()
        return time.monotonic() - t0

    def _capture(self, batch: int, length: int) -> None:
        args = (self.tokens[:batch], self.pos[:batch], length, self.last[:batch])
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: autotuning and lazy init happen outside capture
            for _ in range(2):
                self.model(*args)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.model(*args)
        self.graphs[(batch, length)] = (graph, out)

    @torch.inference_mode()
    def run(self, rows: list[tuple[int, int, int]]) -> Tensor:
        batch = bucket_for(max(slot for slot, _, _ in rows) + 1, self.batch_sizes)
        length = bucket_for(max(p for _, _, p in rows) + 1, self.lengths)
        tokens, pos = decode_inputs(rows, batch, self.model.max_len)
        self.tokens[:batch].copy_(tokens, non_blocking=True)
        self.pos[:batch].copy_(pos, non_blocking=True)
        graph, out = self.graphs[(batch, length)]
        graph.replay()
        return out[torch.tensor([slot for slot, _, _ in rows], device=self.device)]
