"""Per-GPU autotuning whose choices persist on disk: each shape is timed once per machine.

Triton's own ``@autotune`` forgets its choice when the process exits, so every pod would
re-time every layer at start-up. Here a choice is stored per (GPU model, Triton version)
in ``$QMODEL_CACHE/kernels/<gpu>--triton-<version>.json`` (default ~/.cache/qmodel), keyed
by kernel and shape bucket: M rounded up to a power of two (decode batches 1..8 share
little with prefill's thousands), N and K exact (a model has a handful of layer shapes).

Settings come from the environment once, at first use (never at import):
``QMODEL_KERNELS_TUNE=0`` uses the untuned heuristic configs; ``QMODEL_KERNELS_CACHE``
moves the cache folder. Timing is skipped while a CUDA graph is being captured (the
heuristic config serves that call): warm every batch-size bucket up before capturing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import triton
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources

log = logging.getLogger(__name__)

MAX_M_BUCKET = 4096
# A candidate that cannot run on this GPU (too much shared memory, too many registers)
# is skipped, not fatal.
_CANDIDATE_ERRORS = (OutOfResources, CompilationError, RuntimeError, ValueError)


@dataclass(frozen=True)
class TuningSettings:
    cache_dir: Path | None  # None: remember choices in this process only
    enabled: bool = True  # False: never time, use the heuristic config
    warmup_ms: float = 5.0
    rep_ms: float = 25.0  # ~250 repetitions of a 100 us kernel: enough to rank configs

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> TuningSettings:
        env = dict(os.environ if env is None else env)
        root = Path(env.get("QMODEL_CACHE", Path.home() / ".cache" / "qmodel"))
        cache_dir = Path(env["QMODEL_KERNELS_CACHE"]) if env.get("QMODEL_KERNELS_CACHE") else root / "kernels"
        return cls(cache_dir=cache_dir, enabled=env.get("QMODEL_KERNELS_TUNE", "1") != "0")


def m_bucket(m: int) -> int:
    """Batch rows rounded up to a power of two, capped: the M part of a tuning key."""
    return min(triton.next_power_of_2(max(1, m)), MAX_M_BUCKET)


def device_name(device: torch.device) -> str:
    """What the cache is keyed by: the GPU model and its compute capability."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} sm{major}{minor}"


def cache_file(cache_dir: Path, device: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", device).strip("-")
    return cache_dir / f"{slug}--triton-{triton.__version__}.json"


def _capturing() -> bool:
    """A CUDA graph is being captured: nothing may be timed (or synchronized) now."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _do_bench(settings: TuningSettings) -> Callable[[Callable[[], Any]], float]:
    def measure(fn: Callable[[], Any]) -> float:
        return triton.testing.do_bench(
            fn, warmup=settings.warmup_ms, rep=settings.rep_ms, return_mode="median"
        )

    return measure


class Tuner:
    """Chooses a config per key by timing the candidates once; remembers it on disk."""

    def __init__(
        self,
        settings: TuningSettings,
        device: str,
        measure: Callable[[Callable[[], Any]], float] | None = None,
    ) -> None:
        self.settings = settings
        self.device = device
        self.path = None if settings.cache_dir is None else cache_file(settings.cache_dir, device)
        self._measure = measure or _do_bench(settings)
        self._choices: dict[str, dict] = self._read()
        self._lock = threading.Lock()

    def choose(self, key: str, candidates: list, default, run: Callable[[Any], Any]):
        """The remembered config for ``key``, else the fastest candidate (timed now), else ``default``.

        Candidates may mix config classes (e.g. GEMV and GEMM configs for M = 2..8): the
        entry records the class name, and the caller dispatches on the type it gets back.
        """
        known = self._remembered(key, [default, *candidates])
        if known is not None:
            return known
        if not self.settings.enabled or _capturing():
            return default
        with self._lock:
            best = self._time(key, candidates, run) or default
            self._choices[key] = {"kind": type(best).__name__, **asdict(best)}
            self._write(key, self._choices[key])
        return best

    def _remembered(self, key: str, examples: list):
        entry = self._choices.get(key)
        if entry is None:
            return None
        kinds = {type(c).__name__: type(c) for c in examples}
        fields = {k: v for k, v in entry.items() if k != "kind"}
        try:
            return kinds[entry.get("kind")](**fields)
        except (KeyError, TypeError):
            log.warning("ignoring a stale tuning entry for %s: %s", key, entry)
            return None

    def _time(self, key: str, candidates: list, run: Callable[[Any], Any]):
        timings = []
        for cfg in candidates:
            try:
                timings.append((self._measure(lambda cfg=cfg: run(cfg)), cfg))
            except _CANDIDATE_ERRORS as exc:
                log.debug("tuning %s: %s failed: %s", key, cfg, exc)
        if not timings:
            log.warning("tuning %s: no candidate ran; using the default config", key)
            return None
        ms, best = min(timings, key=lambda t: t[0])
        log.info(
            "tuned %s on %s: %s (%.1f us, %d candidates)", key, self.device, best, ms * 1e3, len(timings)
        )
        return best

    def _read(self) -> dict[str, dict]:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as exc:
            log.warning("unreadable tuning cache %s (%s); tuning again", self.path, exc)
            return {}
        return dict(data.get("configs", {})) if data.get("device") == self.device else {}

    def _write(self, key: str, value: dict) -> None:
        """Merge into the file (another process may have added keys) and replace it atomically."""
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            configs = {**self._read(), key: value}
            fd, tmp = tempfile.mkstemp(prefix=".tuning-", dir=self.path.parent)
            with os.fdopen(fd, "w") as f:
                json.dump(
                    {"device": self.device, "triton": triton.__version__, "configs": configs}, f, indent=1
                )
            os.replace(tmp, self.path)
        except OSError as exc:  # a read-only cache only costs re-tuning in the next process
            log.warning("could not write the tuning cache %s: %s", self.path, exc)


_TUNERS: dict[str, Tuner] = {}
_TUNERS_LOCK = threading.Lock()


def default_tuner(device: torch.device) -> Tuner:
    """One tuner per GPU model in this process, configured from the environment at first use."""
    name = device_name(device)
    with _TUNERS_LOCK:
        if name not in _TUNERS:
            _TUNERS[name] = Tuner(TuningSettings.from_env(), name)
        return _TUNERS[name]
