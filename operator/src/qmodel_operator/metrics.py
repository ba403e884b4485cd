"""Prometheus metrics for platform teams to alert on (served on QMODEL_OPERATOR_METRICS_PORT).

    qmodel_models{phase}                       models in each phase
    qmodel_reconciles_total{result}            reconciles, ok or error
    qmodel_reconcile_duration_seconds          one reconcile (read, decide, write)
    qmodel_reconcile_queue_seconds{work}       a trigger until its reconcile starts (work: new, steady)
    qmodel_api_request_duration_seconds{call}  the operator's API calls ("POST jobs"; watches aside)
    qmodel_quantize_jobs_total{outcome}        quantize Jobs that succeeded or failed
    qmodel_quantize_job_duration_seconds       total time the succeeded Jobs reported
    qmodel_gate_decisions_total{result}        gate verdicts, passed or failed

Outcomes are counted from the plan's Events, which fire once per transition, so a restart
or a repeated reconcile does not count the same Job twice.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from qmodel_operator.conditions import Event

PHASES = ("Pending", "Quantizing", "Validating", "Deploying", "Ready", "Rejected", "Failed")
# Quantize Jobs run minutes to hours (the GPTQ paper: 2.9 min for BLOOM-1.7B, 4.2 h for OPT-175B).
JOB_BUCKETS = (60, 300, 900, 1800, 3600, 7200, 14400, 28800, 86400)
# Queueing and API calls: milliseconds on an idle cluster, seconds on an overloaded one.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.models = Gauge("qmodel_models", "QuantizedModels by phase", ["phase"], registry=r)
        self.reconciles = Counter("qmodel_reconciles", "Reconciles by result", ["result"], registry=r)
        self.reconcile_seconds = Histogram(
            "qmodel_reconcile_duration_seconds", "Duration of one reconcile", registry=r
        )
        self.queue_seconds = Histogram(
            "qmodel_reconcile_queue_seconds", "From a trigger until the reconcile starts", ["work"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.api_seconds = Histogram(
            "qmodel_api_request_duration_seconds", "Kubernetes API calls by verb and resource", ["call"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.jobs = Counter(
            "qmodel_quantize_jobs", "Finished quantize Jobs by outcome", ["outcome"], registry=r
        )
        self.job_seconds = Histogram(
            "qmodel_quantize_job_duration_seconds", "Reported duration of succeeded quantize Jobs",
            buckets=JOB_BUCKETS, registry=r,
        )  # fmt: skip
        self.gate = Counter("qmodel_gate_decisions", "Quality-gate verdicts", ["result"], registry=r)
        self._phases: dict[tuple[str, str], str] = {}
        for phase in PHASES:
            self.models.labels(phase).set(0)

    def set_phase(self, key: tuple[str, str], phase: str | None) -> None:
        """Track one model's phase (None: the model is gone)."""
        old = self._phases.pop(key, None)
        if phase is not None:
            self._phases[key] = phase
        if old == phase:
            return
        if old is not None:
            self.models.labels(old).dec()
        if phase is not None:
            self.models.labels(phase).inc()

    def count(self, events: Iterable[Event], job_seconds: float | None) -> None:
        for event in events:
            if event.reason == "JobSucceeded":
                self.jobs.labels("succeeded").inc()
                if job_seconds is not None:
                    self.job_seconds.observe(job_seconds)
            elif event.reason == "JobFailed":
                self.jobs.labels("failed").inc()
            elif event.reason == "GatePassed":
                self.gate.labels("passed").inc()
            elif event.reason == "GateFailed":
                self.gate.labels("failed").inc()

    def api_call(self, verb: str, resource: str, seconds: float) -> None:
        self.api_seconds.labels(f"{verb} {resource}").observe(seconds)

    def serve(self, port: int) -> None:
        """Expose /metrics on ``port`` from a daemon thread (prometheus-client's own server)."""
        start_http_server(port, registry=self.registry)
