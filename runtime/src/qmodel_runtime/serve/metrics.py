"""Prometheus metrics, named after vLLM's with our own prefix (``vllm:x`` -> ``qmodel:x``), so
dashboards and alerts written for vLLM need only the prefix changed. Every series carries a
``model_name`` label.

| metric                                    | type      | meaning                                   |
|-------------------------------------------|-----------|-------------------------------------------|
| qmodel:num_requests_running               | gauge     | requests holding a KV-cache slot          |
| qmodel:num_requests_waiting               | gauge     | requests queued for a slot                |
| qmodel:kv_cache_usage_perc                | gauge     | live tokens / cache capacity (0..1)       |
| qmodel:time_to_first_token_seconds        | histogram | arrival -> first generated token          |
| qmodel:inter_token_latency_seconds        | histogram | between consecutive tokens of a request   |
| qmodel:e2e_request_latency_seconds        | histogram | arrival -> finish                         |
| qmodel:request_queue_time_seconds         | histogram | arrival -> first scheduled (prefill)      |
| qmodel:prompt_tokens_total                | counter   | prompt tokens of finished requests        |
| qmodel:generation_tokens_total            | counter   | generated tokens                          |
| qmodel:request_success_total{finished_reason} | counter | finished, by reason (stop/length/abort) |
| qmodel:request_rejected_total{reason}     | counter   | refused with 429 (queue_full) or 503      |
| qmodel:kv_cache_capacity_tokens           | gauge     | tokens the cache holds (slots x context)  |
| qmodel:max_num_seqs                       | gauge     | KV-cache slots = the largest batch        |
| qmodel:max_model_len                      | gauge     | context length per sequence               |
| qmodel:memory_bytes{component}            | gauge     | bytes by part (weights, kv_cache, ...)    |
| qmodel:ready                              | gauge     | 1 once weights are loaded and warm-up ran |
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from qmodel_runtime.engine.core import EngineObserver
from qmodel_runtime.engine.memory import MemoryReport

# Bucket edges from vLLM's choices: TTFT spans ms (short prompt, idle) to minutes (long queue).
# fmt: off
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0, 1920.0, 7680.0)
# fmt: on
MEMORY_COMPONENTS = ("weights", "kv_cache", "workspace", "cuda_graphs", "cuda_context", "total")


class Metrics(EngineObserver):
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry

        def gauge(name, doc, extra=()):
            return Gauge(f"qmodel:{name}", doc, [*labels, *extra], registry=r)

        def histogram(name, doc, buckets):
            return Histogram(f"qmodel:{name}", doc, labels, buckets=buckets, registry=r)

        def counter(name, doc, extra=()):
            return Counter(f"qmodel:{name}", doc, [*labels, *extra], registry=r)

        self.running = gauge("num_requests_running", "Requests holding a KV-cache slot.")
        self.waiting = gauge("num_requests_waiting", "Requests waiting for a KV-cache slot.")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV-cache token capacity in use (0..1).")
        self.ttft = histogram(
            "time_to_first_token_seconds", "Arrival to first generated token.", TTFT_BUCKETS
        )
        self.itl = histogram(
            "inter_token_latency_seconds", "Time between consecutive output tokens.", ITL_BUCKETS
        )
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to finish.", E2E_BUCKETS)
        self.queue_time = histogram("request_queue_time_seconds", "Arrival to first prefill.", TTFT_BUCKETS)
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens.")
        self.success = counter("request_success", "Finished requests.", ["finished_reason"])
        self.rejected = counter(
            "request_rejected", "Requests refused (queue full, shutting down).", ["reason"]
        )
        self.capacity = gauge(
            "kv_cache_capacity_tokens", "Tokens the KV cache holds (slots x max_model_len)."
        )
        self.max_num_seqs = gauge("max_num_seqs", "KV-cache slots: the largest batch.")
        self.max_model_len = gauge("max_model_len", "Context length per sequence (tokens).")
        self.memory = gauge("memory_bytes", "Device memory measured at startup, by component.", ["component"])
        self.ready = gauge("ready", "1 when the model is loaded and warmed up.")
        self.model_name = model_name
        self.ready.labels(model_name).set(0)

    # ------------------------------------------------------------------ engine hooks

    def on_step(self, running: int, waiting: int, kv_usage: float) -> None:
        self.running.labels(self.model_name).set(running)
        self.waiting.labels(self.model_name).set(waiting)
        self.kv_usage.labels(self.model_name).set(kv_usage)

    def on_token(self, seq, now: float) -> None:
        self.generation_tokens.labels(self.model_name).inc()
        if seq.last_token_at is None:
            self.ttft.labels(self.model_name).observe(now - seq.arrival)
        else:
            self.itl.labels(self.model_name).observe(now - seq.last_token_at)

    def on_finish(self, seq, now: float) -> None:
        self.e2e.labels(self.model_name).observe(now - seq.arrival)
        self.prompt_tokens.labels(self.model_name).inc(len(seq.prompt_ids))
        self.success.labels(self.model_name, seq.finish_reason).inc()

    def on_scheduled(self, waited: float) -> None:
        self.queue_time.labels(self.model_name).observe(waited)

    # ------------------------------------------------------------------ server events

    def set_capacity(self, report: MemoryReport) -> None:
        m = self.model_name
        self.capacity.labels(m).set(report.kv_cache_tokens)
        self.max_num_seqs.labels(m).set(report.max_batch)
        self.max_model_len.labels(m).set(report.max_model_len)
        for component in MEMORY_COMPONENTS:
            self.memory.labels(m, component).set(getattr(report, component))

    def reject(self, reason: str) -> None:
        self.rejected.labels(self.model_name, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
