"""The quantize Job end to end, as the operator runs it: ``python -m qmodel_runtime.jobs.quantize``
in a subprocess, input in the environment, result in the termination-log file."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from runtime_tests.gptq_support import save_tiny_model
from safetensors import safe_open

from qmodel_runtime import manifest, streaming
from qmodel_runtime.checkpoint import open_quantized
from qmodel_runtime.jobs.report import MAX_RESULT_BYTES
from testbed.s3server import s3_bucket, s3_server  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[2]
REVISION = "r-0123456789ab"


def contract_example() -> dict:
    """The result example in docs/contracts.md (the first JSON block after its heading)."""
    text = (REPO / "docs" / "contracts.md").read_text()
    section = text.split("## Quantize Job result", 1)[1]
    block = re.search(r"```json\n(.*?)```", section, re.S).group(1)
    return json.loads(block)


def key_paths(doc, prefix: str = "") -> set[str]:
    if not isinstance(doc, dict):
        return set()
    out = set()
    for k, v in doc.items():
        out.add(prefix + k)
        out |= key_paths(v, prefix + k + ".")
    return out


def job_document(source: str, artifacts: str, **quantization) -> dict:
    return {
        "apiVersion": "qmodel.dev/v1alpha1",
        "kind": "QuantizeJobInput",
        "model": {"namespace": "default", "name": "tiny"},
        "revision": REVISION,
        "source": {"uri": source},
        "quantization": {
            "bits": 4,
            "groupSize": 32,
            "symmetric": False,
            "calibration": {"samples": 8, "sequenceLength": 64, "seed": 0},
            **quantization,
        },
        "validation": {"sequenceLength": 64, "maxSamples": 6, "maxPerplexityIncreasePercent": 50.0},
        "artifacts": {"uri": artifacts},
    }


def run_job_process(tmp_path: Path, document: dict, extra_env: dict | None = None):
    result = tmp_path / "termination-log"
    env = {
        **os.environ,
        "QMODEL_JOB_INPUT": json.dumps(document),
        "QMODEL_RESULT_PATH": str(result),
        "OMP_NUM_THREADS": "1",  # a tiny model: threads only wait for each other on shared cores
        **(extra_env or {}),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "qmodel_runtime.jobs.quantize", "--work-dir", str(tmp_path / "work")],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    return proc, result.read_text() if result.exists() else ""


@pytest.fixture(scope="module")
def tiny_with_tokenizer(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("src") / "tiny", vocab=49152, tied=True, tokenizer=True)


@pytest.fixture(scope="module")
def file_run(tiny_with_tokenizer, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("job")
    doc = job_document(f"file://{tiny_with_tokenizer}/", f"file://{tmp}/artifacts/")
    proc, text = run_job_process(tmp, doc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, doc, proc, json.loads(text), text


def test_result_follows_the_contract(file_run):
    _, _, _, result, text = file_run
    assert len(text.encode()) < MAX_RESULT_BYTES
    assert key_paths(result) == key_paths(contract_example())
    assert result["revision"] == REVISION
    assert result["model"] == {
        "architecture": "LlamaForCausalLM",
        "layers": 2,
        "hiddenSize": 64,
        "intermediateSize": 128,
        "heads": 4,
        "kvHeads": 2,
        "headDim": 16,
        "vocabSize": 49152,
        "tiedEmbeddings": True,
        "maxPositionEmbeddings": 256,
        "parameters": 49152 * 64 + 2 * (64 * 64 * 2 + 64 * 32 * 2 + 64 * 128 * 3 + 128) + 64,
    }
    increase = 100 * (result["quantizedPerplexity"] / result["baselinePerplexity"] - 1)
    assert result["increasePercent"] == pytest.approx(increase, abs=1e-3)
    assert result["passed"] is (increase <= 50.0)
    assert result["timings"]["totalSeconds"] >= result["timings"]["quantizeSeconds"] > 0


def test_artifact_is_complete_and_matches_its_manifest(file_run):
    tmp, _, _, result, _ = file_run
    folder = tmp / "artifacts" / "tiny" / REVISION
    assert result["artifact"]["uri"] == f"file://{tmp}/artifacts/tiny/{REVISION}/"
    found = manifest.verify_folder(folder)  # every file's size and sha256
    data = (folder / manifest.MANIFEST_NAME).read_bytes()
    assert manifest.digest(data) == result["artifact"]["manifestDigest"]
    assert set(found["files"]) == {
        "config.json",
        "quantize_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    }
    assert result["artifact"]["sizeBytes"] == sum(e["size"] for e in found["files"].values())
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["bits"] == 4 and config["quantization_config"]["sym"] is False
    assert json.loads((folder / "quantize_config.json").read_text()) == config["quantization_config"]
    assert round(found["validation"]["quantized"]["perplexity"], 6) == result["quantizedPerplexity"]
    assert found["source"]["digest"].startswith("sha256:") and found["revision"] == REVISION
    with safe_open(folder / "model.safetensors", "pt") as fh:
        keys = set(fh.keys())
        assert fh.get_tensor("model.embed_tokens.weight").dtype.itemsize == 2  # fp16
    assert "model.layers.1.mlp.down_proj.qweight" in keys and "lm_head.weight" not in keys


def test_reported_perplexity_is_the_written_checkpoints(file_run, wiki_eval_ids):
    """Re-measure the artifact independently of the job: the same number (the tiny model
    shares SmolLM2's tokenizer, so the session's tokenized text serves)."""
    from qmodel_runtime import data

    tmp, _, _, result, _ = file_run
    windows = data.token_windows(wiki_eval_ids, 64, 6)
    folder = tmp / "artifacts" / "tiny" / REVISION
    again = streaming.perplexity(open_quantized(folder), windows)
    assert again.perplexity == pytest.approx(result["quantizedPerplexity"], rel=1e-6)


def test_progress_per_phase_and_layer_on_stderr(file_run):
    _, _, proc, _, _ = file_run
    err = proc.stderr
    for phase in (
        "phase: baseline perplexity",
        "phase: gptq 4-bit quantization of 2 layers",
        "phase: perplexity of the written checkpoint",
        "phase: upload to",
    ):
        assert phase in err
    assert "gptq 4-bit: 1/2 layers" in err and "gptq 4-bit: 2/2 layers" in err
    assert proc.stdout == ""


def test_rerun_of_the_same_revision_is_idempotent(file_run, tiny_with_tokenizer, tmp_path):
    """A retried Job (backoffLimit) writes the same artifact over the first one."""
    tmp, doc, _, first, _ = file_run
    proc, text = run_job_process(tmp_path, doc)
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = json.loads(text)
    assert again["quantizedPerplexity"] == first["quantizedPerplexity"]
    manifest.verify_folder(tmp / "artifacts" / "tiny" / REVISION)


@pytest.mark.slow
def test_job_reads_the_source_from_s3_and_publishes_there(tiny_with_tokenizer, tmp_path, request):
    """A real S3-compatible server (versitygw): source downloaded with the source Secret's
    credentials (QMODEL_SOURCE_ prefix), artifact uploaded with the artifact Secret's."""
    import boto3

    server, bucket = request.getfixturevalue("s3_server"), request.getfixturevalue("s3_bucket")
    client = boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        region_name="us-east-1",
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
    )
    for path in tiny_with_tokenizer.iterdir():
        client.upload_file(str(path), bucket, f"models/tiny/{path.name}")
    source_env = {f"QMODEL_SOURCE_{k}": v for k, v in server.env().items()}
    doc = job_document(f"s3://{bucket}/models/tiny/", f"s3://{bucket}/artifacts/", bits=3, groupSize=-1)
    proc, text = run_job_process(tmp_path, doc, {**server.env(), **source_env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(text)
    assert result["artifact"]["uri"] == f"s3://{bucket}/artifacts/tiny/{REVISION}/"
    listed = client.list_objects_v2(Bucket=bucket, Prefix=f"artifacts/tiny/{REVISION}/")
    names = {o["Key"].rsplit("/", 1)[-1] for o in listed["Contents"]}
    assert {"model.safetensors", "config.json", manifest.MANIFEST_NAME} <= names
    body = client.get_object(Bucket=bucket, Key=f"artifacts/tiny/{REVISION}/{manifest.MANIFEST_NAME}")
    assert manifest.digest(body["Body"].read()) == result["artifact"]["manifestDigest"]
