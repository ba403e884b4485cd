"""The quantize Job's input contract: the schema file, the CRD, and bad input refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from runtime_tests.gptq_support import one_thread, save_tiny_model

from qmodel_runtime.jobs import quantize, report, spec

pytestmark = pytest.mark.usefixtures("one_thread")
__all__ = ["one_thread"]  # the fixture, imported for pytest

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "crds" / "quantizedmodel.yaml"
SECTIONS = ("source", "quantization", "validation", "artifacts")


def base_input(source: str = "file:///models/m/", artifacts: str = "file:///tmp/artifacts/") -> dict:
    return {
        "apiVersion": "qmodel.dev/v1alpha1",
        "kind": "QuantizeJobInput",
        "model": {"namespace": "default", "name": "tiny"},
        "revision": "r-0123456789ab",
        "source": {"uri": source},
        "artifacts": {"uri": artifacts},
    }


# --------------------------------------------------------------------------- schema and CRD


def test_schema_file_is_in_sync_with_the_model():
    assert spec.SCHEMA_PATH.read_text() == spec.schema_text(), (
        "runtime/src/qmodel_runtime/jobs/job-input.schema.json is stale: "
        "run `python -m qmodel_runtime.jobs.spec` and commit the result"
    )


def _crd_spec() -> dict:
    if not CRD.exists():
        pytest.skip("crds/quantizedmodel.yaml does not exist yet (the operator issue writes it)")
    crd = yaml.safe_load(CRD.read_text())
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    return version["schema"]["openAPIV3Schema"]["properties"]["spec"]


def _resolve(node: dict, defs: dict) -> dict:
    """$ref followed, pydantic's ``anyOf [X, null]`` folded into X + nullable."""
    if "$ref" in node:
        node = {**defs[node["$ref"].rsplit("/", 1)[-1]], **{k: v for k, v in node.items() if k != "$ref"}}
    options = node.get("anyOf", [])
    if any(o.get("type") == "null" for o in options):
        (rest,) = [o for o in options if o.get("type") != "null"]
        node = {**{k: v for k, v in node.items() if k != "anyOf"}, **_resolve(rest, defs), "nullable": True}
    return node


def _leaf_facts(node: dict) -> dict:
    """The values both schemas must agree on, in one dialect (OpenAPI 3.0's boolean exclusive
    bounds become numbers, as in JSON Schema 2020-12)."""
    facts = {k: node[k] for k in ("type", "pattern", "maxLength", "nullable") if node.get(k)}
    for bound in ("minimum", "maximum"):
        exclusive = "exclusive" + bound.title()
        if node.get(exclusive) is True:
            facts[exclusive] = float(node[bound])
        elif bound in node:
            facts[bound] = float(node[bound])
        if isinstance(node.get(exclusive), (int, float)) and node.get(exclusive) is not True:
            facts[exclusive] = float(node[exclusive])
    if "enum" in node or "const" in node:
        facts["enum"] = sorted(map(str, node.get("enum", [node.get("const")])))
    if "default" in node and node["default"] != {}:
        facts["default"] = node["default"]
    if facts.get("type") == "number" and facts.get("default") is not None:
        facts["default"] = float(facts["default"])
    return facts


def schema_differences(crd: dict, job: dict, defs: dict, path: str) -> list[str]:
    job = _resolve(job, defs)
    if crd.get("type") == "object" or "properties" in crd:
        problems = []
        if sorted(crd.get("required", [])) != sorted(job.get("required", [])):
            problems.append(f"{path}: required {crd.get('required')} vs {job.get('required')}")
        names = set(crd.get("properties", {})) | set(job.get("properties", {}))
        for name in sorted(names):
            if name not in job.get("properties", {}):
                problems.append(f"{path}.{name}: in the CRD, missing from JobInput")
            elif name not in crd.get("properties", {}):
                problems.append(f"{path}.{name}: in JobInput, missing from the CRD")
            else:
                problems += schema_differences(
                    crd["properties"][name], job["properties"][name], defs, f"{path}.{name}"
                )
        return problems
    a, b = _leaf_facts(crd), _leaf_facts(job)
    if a.get("enum"):  # pydantic writes Literal[...] as an enum without a type
        b.setdefault("type", a.get("type"))
    if a.get("nullable") and "default" not in a:
        a["default"] = None  # nullable without a default: unset means null
    if not a.get("nullable") and "default" not in a and b.get("default", 0) is None:
        # An optional CRD field without a default is `X | None = None` in pydantic: absent or
        # null both mean "not set" to the Job.
        b.pop("nullable", None)
        b.pop("default")
    return [] if a == b else [f"{path}: CRD {a} vs JobInput {b}"]


