"""Bad input, generated: 600 QuantizedModel specs against the real API server and operator, and
malformed documents fed to the quantize Job.

The specs come from hypothesis strategies built from the CRD's own schema (fuzz_support), half
valid, half broken by one deliberate violation. Every one is sent to the API server with a
server-side dry run (strict field validation, as kubectl does): the invalid ones must be refused
with a message naming the field, the valid ones accepted, and the operator's own spec model must
accept what the API server accepted. A sample of the valid ones is then created for real in one
namespace, with the operator running: each must get a status, with zero operator exceptions.

The runtime API's fuzzing (schemathesis, zero 5xx) is not repeated here: it is
tests/runtime_tests/test_serve_limits.py::test_no_generated_input_makes_a_5xx.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from operator_tests.k8s_support import GROUP, PLURAL, VERSION, wait_for, with_result
from reliability_tests import fuzz_support as fs
from reliability_tests.chaos_support import running_bed
from runtime_tests.test_quantize_job_input import base_input, fake_model

from qmodel_operator.spec import QuantizedModelSpec
from qmodel_runtime.jobs import quantize
from testbed.nodes import DEFAULT_NODE_SETS

SPECS = 600  # the issue asks for at least 500
RECONCILED = 60  # valid specs created for real (the rest are dry runs)
# The test bed's KWOK nodes hold 18 GPUs: a generated replicas of up to 1000 would only make
# pending pods, so the real sample serves at most this many per Deployment.
MAX_REPLICAS = 2
FIGURES: dict[str, int] = {}  # the table's columns, filled in by the tests in file order


@dataclass(frozen=True)
class Outcome:
    case: fs.Case
    name: str
    accepted: bool
    status: int
    message: str
    spec: dict[str, Any] | None  # as stored (defaults filled in) when accepted


def admit(custom: client.CustomObjectsApi, namespace: str, name: str, case: fs.Case) -> Outcome:
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "QuantizedModel", "metadata": {"name": name}}
    body["spec"] = case.spec
    try:
        stored = custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, body, dry_run="All", field_validation="Strict"
        )
    except ApiException as e:
        return Outcome(case, name, False, e.status, json.loads(e.body).get("message", e.body), None)
    return Outcome(case, name, True, 201, "", stored["spec"])


def generate(count: int) -> list[fs.Case]:
    """``count`` cases, the same ones on every run (derandomized, seeded, no example database)."""
    drawn: list[fs.Spec] = []

    @seed(20261123)
    @settings(
        max_examples=count,
        derandomize=True,
        database=None,
        deadline=None,
        phases=["generate"],
        suppress_health_check=list(HealthCheck),
    )
    @given(fs.valid_specs())
    def draw(spec: fs.Spec) -> None:
        drawn.append(spec)

    draw()
    return fs.break_in_turn(drawn, fs.all_violations())


@pytest.fixture(scope="module")
def bed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """A cluster of this module's own (KWOK GPU nodes, the CRD, one operator): its operator's log
    and metrics then count only the exceptions this module's specs cause."""
    yield from running_bed(request, tmp_path_factory, DEFAULT_NODE_SETS)


@pytest.fixture(scope="module")
def fuzz_namespace(bed) -> str:
    return bed.namespace("fuzz")


@pytest.fixture(scope="module")
def admitted(bed, fuzz_namespace) -> list[Outcome]:
    cases = generate(SPECS)
    custom = client.CustomObjectsApi(bed.api)
    names = [case.name or f"fz-{i}" for i, case in enumerate(cases)]
    # Four requests in flight: the API server, not the client, is what is being measured.
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(lambda nc: admit(custom, fuzz_namespace, *nc), zip(names, cases, strict=True)))


def _show(outcome: Outcome) -> str:
    v = outcome.case.violation
    broke = f"{v.kind} at {v.field} = {v.value!r:.60}" if v else "nothing (valid)"
    got = f"got {outcome.status}: {outcome.message[:300]}"
    return f"{outcome.name}: broke {broke}; {got}\n  spec: {outcome.case.spec}"


