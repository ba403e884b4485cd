"""The engine: one thread that owns the model and runs scheduler steps.

HTTP handlers call ``submit`` / ``abort`` from the event loop; outputs come back through each
request's ``emit`` callback (the server turns it into a thread-safe queue put). The model only
ever runs on the engine thread, so the event loop stays responsive while a step computes
(torch releases the GIL inside kernels).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from qmodel_runtime.engine import runner
from qmodel_runtime.engine.detok import Detokenizer
from qmodel_runtime.engine.sampling import SamplingParams, make_generator, sample
from qmodel_runtime.engine.scheduler import PrefillItem, RequestOutput, Scheduler, Sequence
from qmodel_runtime.model import Transformer

log = logging.getLogger(__name__)
_IDLE_WAIT = 0.5  # seconds the idle loop sleeps on its condition before rechecking shutdown


class EngineDraining(RuntimeError):
    """The engine is shutting down and admits no new requests (HTTP 503)."""


@dataclass(frozen=True)
class EngineConfig:
    slots: int
    max_len: int
    max_queue: int
    prefill_tokens: int  # prompt tokens per prefill chunk
    device: str
    cuda_graphs: bool = False


class EngineObserver:
    """Hooks for metrics; the default does nothing."""

    def on_step(self, running: int, waiting: int, kv_usage: float) -> None: ...

    def on_scheduled(self, waited: float) -> None: ...

    def on_token(self, seq: Sequence, now: float) -> None: ...

    def on_finish(self, seq: Sequence, now: float) -> None: ...


class Engine:
    def __init__(self, model: Transformer, tokenizer, config: EngineConfig, eos_token_ids=(), observer=None):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.eos = frozenset(eos_token_ids)
        self.observer = observer or EngineObserver()
        self.scheduler = Scheduler(config.slots, config.max_len, config.max_queue, config.prefill_tokens)
        self.graphs: runner.DecodeGraphs | None = None
        self._cv = threading.Condition()
        self._aborts: list[str] = []
        self._draining = False
        self._stop = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    # ------------------------------------------------------------------ lifecycle

    def capture_graphs(self) -> float:
        """Capture the decode CUDA graphs (GPU only); -> seconds taken."""
        self.graphs = runner.DecodeGraphs(self.model, self.config.slots, self.config.device)
        return self.graphs.capture_all()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="qmodel-engine", daemon=True)
        self._thread.start()

    def begin_drain(self) -> None:
        """Stop admitting: later ``submit`` calls raise EngineDraining."""
        with self._cv:
            self._draining = True

    def shutdown(self, grace: float) -> bool:
        """Drain, let in-flight requests finish for up to ``grace`` seconds, then cut the rest
        off (finish_reason "abort") and stop the thread. -> True when nothing was cut off."""
        self.begin_drain()
        deadline = time.monotonic() + grace
        with self._cv:
            while self.scheduler.has_work() and time.monotonic() < deadline and self.alive:
                self._cv.wait(timeout=min(0.05, max(deadline - time.monotonic(), 0.0)))
            clean = not self.scheduler.has_work()
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        return clean

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def draining(self) -> bool:
        return self._draining

    # ------------------------------------------------------------------ requests

    def submit(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        emit: Callable[[RequestOutput], None],
    ) -> None:
        """Queue a request. Raises QueueFull (retry later) or EngineDraining."""
        if len(prompt_ids) + 1 > self.config.max_len:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room in {self.config.max_len}")
        seq = Sequence(
            request_id,
            list(prompt_ids),
            params,
            emit,
            Detokenizer(self.tokenizer, prompt_ids, params.stop),
            make_generator(params.seed, self.config.device),
        )
        with self._cv:
            if self._draining or self._stop:
                raise EngineDraining("the server is shutting down")
            if self.error is not None:
                raise EngineDraining(f"the engine stopped: {self.error}")
            self.scheduler.add(seq)
            self._cv.notify_all()

    def abort(self, request_id: str) -> None:
        """Drop a request (client gone); its slot is free before the next step."""
        with self._cv:
            self._aborts.append(request_id)
            self._cv.notify_all()

    def generate(
        self, prompt_ids: list[int], params: SamplingParams, timeout: float = 600.0
    ) -> list[RequestOutput]:
        """Blocking helper (warm-up, benchmarks, tests): all outputs of one request."""
        outputs: list[RequestOutput] = []
        done = threading.Event()

        def emit(out: RequestOutput) -> None:
            outputs.append(out)
            if out.finished:
                done.set()

        request_id = f"sync-{time.monotonic_ns()}"
        self.submit(request_id, prompt_ids, params, emit)
        if not done.wait(timeout):
            self.abort(request_id)
            raise TimeoutError(f"generation did not finish in {timeout} s")
        return outputs

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    self._apply_aborts()
                    if self._stop:
                        break
                    now = time.monotonic()
                    for seq in self.scheduler.admit():
                        self.observer.on_scheduled(now - seq.arrival)
                    self._report()
                    if not self.scheduler.has_work():
                        self._cv.notify_all()  # wakes a shutdown waiting for the queue to empty
                        self._cv.wait(timeout=_IDLE_WAIT)
                        continue
                self.step()
        except Exception as exc:  # the loop must never die silently: every request gets an answer
            log.exception("engine loop failed; failing all requests")
            self.error = exc
        finally:
            with self._cv:
                for seq in [*self.scheduler.running.values(), *self.scheduler.waiting]:
                    self._finish(seq, "abort", "")
                self._report()
                self._cv.notify_all()

    def _apply_aborts(self) -> None:
        for request_id in self._aborts:
            seq = self.scheduler.remove(request_id)
            if seq is not None:
                self._emit_final(seq, "abort", "")
        self._aborts.clear()

    def step(self) -> None:
        """One scheduler step: a prefill chunk, then one token for every decoding request."""
        items = self.scheduler.prefill_batch()
        if items:
            self._prefill(items)
        decoding = self.scheduler.decode_batch()
        if decoding:
            self._decode(decoding)

    def _report(self) -> None:
        """Queue gauges, once per loop turn (the lock is held)."""
        s = self.scheduler
        self.observer.on_step(s.num_running, s.num_waiting, s.kv_usage())

    def _prefill(self, items: list[PrefillItem]) -> None:
        logits = runner.prefill(
            self.model, [(i.seq.slot, i.start, i.tokens) for i in items], self.config.device
        )
        for item in items:
            item.seq.prefilled += len(item.tokens)
        done = [(row, i.seq) for row, i in enumerate(items) if i.completes_prompt]
        if done:
            rows = torch.tensor([r for r, _ in done], device=logits.device)
            self._sample_and_append([s for _, s in done], logits[rows])

    def _decode(self, seqs: list[Sequence]) -> None:
        rows = [(s.slot, s.output_ids[-1], s.num_tokens - 1) for s in seqs]
        if self.graphs is not None:
            logits = self.graphs.run(rows)
        else:
            logits = runner.decode_eager(self.model, rows, self.config.device)
        self._sample_and_append(seqs, logits)

    def _sample_and_append(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        tokens = sample(logits, [s.params for s in seqs], [s.generator for s in seqs])
        now = time.monotonic()
        for seq, token in zip(seqs, tokens, strict=True):
            self._append(seq, token, now)

    def _append(self, seq: Sequence, token: int, now: float) -> None:
        if seq.finish_reason is not None:  # aborted while its step ran
            return
        seq.output_ids.append(token)
        self.observer.on_token(seq, now)
        seq.first_token_at = seq.first_token_at or now
        seq.last_token_at = now
        text = seq.detok.add(token)
        p = seq.params
        if (token in self.eos and not p.ignore_eos) or token in p.stop_token_ids or seq.detok.stopped:
            reason = "stop"
        elif len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= self.config.max_len:
            reason = "length"
        else:
            seq.emit(RequestOutput(seq.request_id, text, (token,), len(seq.prompt_ids), len(seq.output_ids)))
            return
        with self._cv:
            self._finish(seq, reason, text + seq.detok.flush(), (token,))
            self._cv.notify_all()

    def _finish(self, seq: Sequence, reason: str, text: str, token_ids: tuple[int, ...] = ()) -> None:
        self.scheduler.remove(seq.request_id)
        self._emit_final(seq, reason, text, token_ids)

    def _emit_final(self, seq: Sequence, reason: str, text: str, token_ids: tuple[int, ...] = ()) -> None:
        if seq.finish_reason is not None:
            return
        seq.finish_reason = reason
        self.observer.on_finish(seq, time.monotonic())
        seq.emit(
            RequestOutput(seq.request_id, text, token_ids, len(seq.prompt_ids), len(seq.output_ids), reason)
        )