@pytest.mark.parametrize("section", SECTIONS)
def test_job_input_matches_the_crd(section):
    crd = _crd_spec()
    schema = spec.json_schema()
    defs = schema.get("$defs", {})
    problems = schema_differences(crd["properties"][section], schema["properties"][section], defs, section)
    assert problems == []


def test_the_comparison_catches_drift():
    crd = json.loads(json.dumps(_crd_spec()))
    quant = crd["properties"]["quantization"]["properties"]
    quant["bits"]["enum"] = [2, 4, 8]
    quant["calibration"]["properties"]["samples"]["maximum"] = 999
    quant["dampPct"] = quant.pop("dampPercent")
    schema = spec.json_schema()
    problems = "\n".join(
        schema_differences(
            crd["properties"]["quantization"],
            schema["properties"]["quantization"],
            schema["$defs"],
            "quantization",
        )
    )
    assert "quantization.bits: CRD" in problems
    assert "quantization.calibration.samples: CRD" in problems
    assert "quantization.dampPct: in the CRD, missing from JobInput" in problems
    assert "quantization.dampPercent: in JobInput, missing from the CRD" in problems


def test_to_quant_config_carries_every_setting():
    q = spec.Quantization.model_validate(
        {
            "method": "gptq",
            "bits": 3,
            "groupSize": 64,
            "descAct": True,
            "symmetric": False,
            "dampPercent": 0.05,
            "staticGroups": True,
            "trueSequential": False,
        }
    )
    cfg = q.to_quant_config()
    assert (
        cfg.bits,
        cfg.group_size,
        cfg.desc_act,
        cfg.sym,
        cfg.damp_percent,
        cfg.static_groups,
        cfg.true_sequential,
        cfg.method,
    ) == (3, 64, True, False, 0.05, True, False, "gptq")


# --------------------------------------------------------------------------- bad input


def run_job(tmp_path: Path, document: dict | str | None, argv: list[str] | None = None) -> tuple[int, str]:
    result = tmp_path / "termination-log"
    env = {"QMODEL_RESULT_PATH": str(result), "HOME": str(tmp_path)}
    if document is not None:
        env["QMODEL_JOB_INPUT"] = document if isinstance(document, str) else json.dumps(document)
    code = quantize.main(["--work-dir", str(tmp_path / "work"), *(argv or [])], env)
    return code, result.read_text()


