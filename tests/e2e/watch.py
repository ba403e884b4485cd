"""Following a QuantizedModel as it moves through its lifecycle: phase changes with their times,
the quantize Job's progress lines from its pod's log, the perplexities, the runtime pod coming up.

Used by the demo (printing as it goes) and the e2e tests (quietly). Polls, with a deadline.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from e2e.stack import Stack

from testbed.paths import TestbedError

TERMINAL = {"Ready", "Rejected", "Failed"}
# Log lines worth showing from the quantize Job: its phases and progress, not library noise.
JOB_LINE_MARKERS = ("qmodel.job:", "qmodel.progress:")
SERVER_LINE_MARKERS = ("ready in", "NOT READY", "KV cache", "fetch")


@dataclass
class Timeline:
    """When each phase was first seen, in seconds since the model was applied."""

    model: str
    started: float = field(default_factory=time.monotonic)
    phases: dict[str, float] = field(default_factory=dict)
    final: dict[str, Any] = field(default_factory=dict)

    def seen(self, phase: str) -> bool:
        if phase in self.phases:
            return False
        self.phases[phase] = time.monotonic() - self.started
        return True

    def durations(self) -> list[tuple[str, float]]:
        """(phase, seconds spent in it) in the order the phases came."""
        ordered = sorted(self.phases.items(), key=lambda kv: kv[1])
        ends = [t for _, t in ordered[1:]] + [None]
        return [(p, (end if end is not None else t) - t) for (p, t), end in zip(ordered, ends, strict=True)]


class LogFollower:
    """New lines of a process-node container's log since the last call (the file grows)."""

    def __init__(self, stack: Stack, namespace: str, container: str, markers: tuple[str, ...]) -> None:
        self.stack, self.namespace, self.container, self.markers = stack, namespace, container, markers
        self.offsets: dict[str, int] = {}

    def new_lines(self, pod: str) -> list[str]:
        try:
            text = self.stack.cluster.pod_log(self.namespace, pod, self.container)
        except (TestbedError, OSError):  # not started yet: no log file is the normal case
            return []
        start = self.offsets.get(pod, 0)
        self.offsets[pod] = len(text)
        lines = text[start:].splitlines()
        return [line for line in lines if any(m in line for m in self.markers)]


def follow(stack: Stack, name: str, timeout: float, say: Callable[[str], None] = lambda _: None) -> Timeline:
    """Poll the model until it reaches Ready, Rejected or Failed; report what happens on the way."""
    ns = stack.config.namespace
    timeline = Timeline(name)
    job_log = LogFollower(stack, ns, "quantize", JOB_LINE_MARKERS)
    server_log = LogFollower(stack, ns, "server", SERVER_LINE_MARKERS)
    deadline = time.monotonic() + timeout
    while True:
        body = stack.model(name)
        status = body.get("status") or {}
        phase = status.get("phase") or "(no status yet)"
        first = not timeline.phases
        if timeline.seen(phase):
            say(f"[{timeline.phases[phase]:6.1f}s] {name}: phase {phase}{_detail(status)}")
        if _finished(body) and first:  # done before we looked (a second `make demo`): no old logs
            timeline.final = body
            return timeline
        for pod in stack.pods(ns, f"qmodel.dev/model={name}"):
            component = pod["metadata"]["labels"].get("app.kubernetes.io/component")
            follower = job_log if component == "quantize" else server_log if component == "server" else None
            for line in follower.new_lines(pod["metadata"]["name"]) if follower else []:
                say(f"         {pod['metadata']['name']}: {_short(line)}")
        if _finished(body):
            timeline.final = body
            return timeline
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{name} did not finish within {timeout:.0f}s; last phase {phase}, conditions "
                f"{_conditions(status)}\n{stack.operator_log_tail()}"
            )
        time.sleep(1.0)


def _finished(body: dict[str, Any]) -> bool:
    """Ready (with a ready pod), Rejected or Failed, for the current generation of the spec."""
    status = body.get("status") or {}
    if (
        status.get("phase") not in TERMINAL
        or status.get("observedGeneration") != body["metadata"]["generation"]
    ):
        return False
    return status["phase"] != "Ready" or bool((status.get("serving") or {}).get("readyReplicas"))


def _detail(status: dict[str, Any]) -> str:
    v = status.get("validation") or {}
    if status.get("phase") in ("Ready", "Rejected", "Deploying") and "quantizedPerplexity" in v:
        return (
            f": perplexity {v['baselinePerplexity']:.3f} -> {v['quantizedPerplexity']:.3f} "
            f"({v['increasePercent']:+.2f}%, limit {v.get('maxPerplexityIncreasePercent')}%)"
        )
    if status.get("phase") == "Failed":
        return f": {_conditions(status)}"
    return ""


def _conditions(status: dict[str, Any]) -> str:
    return "; ".join(
        f"{c['type']}={c['status']} ({c.get('message', '')})" for c in status.get("conditions", [])
    )


def _short(line: str) -> str:
    """Drop the timestamp and logger prefix of a runtime log line."""
    for marker in (*JOB_LINE_MARKERS, " INFO ", " WARNING ", " ERROR "):
        if marker in line:
            return line.split(marker, 1)[1].strip()
    return line.strip()
