"""Chaos: SIGKILL the operator at random moments of the lifecycle, 20 runs, and check it converges.

Every run applies the chaos mix (``chaos_support.mix``: passes the gate / passes with a
finalizer / fails the gate / its Job fails) in a fresh namespace, lets KWOK run the Jobs for
random lengths, SIGKILLs the operator's process group at a random moment (seeded: the seed is
printed; set QMODEL_CHAOS_SEED to replay a run), leaves it down for a random while, starts it
again, and checks: every model reaches its expected phase for its latest generation, one Job
per revision, every Job/Deployment/Service owned by a live model, the status's artifact exactly
the one the Job reported. The run's models are then deleted while the next run starts, so
later kills also land in the middle of deletions and clean-up Jobs; afterwards the namespace
must hold nothing (models, Jobs, Deployments, Services, pods).

KWOK runs no containers: Jobs "quantize" by finishing after ``run-seconds`` with the result
planted as their termination message. The Jobs, not the operator, write artifacts, so a kill
of the operator cannot half-publish one in storage; what the operator can get wrong is the
status, which ``artifact_problems`` checks (storage-level half-publishing: test_faults.py).
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field
from types import SimpleNamespace as NS

import pytest
from operator_tests.k8s_support import GROUP, MESSAGE_ANNOTATION, PLURAL, VERSION, Models, wait_for
from reliability_tests.chaos_support import (
    EXPECTED,
    LABEL_MODEL,
    Bed,
    artifact_problems,
    converged,
    duplicate_jobs,
    mix,
    orphans,
    running_bed,
    table,
    wait_gone,
)

from testbed.nodes import A100_80GB, L4_24GB

RUNS = int(os.environ.get("QMODEL_CHAOS_RUNS", "20"))
NODE_SETS = (A100_80GB, L4_24GB)
SEED = int(os.environ.get("QMODEL_CHAOS_SEED", "20261123"))
HEADER = ("run", "kill at s", "down s", "phases at kill", "converge s", "dups", "orphans", "gone s")


@dataclass(frozen=True)
class RunPlan:
    kill_at: float  # seconds after the first model is created
    down: float  # seconds the operator stays dead
    run_seconds: dict[str, float] = field(default_factory=dict)


def plan_run(rng: random.Random) -> RunPlan:
    """Job run times of 0.2-3 s and a kill within 4 s of the first apply: kills land while
    models are created, Jobs pending or running, results read, Deployments rolling out, Ready."""
    return RunPlan(
        kill_at=round(rng.uniform(0.0, 4.0), 2),
        down=round(rng.uniform(0.0, 1.5), 2),
        run_seconds={name: round(rng.uniform(0.2, 3.0), 1) for name in EXPECTED},
    )


def _phases(models: Models) -> str:
    items = models.custom.list_namespaced_custom_object(GROUP, VERSION, models.ns, PLURAL)["items"]
    phases = {qm["metadata"]["name"]: (qm.get("status") or {}).get("phase", "-") for qm in items}
    return " ".join(f"{n}:{phases.get(n, 'absent')}" for n in EXPECTED)


def _planted(specs: dict) -> dict:
    """The artifact each model's Job reports (None: the failing Job reports none)."""
    out = {}
    for name, spec in specs.items():
        message = spec["jobs"]["podAnnotations"][MESSAGE_ANNOTATION]
        out[name] = json.loads(message)["artifact"] if name != "fail" else None
    return out


def _check(models: Models, specs: dict) -> tuple[int, list[str], list[str]]:
    """(duplicate Jobs, orphans, artifact problems) once the models converged."""
    jobs = models.jobs()
    bodies = {name: models.get(name) for name in EXPECTED}
    live = {qm["metadata"]["uid"] for qm in bodies.values() if qm}
    children = [*jobs, *models.deployments(), *models.services()]
    planted = _planted(specs)
    problems = [p for n, qm in bodies.items() for p in artifact_problems(n, qm, planted[n])]
    # One Deployment and Service for each served model, none for the others.
    served = sorted(d.metadata.labels[LABEL_MODEL] for d in models.deployments())
    if served != ["del", "ok"]:
        problems.append(f"Deployments for {served}, expected del and ok")
    return duplicate_jobs(jobs), orphans(children, live), problems