@pytest.mark.k8s
def test_invalid_specs_are_refused_naming_the_field(admitted):
    invalid = [o for o in admitted if o.case.violation is not None]
    wrong = []
    for o in invalid:
        v = o.case.violation
        # The API server names the field ("spec.jobs.gpu.products[0]: Too long"), quotes an unknown
        # one ('unknown field "spec.quantization.bogusField"'); the name's rule says it in words.
        named = any(f in o.message for f in (f"{v.field}:", f'"{v.field}"', f"{v.field} must"))
        if o.accepted or o.status not in (400, 422) or not named or v.expect not in o.message:
            wrong.append(_show(o))
    assert not wrong, f"{len(wrong)} of {len(invalid)} invalid specs:\n" + "\n".join(wrong[:10])
    every = fs.all_violations()
    used = {every.index(o.case.violation) for o in invalid}
    assert len(used) == len(every), f"{len(used)} of {len(every)} violations used"
    FIGURES.update({"invalid": len(invalid), "rejected": sum(not o.accepted for o in invalid)})


@pytest.mark.k8s
def test_valid_specs_are_accepted_and_the_operator_model_agrees(admitted):
    valid = [o for o in admitted if o.case.violation is None]
    refused = [_show(o) for o in valid if not o.accepted]
    assert not refused, f"{len(refused)} of {len(valid)} valid specs refused:\n" + "\n".join(refused[:10])
    disagree = []
    for o in valid:
        try:
            QuantizedModelSpec.model_validate(o.spec)
        except ValueError as e:
            disagree.append(f"{o.name}: {e}\n  spec: {o.spec}")
    assert not disagree, "the operator's spec model refuses what the CRD accepts:\n" + "\n".join(disagree[:5])
    assert len(valid) >= SPECS // 3 and len(admitted) == SPECS
    FIGURES.update({"specs generated": len(admitted), "valid": len(valid)})


def test_every_cel_rule_of_the_crd_has_a_violation():
    assert fs.missing_rule_violators(fs.spec_schema()) == []


def real_sample(admitted: list[Outcome], count: int) -> list[tuple[str, dict[str, Any]]]:
    """``count`` valid specs spread over the run, each with a Job result planted for KWOK."""
    valid = [o.case.spec for o in admitted if o.case.violation is None]
    step = max(1, len(valid) // count)
    sample = []
    for i, spec in enumerate(valid[::step][:count]):
        name = f"fz-real-{i}"
        spec = with_result(spec, name, baseline=14.09, quantized=14.30)
        serving = spec.get("serving")
        if serving and serving.get("replicas", 1) > MAX_REPLICAS:
            spec = {**spec, "serving": {**serving, "replicas": MAX_REPLICAS}}
        sample.append((name, spec))
    return sample


def operator_exceptions(log: str, metrics: str) -> list[str]:
    """Tracebacks and failed reconciles in the operator's log, and its error counter."""
    found = [line for line in log.splitlines() if "Traceback" in line or "reconcile failed" in line]
    errors = re.search(r'^qmodel_reconciles_total\{result="error"\} (\S+)$', metrics, re.MULTILINE)
    if errors and float(errors.group(1)) > 0:
        found.append(f"qmodel_reconciles_total{{result=error}} = {errors.group(1)}")
    return found


@pytest.mark.k8s
@pytest.mark.slow
def test_valid_specs_are_reconciled_without_exceptions(admitted, bed, fuzz_namespace):
    models = bed.models(fuzz_namespace)
    sample = real_sample(admitted, RECONCILED)
    for name, spec in sample:
        models.create(name, spec)

    def unreconciled() -> list[str]:
        items = models.custom.list_namespaced_custom_object(GROUP, VERSION, fuzz_namespace, PLURAL)["items"]
        done = {
            qm["metadata"]["name"]
            for qm in items
            if (qm.get("status") or {}).get("phase")
            and qm["status"].get("observedGeneration") == qm["metadata"]["generation"]
        }
        return [name for name, _ in sample if name not in done]

    left: list[str] = []

    def all_reconciled() -> bool:
        left[:] = unreconciled()
        return not left

    try:
        wait_for(all_reconciled, f"a status on all {len(sample)} models", 240, bed.operator)
    except AssertionError as e:
        raise AssertionError(f"no status on {left}: {e}") from None
    phases = Counter(models.status(name)["phase"] for name, _ in sample)
    found = operator_exceptions(bed.operator.log_tail(100000), bed.operator.metrics())
    assert not found, "operator exceptions:\n" + "\n".join(found[:20])
    FIGURES.update({"reconciled": len(sample), "exceptions": len(found)})
    print("\n" + fs.table([("QuantizedModel specs: API server, then operator", FIGURES)]))
    print(f"phases of the {len(sample)} created: {dict(phases)}")
    # What admission accepts, the API server must accept from the operator too: a Job or
    # Deployment it refuses ends the model as Failed/InvalidSpec.
    refused = [
        f"{name}: {ready.get('message', '')[:300]}"
        for name, _ in sample
        if (ready := models.condition(name, "Ready")).get("reason") == "InvalidSpec"
    ]
    assert not refused, "children refused for specs admission accepted:\n" + "\n".join(refused)
    print("runtime API: tests/runtime_tests/test_serve_limits.py::test_no_generated_input_makes_a_5xx")


# --- the quantize Job, given malformed input --------------------------------------------------


def run_job(tmp_path, document: str) -> tuple[int, str]:
    result = tmp_path / "termination-log"
    env = {
        "QMODEL_RESULT_PATH": str(result),
        "HOME": str(tmp_path),
        "QMODEL_JOB_INPUT": document,
        # Should a generated document ever name an s3:// URI, it fails on loopback, not the network.
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
        "QMODEL_SOURCE_AWS_ENDPOINT_URL": "http://127.0.0.1:9",
    }
    code = quantize.main(["--work-dir", str(tmp_path / "work")], env)
    return code, result.read_text()


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)


