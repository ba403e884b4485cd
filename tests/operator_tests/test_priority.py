"""New or changed models first: steady reconciles hold back while one waits or runs, boundedly.

``reconcile`` is replaced by a recorder (as in test_reconciler.py): only the scheduling is
under test; the scale benchmark measures what it buys on a real API server.
"""

from __future__ import annotations

import asyncio

from operator_tests.support import settings
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

    async def reconcile(self, key):
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