def _run(bed: Bed, run: int, plan: RunPlan) -> tuple[Models, list]:
    """One chaos run up to its checks; -> (its models, its table row without "gone s")."""
    models = bed.models(bed.namespace(f"chaos-{run:02d}"))
    specs = mix(plan.run_seconds)
    t0 = time.monotonic()
    for name, spec in specs.items():
        models.create(name, spec)
    # The kill moment is the experiment's variable: wait for it by the clock.
    time.sleep(max(0.0, t0 + plan.kill_at - time.monotonic()))
    phases = _phases(models)
    bed.operator.kill()
    time.sleep(plan.down)
    restarted = time.monotonic()  # convergence counts the operator's own start-up
    bed.operator.start()
    wait_for(
        lambda: all(converged(models.get(n), p) for n, p in EXPECTED.items()),
        f"run {run}: {EXPECTED} (phases: {_phases(models)})",
        timeout=90,
        operator=bed.operator,
    )
    converge = time.monotonic() - restarted
    dups, orphaned, problems = _check(models, specs)
    assert not problems, f"run {run}: {problems}"
    row = [run, plan.kill_at, plan.down, phases, f"{converge:.1f}", dups, len(orphaned)]
    assert dups == 0 and not orphaned, f"run {run}: {dups} duplicate Jobs, orphans {orphaned}"
    return models, row


def _delete_all(models: Models) -> None:
    for name in EXPECTED:
        models.delete(name)


@pytest.fixture(scope="module")
def bed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    yield from running_bed(request, tmp_path_factory, NODE_SETS)


@pytest.mark.k8s
@pytest.mark.slow
def test_operator_sigkilled_at_random_points_converges(bed: Bed) -> None:
    print(f"\nchaos seed {SEED} (QMODEL_CHAOS_SEED={SEED} replays these runs)")
    rows: list[list] = []
    previous: Models | None = None
    try:
        for run in range(RUNS):
            models, row = _run(bed, run, plan_run(random.Random(SEED + run)))
            if previous is not None:  # deleted while this run's kill happened: all gone now?
                rows[-1].append(f"{wait_gone(previous, EXPECTED):.1f}")
            _delete_all(models)
            rows.append(row)
            previous = models
        rows[-1].append(f"{wait_gone(previous, EXPECTED):.1f}")
    finally:
        print(table(HEADER, [tuple(r) for r in rows]))
    assert len(rows) == RUNS


def test_duplicates_and_orphans_are_counted() -> None:
    def obj(kind, name, model, rev, owner_uid=None):
        owners = [NS(controller=True, uid=owner_uid)] if owner_uid else None
        meta = NS(name=name, labels={LABEL_MODEL: model, "qmodel.dev/revision": rev}, owner_references=owners)
        return NS(kind=kind, metadata=meta)

    jobs = [obj("Job", "a-1", "a", "r-1", "u1"), obj("Job", "a-2", "a", "r-1", "u1")]
    jobs.append(obj("Job", "b", "b", "r-1"))
    assert duplicate_jobs(jobs) == 1  # a has two Jobs for r-1; b's r-1 is another model's
    assert orphans(jobs, {"u1"}) == ["Job/b"]
    assert orphans(jobs, set()) == ["Job/a-1", "Job/a-2", "Job/b"]


def test_artifact_problems_flag_a_half_recorded_artifact() -> None:
    planted = {"uri": "s3://artifacts/qmodel/ok/r-1/", "manifestDigest": "sha256:" + "0" * 64}
    assert artifact_problems("ok", {"status": {"artifact": planted}}, planted) == []
    half = {"uri": planted["uri"]}
    assert artifact_problems("ok", {"status": {"artifact": half}}, planted)
    assert artifact_problems("fail", {"status": {"artifact": half}}, None)
    assert artifact_problems("fail", {"status": {}}, None) == []


def test_plan_is_seeded() -> None:
    assert plan_run(random.Random(7)) == plan_run(random.Random(7))
    plans = [plan_run(random.Random(SEED + r)) for r in range(RUNS)]
    assert all(0 <= p.kill_at <= 4 and 0 <= p.down <= 1.5 for p in plans)
    assert len({p.kill_at for p in plans}) > RUNS // 2  # spread over the window, not one moment
