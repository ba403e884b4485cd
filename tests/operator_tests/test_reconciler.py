"""The reconciler's scheduling: one run per model at a time, kicks folded, failures retried.

``reconcile`` itself is replaced by a recorder here: what it does against the API server is
covered by the k8s tests; this is only the queueing, which no cluster makes deterministic.
"""

from __future__ import annotations

import asyncio

from operator_tests.support import settings

from qmodel_operator.kube import ApiError
from qmodel_operator.metrics import Metrics
from qmodel_operator.reconciler import Reconciler


class _NoIndexes:
    def jobs(self, key):
        return []

    def deployments(self, key):
        return []

    def services(self, key):
        return []

    def gpu_nodes(self):
        return []


class Recording(Reconciler):
    """A Reconciler whose reconcile only records calls (and can be held open or fail)."""

    def __init__(self, failures: int = 0) -> None:
        super().__init__(api=None, settings=settings(), indexes=_NoIndexes(), metrics=Metrics())
        self.calls: list[tuple[str, str]] = []
        self.gate = asyncio.Event()
        self.failures = failures

    async def reconcile(self, key, urgent=False):
        self.calls.append(key)
        await self.gate.wait()
        if self.failures:
            self.failures -= 1
            raise ApiError(409, "conflict")


def test_kicks_during_a_run_fold_into_one_more_run():
    async def scenario():
        rec = Recording()
        key = ("ml", "smollm2")
        rec.kick(key)
        await asyncio.sleep(0)  # the first run starts and waits on the gate
        for _ in range(5):
            rec.kick(key)
        rec.kick(("ml", "other"))  # another model runs alongside
        await asyncio.sleep(0)
        rec.gate.set()
        await rec.idle()
        return rec.calls

    calls = asyncio.run(scenario())
    assert calls.count(("ml", "smollm2")) == 2
    assert calls.count(("ml", "other")) == 1


def test_our_own_status_write_does_not_trigger_a_run():
    async def scenario():
        rec = Recording()
        rec.gate.set()
        key = ("ml", "smollm2")
        rec._own_versions[key] = "42"
        rec.model_event("MODIFIED", key, {"metadata": {"resourceVersion": "42", "generation": 1}})
        await rec.idle()
        rec.model_event("MODIFIED", key, {"metadata": {"resourceVersion": "43", "generation": 2}})  # not ours
        await rec.idle()
        # An older body (a late watch event) never replaces a newer one.
        rec.model_event("MODIFIED", key, {"metadata": {"resourceVersion": "41", "generation": 1}})
        await rec.idle()
        return rec

    rec = asyncio.run(scenario())
    assert rec.calls == [("ml", "smollm2"), ("ml", "smollm2")]  # 43, then the stale 41 kicks
    assert rec._bodies[("ml", "smollm2")]["metadata"]["resourceVersion"] == "43"


def test_failures_are_retried_with_backoff():
    async def scenario():
        rec = Recording(failures=1)
        rec.gate.set()
        rec.kick(("ml", "smollm2"))
        await rec.idle()
        assert len(rec.calls) == 1
        await asyncio.sleep(1.2)  # the first retry comes after 1 s
        await rec.idle()
        return rec

    rec = asyncio.run(scenario())
    assert len(rec.calls) == 2
    sample = rec.metrics.registry.get_sample_value
    assert sample("qmodel_reconciles_total", {"result": "error"}) == 1
    assert sample("qmodel_reconciles_total", {"result": "ok"}) == 1


def test_deleted_models_leave_the_phase_gauge():
    rec_metrics = Metrics()
    rec_metrics.set_phase(("ml", "a"), "Ready")
    rec_metrics.set_phase(("ml", "b"), "Ready")
    rec_metrics.set_phase(("ml", "b"), "Rejected")
    rec_metrics.set_phase(("ml", "a"), None)
    sample = rec_metrics.registry.get_sample_value
    assert sample("qmodel_models", {"phase": "Ready"}) == 0
    assert sample("qmodel_models", {"phase": "Rejected"}) == 1
