"""Continuous batching over a fixed set of KV-cache slots.

A request waits in a bounded FIFO queue until a slot is free, then owns that slot until it
finishes. Every engine step:
  1. one prefill chunk: the prompts (or pieces of long prompts) of newly admitted requests,
     at most ``prefill_tokens`` tokens in all, so a long prompt never stalls decoding for more
     than one chunk;
  2. one decode step for every request whose prompt is in the cache.
Requests join the decode batch the step after their prefill finishes and leave it the step
they finish, so the batch changes every step. Slots are handed out lowest first: the decode
batch is the slot range [0, highest busy slot], which keeps it a view of the cache.

Pure bookkeeping: no tensors, no threads (the engine holds the lock around it).
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from qmodel_runtime.engine.detok import Detokenizer
from qmodel_runtime.engine.sampling import SamplingParams


class QueueFull(RuntimeError):
    """The waiting queue is at its bound: the caller should retry later (HTTP 429)."""


@dataclass(frozen=True)
class RequestOutput:
    """What one engine step produced for one request (a streaming delta)."""

    request_id: str
    text: str  # new text since the previous output
    token_ids: tuple[int, ...]  # new token ids
    prompt_tokens: int
    completion_tokens: int  # total so far
    finish_reason: str | None = None  # stop | length | abort

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[RequestOutput], None]
    detok: Detokenizer
    generator: torch.Generator | None = None
    arrival: float = field(default_factory=time.monotonic)
    slot: int = -1
    prefilled: int = 0  # prompt tokens already in the cache
    output_ids: list[int] = field(default_factory=list)
    first_token_at: float | None = None
    last_token_at: float | None = None
    finish_reason: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.prompt_ids) and bool(self.output_ids)


@dataclass(frozen=True)
class PrefillItem:
    seq: Sequence
    start: int  # first prompt position of this chunk
    tokens: list[int]

    @property
    def completes_prompt(self) -> bool:
        return self.start + len(self.tokens) == len(self.seq.prompt_ids)


class Scheduler:
    def __init__(self, slots: int, max_len: int, max_queue: int, prefill_tokens: int):
        self.slots, self.max_len, self.max_queue, self.prefill_tokens = (
            slots,
            max_len,
            max_queue,
            prefill_tokens,
        )
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}  # slot -> sequence
        self._free = list(range(slots))  # a heap: lowest slot first
        self._by_id: dict[str, Sequence] = {}

    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.max_queue:
            raise QueueFull(f"{len(self.waiting)} requests are already waiting (the server's --max-queue)")
        if seq.request_id in self._by_id:
            raise ValueError(f"duplicate request id {seq.request_id}")
        self.waiting.append(seq)
        self._by_id[seq.request_id] = seq

    def admit(self) -> list[Sequence]:
        """Give free slots to waiting requests, oldest first."""
        admitted = []
        while self.waiting and self._free:
            seq = self.waiting.popleft()
            seq.slot = heapq.heappop(self._free)
            self.running[seq.slot] = seq
            admitted.append(seq)
        return admitted

    def remove(self, request_id: str) -> Sequence | None:
        """Take a request out wherever it is (finished, aborted); frees its slot at once."""
        seq = self._by_id.pop(request_id, None)
        if seq is None:
            return None
        if seq.slot >= 0:
            del self.running[seq.slot]
            heapq.heappush(self._free, seq.slot)
            seq.slot = -1
        elif seq in self.waiting:
            self.waiting.remove(seq)
        return seq

    def prefill_batch(self) -> list[PrefillItem]:
        """Prompt chunks for this step, oldest first, within the token budget. The budget is
        counted as the padded rectangle rows x longest chunk, which is what the forward costs."""
        items: list[PrefillItem] = []
        pending = sorted(
            (s for s in self.running.values() if s.prefilled < len(s.prompt_ids)), key=lambda s: s.arrival
        )
        longest = 0
        for seq in pending:
            remaining = len(seq.prompt_ids) - seq.prefilled
            if not items:
                n = min(remaining, self.prefill_tokens)
            elif (len(items) + 1) * max(longest, remaining) <= self.prefill_tokens:
                n = remaining
            else:
                break
            items.append(PrefillItem(seq, seq.prefilled, seq.prompt_ids[seq.prefilled : seq.prefilled + n]))
            longest = max(longest, n)
        return items

    def decode_batch(self) -> list[Sequence]:
        """Requests whose prompt is cached and that have a token to feed, in slot order."""
        return [self.running[s] for s in sorted(self.running) if self.running[s].decoding]

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def kv_usage(self) -> float:
        """Fraction of the cache's token capacity that holds live tokens."""
        used = sum(min(s.num_tokens, self.max_len) for s in self.running.values())
        return used / (self.slots * self.max_len)