def _mutated(document: dict[str, Any], path: list[str], value: Any) -> dict[str, Any]:
    out = json.loads(json.dumps(document))
    node = out
    for key in path[:-1]:
        node = node.setdefault(key, {}) if isinstance(node.get(key, {}), dict) else node
    node[path[-1]] = value
    return out


FIELDS = [
    ["apiVersion"], ["kind"], ["model"], ["model", "name"], ["revision"], ["source"], ["source", "uri"],
    ["quantization", "bits"], ["quantization", "groupSize"], ["quantization", "calibration", "samples"],
    ["validation", "maxPerplexity"], ["artifacts", "uri"], ["extra"],
]  # fmt: skip


def _one_line_refusal(code: int, reason: str) -> bool:
    return code == quantize.EXIT_BAD_INPUT and reason.startswith("invalid input: ") and "\n" not in reason


@seed(20261123)
@settings(max_examples=150, derandomize=True, database=None, deadline=None)
@given(
    document=JSON.map(json.dumps)
    | st.tuples(st.sampled_from(FIELDS), JSON).map(lambda fv: json.dumps(_mutated(base_input(), *fv)))
)
def test_the_job_refuses_generated_documents_in_one_line(tmp_path_factory, document):
    code, reason = run_job(tmp_path_factory.mktemp("job"), document)
    assert _one_line_refusal(code, reason), (code, reason, document)


def _model_folder(tmp_path: Path, damage) -> str:
    folder = fake_model(tmp_path / "m")
    damage(folder)
    return json.dumps(base_input(source=f"file://{folder}/", artifacts=f"file://{tmp_path}/a/"))


# Cases the input tests in runtime_tests do not cover; before the fix each but the first two was an
# "internal error" (exit 1: RecursionError, TypeError, SafetensorError).
MALFORMED = {
    "not-an-object": lambda tmp: "[1, 2]",
    "null": lambda tmp: "null",
    "nested-too-deeply": lambda tmp: "[" * 100_000 + "]" * 100_000,
    "config-is-a-list": lambda tmp: _model_folder(tmp, lambda f: (f / "config.json").write_text("[1, 2]")),
    "config-not-json": lambda tmp: _model_folder(tmp, lambda f: (f / "config.json").write_text("{oops")),
    "weights-not-safetensors": lambda tmp: _model_folder(
        tmp, lambda f: (f / "model.safetensors").write_bytes(b"\xff" * 64)
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_the_job_refuses_malformed_input_in_one_line(tmp_path, case):
    code, reason = run_job(tmp_path, MALFORMED[case](tmp_path))
    assert _one_line_refusal(code, reason), (code, reason)
    assert "internal error" not in reason and "Traceback" not in reason