def fake_model(folder: Path, **config) -> Path:
    """config.json plus a safetensors file: enough for the checks that run before any work."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    base = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 256,
    }
    (folder / "config.json").write_text(json.dumps({**base, **config}))
    save_file({"x": torch.zeros(1)}, folder / "model.safetensors")
    return folder


def with_quantization(**q) -> dict:
    return {**base_input(), "quantization": q}


@pytest.mark.parametrize(
    "document, expected",
    [
        (with_quantization(bits=5), "quantization.bits must be 2, 3, 4 or 8; got 5"),
        (with_quantization(groupSize=0), "groupSize must be -1 (per output channel) or a positive number"),
        (with_quantization(groupSize=-2), "got -2"),
        (with_quantization(staticGroups=True), "staticGroups requires descAct"),
        (with_quantization(method="rtn", descAct=True), "apply to method gptq only"),
        (with_quantization(bitz=4), "quantization.bitz: unknown field"),
        ({**base_input(), "revision": "R_1"}, "revision"),
        ({**base_input(), "kind": "Other"}, "kind must be 'QuantizeJobInput'"),
        ({**base_input(), "source": {"uri": "http://x/"}}, "source.uri"),
        ({k: v for k, v in base_input().items() if k != "source"}, "source is required"),
        ("{not json", "the job input is not JSON"),
        (None, "no job input: pass --input PATH or set QMODEL_JOB_INPUT"),
    ],
)
def test_bad_documents_exit_2_with_one_line(tmp_path, document, expected):
    code, reason = run_job(tmp_path, document)
    assert code == quantize.EXIT_BAD_INPUT
    assert reason.count("\n") == 0 and "Traceback" not in reason
    assert reason.startswith("invalid input: ") and expected in reason


def test_input_file_that_cannot_be_read(tmp_path):
    code, reason = run_job(tmp_path, None, ["--input", str(tmp_path / "missing.json")])
    assert code == quantize.EXIT_BAD_INPUT and "cannot read the job input" in reason


@pytest.mark.parametrize(
    "make, bits, expected",
    [
        (lambda d: d, 4, "is not a folder"),
        (lambda d: (d.mkdir(), d)[1], 4, "has no config.json"),
        (lambda d: (fake_model(d), (d / "model.safetensors").unlink(), d)[2], 4, "has no model.safetensors"),
        (
            lambda d: fake_model(d, architectures=["BertModel"], model_type="bert"),
            4,
            "'BertModel' is not a decoder-only causal language model",
        ),
        (
            lambda d: fake_model(d, hidden_size=48, num_attention_heads=4, num_key_value_heads=4),
            3,
            "has 48 inputs, not a multiple of 32: 3-bit GPTQ packing cannot store it",
        ),
    ],
    ids=["missing-folder", "no-config", "no-weights", "unsupported-architecture", "3bit-unpackable"],
)
def test_bad_models_are_refused_before_any_work(tmp_path, make, bits, expected):
    source = make(tmp_path / "model")
    document = {
        **base_input(source=f"file://{source}/", artifacts=f"file://{tmp_path}/artifacts/"),
        "quantization": {"bits": bits},
    }
    code, reason = run_job(tmp_path, document)
    assert code == quantize.EXIT_BAD_INPUT, reason
    assert expected in reason and reason.count("\n") == 0


def test_missing_dataset_is_refused_before_any_work(tmp_path):
    source = save_tiny_model(tmp_path / "m", layers=1)
    document = {
        **base_input(source=f"file://{source}/", artifacts=f"file://{tmp_path}/a/"),
        "validation": {"dataset": f"file://{tmp_path}/nope.txt"},
    }
    code, reason = run_job(tmp_path, document)
    assert code == quantize.EXIT_BAD_INPUT
    assert f"{tmp_path}/nope.txt does not exist" in reason


def test_unusable_artifacts_location_fails_before_any_work(tmp_path):
    source = save_tiny_model(tmp_path / "m", layers=1)
    (tmp_path / "a-file").write_text("not a folder")  # works as root too, unlike a read-only folder
    document = base_input(source=f"file://{source}/", artifacts=f"file://{tmp_path}/a-file/x/")
    code, reason = run_job(tmp_path, document)
    assert code == quantize.EXIT_FAILED
    assert "is not a writable folder" in reason and reason.count("\n") == 0


# --------------------------------------------------------------------------- the gate


@pytest.mark.parametrize(
    "baseline, quantized, limits, passed",
    [
        (10.0, 10.1, {}, True),  # +1% within the default 2%
        (10.0, 10.3, {}, False),
        (10.0, 10.3, {"maxPerplexityIncreasePercent": 5}, True),
        (10.0, 10.3, {"maxPerplexityIncreasePercent": 5, "maxPerplexity": 10.2}, False),
        (10.0, float("nan"), {"maxPerplexityIncreasePercent": 10000}, False),
    ],
)
def test_gate(baseline, quantized, limits, passed):
    g = report.gate(baseline, quantized, spec.Validation.model_validate(limits))
    assert g.passed is passed
    if quantized == quantized:
        assert g.increase_percent == pytest.approx(100 * (quantized / baseline - 1))


@pytest.mark.parametrize("need", [384, 51200])
def test_leading_tokens_equal_the_whole_texts_first_tokens(smollm2_tokenizer, wiki_eval_ids, need):
    from qmodel_runtime import assets

    ids = quantize.leading_tokens(smollm2_tokenizer, assets.wiki_text("evaluation"), need)
    assert torch.equal(ids, wiki_eval_ids[:need])
