"""Bounded retries with exponential backoff and full jitter, for transient storage faults.

The backends turn each exception into a StorageError first (transient or permanent), so this
loop only decides *whether to wait and try again*; it never inspects library exceptions.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from qmodel_runtime.storage.errors import StorageError, TransientStorageError

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries in all; the wait before try k+1 is uniform in [0, min(cap, base * 2**k)].

    The defaults wait at most 0.5+1+2+4+8 = 15.5 s over 6 tries (about 8 s on average): long
    enough to ride out a restarting S3 pod or a throttling burst, short enough that a Job fails
    while the operator can still report why. ``sleep`` is replaceable so that a test can bring a
    stopped server back during the wait instead of waiting on a clock.
    """

    attempts: int = 6
    base: float = 0.5
    cap: float = 8.0
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False)

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.base < 0 or self.cap < 0:
            raise ValueError(f"retry policy needs attempts >= 1 and non-negative waits, got {self}")

    def delay(self, attempt: int, rng: random.Random) -> float:
        """The wait after failed try ``attempt`` (0-based)."""
        return rng.uniform(0.0, min(self.cap, self.base * (2.0**attempt)))


def call_with_retries(
    fn: Callable[[], T],
    convert: Callable[[Exception], StorageError | None],
    policy: RetryPolicy,
    what: str,
    rng: random.Random | None = None,
) -> T:
    """Run ``fn``; ``convert`` maps an exception to a StorageError (None: not ours, re-raise).
    TransientStorageError is retried up to ``policy.attempts``; anything else is raised at once.
    ``fn`` must be one request (never a call that retries itself), so tries do not multiply."""
    rng = rng or random.Random()
    for attempt in range(policy.attempts):
        try:
            return fn()
        except Exception as exc:
            # A StorageError raised inside ``fn`` (a short read, say) is classified by its type.
            error = exc if isinstance(exc, StorageError) else convert(exc)
            if error is None:
                raise
            if not isinstance(error, TransientStorageError):
                if error is exc:
                    raise
                raise error from exc
            if attempt + 1 == policy.attempts:
                raise TransientStorageError(
                    f"{error} (gave up after {policy.attempts} tries over the retry window)"
                ) from exc
            wait = policy.delay(attempt, rng)
            log.warning("%s: %s; retry %d/%d in %.1fs", what, error, attempt + 1, policy.attempts - 1, wait)
            policy.sleep(wait)
    raise AssertionError("unreachable: the loop returns or raises")
