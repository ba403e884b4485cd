"""Progress for long work (quantization layer by layer, evaluation, transfers) as log lines.

Log lines rather than a terminal bar: the same output reads well in a pod's log, in CI and
in a terminal. A line is written at most every ``every`` seconds, plus the last one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field


@dataclass
class Progress:
    """Counts units of work and logs ``desc: done/total (pct) rate eta``."""

    desc: str
    total: int
    unit: str = "it"
    every: float = 5.0
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("qmodel.progress"))
    done: int = 0
    _start: float = field(default_factory=time.monotonic)
    _last: float = 0.0

    def update(self, n: int = 1, note: str = "") -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self.every or self.done >= self.total:
            self._last = now
            self.logger.info("%s", self.line(now, note))

    def line(self, now: float, note: str = "") -> str:
        elapsed = max(now - self._start, 1e-9)
        rate = self.done / elapsed
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        text = f"{self.desc}: {self.done}/{self.total} {self.unit} ({pct:.0f}%) {rate:.2f} {self.unit}/s"
        text += f", {elapsed:.0f}s elapsed" + (f", eta {eta:.0f}s" if self.done < self.total else "")
        return text + (f" - {note}" if note else "")

    @property
    def seconds(self) -> float:
        return time.monotonic() - self._start
