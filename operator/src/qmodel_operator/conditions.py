"""metav1.Condition bookkeeping (pure): merging new verdicts into the old list, and the
transitions that become Kubernetes Events."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from qmodel_operator.spec import Condition

QUANTIZED = "Quantized"
VALIDATED = "Validated"
PUBLISHED = "Published"
SERVING = "Serving"
READY = "Ready"
TYPES = (QUANTIZED, VALIDATED, PUBLISHED, SERVING, READY)

# Reasons that mean someone has to act: their Events are Warnings.
WARNING_REASONS = frozenset(
    {
        "JobFailed",
        "ResultInvalid",
        "GateFailed",
        "NoFittingGPU",
        "NoGPUNodes",
        "MaxModelLenTooLong",
        "CleanupFailed",
    }
)


@dataclass(frozen=True)
class Verdict:
    """A condition's new value, before the bookkeeping fields are filled in."""

    type: str
    status: str  # "True" | "False" | "Unknown"
    reason: str
    message: str


@dataclass(frozen=True)
class Event:
    type: str  # "Normal" | "Warning"
    reason: str
    message: str


def merge(old: Iterable[Condition], new: Iterable[Verdict], generation: int, now: str) -> list[Condition]:
    """The new condition list, in TYPES order; lastTransitionTime moves only when status changes."""
    previous = {c.type: c for c in old}
    out = []
    for verdict in sorted(new, key=lambda v: TYPES.index(v.type)):
        before = previous.get(verdict.type)
        changed = before is None or before.status != verdict.status
        out.append(
            Condition(
                type=verdict.type,
                status=verdict.status,
                reason=verdict.reason,
                message=verdict.message,
                observed_generation=generation,
                last_transition_time=now if changed else before.last_transition_time,
            )
        )
    return out


# Reasons that only say "not yet": no Event for them (a new model would get four at once).
QUIET_REASONS = frozenset({"Waiting", "NothingPassed"})


def transitions(old: Iterable[Condition], new: Iterable[Condition]) -> list[Event]:
    """One Event per condition whose status or reason changed (Ready only when it turns True:
    the other conditions already told why it is not)."""
    previous = {c.type: (c.status, c.reason) for c in old}
    events = []
    for cond in new:
        if (cond.type == READY and cond.status != "True") or cond.reason in QUIET_REASONS:
            continue
        if previous.get(cond.type) == (cond.status, cond.reason):
            continue
        kind = "Warning" if cond.reason in WARNING_REASONS else "Normal"
        events.append(Event(kind, cond.reason, f"{cond.type}={cond.status}: {cond.message}"))
    return events
