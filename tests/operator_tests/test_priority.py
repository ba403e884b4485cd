"""New or changed models first: steady reconciles hold back while one waits or runs, boundedly.

``reconcile`` is replaced by a recorder (as in test_reconciler.py): only the scheduling is
under test; the scale benchmark measures what it buys on a real API server.
"""

from __future__ import annotations

import asyncio

from operator_tests.support import settings, spec_body
from operator_tests.test_reconciler import _NoIndexes

from qmodel_operator import reconciler as rc
from qmodel_operator.metrics import Metrics

NEW = ("ml", "new")
STEADY = ("ml", "steady")


class Held(rc.Reconciler):
    """Records reconcile starts; the new model's reconcile waits on a gate."""

    def __init__(self) -> None:
        super().__init__(api=None, settings=settings(), indexes=_NoIndexes(), metrics=Metrics())
        self.started: list[tuple[str, str]] = []
        self.gate = asyncio.Event()

    async def reconcile(self, key, urgent=False):
        self.started.append(key)
        if key == NEW:
            await self.gate.wait()


def _bodies(rec: Held) -> None:
    # The status of "steady" has caught up with its spec; "new" has none yet.
    rec.model_event("ADDED", STEADY, {"metadata": {"resourceVersion": "1", "generation": 1},
                                      "status": {"observedGeneration": 1}})  # fmt: skip


def test_steady_work_waits_while_a_new_model_is_being_reconciled(monkeypatch):
    monkeypatch.setattr(rc, "STEADY_HOLD_SECONDS", 30.0)

    async def scenario():
        rec = Held()
        rec.model_event("ADDED", NEW, {"metadata": {"resourceVersion": "2", "generation": 1}})
        await asyncio.sleep(0.01)  # the new model's reconcile runs, held on the gate
        _bodies(rec)
        await asyncio.sleep(0.05)
        before = list(rec.started)
        rec.gate.set()
        await rec.idle()
        return before, rec.started

    before, after = asyncio.run(scenario())
    assert before == [NEW]
    assert after == [NEW, STEADY]


def test_steady_work_is_held_back_no_longer_than_the_bound(monkeypatch):
    monkeypatch.setattr(rc, "STEADY_HOLD_SECONDS", 0.05)

    async def scenario():
        rec = Held()
        rec.model_event("ADDED", NEW, {"metadata": {"resourceVersion": "2", "generation": 1}})
        await asyncio.sleep(0.01)
        _bodies(rec)
        await asyncio.sleep(0.3)  # well past the bound, the new model still running
        started = list(rec.started)
        rec.gate.set()
        await rec.idle()
        return started

    assert asyncio.run(scenario()) == [NEW, STEADY]


class _Api:
    """A stand-in for KubeApi (no cluster makes this ordering deterministic): records the calls;
    the Job of ``held`` is created only once the gate opens."""

    def __init__(self, held: str) -> None:
        self.calls: list[tuple[str, str]] = []
        self.held, self.gate = held, asyncio.Event()
        self.version = 100

    async def create(self, manifest):
        model = manifest["metadata"]["labels"]["qmodel.dev/model"]
        if model == self.held:
            await self.gate.wait()
        self.calls.append(("create " + manifest["kind"], model))
        return True

    async def set_status(self, namespace, name, status):
        self.calls.append(("status", name))
        self.version += 1
        meta = {"name": name, "namespace": namespace, "uid": f"uid-{name}", "generation": 1}
        return {"metadata": {**meta, "resourceVersion": str(self.version)}, "status": status}

    async def post_event(self, ref, type_, reason, message, now):
        self.calls.append(("event", ref.name))


def _model(name: str, version: str) -> dict:
    meta = {"name": name, "namespace": "ml", "uid": f"uid-{name}", "generation": 1}
    meta["resourceVersion"] = version
    return {"metadata": meta, "spec": spec_body()}


def test_a_new_model_leaves_its_status_for_later_while_others_wait_and_loses_nothing():
    async def scenario():
        api = _Api(held="a")
        rec = rc.Reconciler(api=api, settings=settings(), indexes=_NoIndexes(), metrics=Metrics())
        rec.model_event("ADDED", ("ml", "a"), _model("a", "1"))
        await asyncio.sleep(0.01)  # a's Job create is held: a runs, urgent
        rec.model_event("ADDED", ("ml", "b"), _model("b", "2"))  # b arrives meanwhile
        await asyncio.sleep(0.01)
        api.gate.set()
        await rec.idle()
        return api.calls

    calls = asyncio.run(scenario())
    # b's Job is made while a is still urgent (held): b leaves its status and Events to a steady
    # turn, after a's Job; they do come (deferring loses nothing). The stand-in has no index, so
    # b's later turn asks for its Job again (the API server answers 409: a no-op).
    assert calls[:2] == [("create Job", "b"), ("create Job", "a")]
    # a, the last urgent one, writes its status in the same turn as its Job.
    assert calls[2:4] == [("status", "a"), ("event", "a")]
    assert ("status", "b") in calls[4:] and ("event", "b") in calls[4:]


def test_a_lone_new_model_writes_its_status_in_the_same_turn():
    async def scenario():
        api = _Api(held="")
        rec = rc.Reconciler(api=api, settings=settings(), indexes=_NoIndexes(), metrics=Metrics())
        rec.model_event("ADDED", ("ml", "a"), _model("a", "1"))
        await rec.idle()
        return api.calls, rec

    calls, rec = asyncio.run(scenario())
    assert calls[:2] == [("create Job", "a"), ("status", "a")]
    assert not rec._children_done
