"""``python -m qmodel_runtime.storage``: the commands the Jobs and people run, and their errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from runtime_tests.storage.storage_support import tree

from qmodel_runtime import manifest as mf
from qmodel_runtime.storage.__main__ import main
from testbed.s3server import S3Server


def _run(capsys: pytest.CaptureFixture, argv: list[str], env: dict) -> tuple[int, str, str]:
    code = main(["-q", *argv], env=env)
    out, err = capsys.readouterr()
    return code, out, err


def test_upload_ls_download_rm_against_s3(
    s3_server: S3Server, s3_bucket: str, artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    env = s3_server.env()
    model = f"s3://{s3_bucket}/qmodel/smollm2/"
    code, out, _ = _run(capsys, ["upload", str(artifact), model + "r1/"], env)
    assert code == 0
    assert json.loads(out)["manifestDigest"] == mf.digest((artifact / mf.MANIFEST_NAME).read_bytes())

    assert _run(capsys, ["ls", model], env)[:2] == (0, model + "r1/\n")
    code, out, _ = _run(capsys, ["download", model + "r1/", str(tmp_path / "cache")], env)
    assert code == 0 and json.loads(out)["reused"] == []
    assert tree(tmp_path / "cache") == tree(artifact)

    assert _run(capsys, ["rm", model], env)[0] == 0
    assert _run(capsys, ["ls", "--files", model], env)[:2] == (0, "")


def test_source_download_with_prefixed_credentials(
    s3_server: S3Server, s3_bucket: str, artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    plain = s3_server.env()
    uri = f"s3://{s3_bucket}/models/smollm2/"
    assert _run(capsys, ["upload", str(artifact), uri], plain)[0] == 0
    # The source's Secret arrives prefixed; the plain AWS_* variables hold other (wrong) keys.
    env = {f"QMODEL_SOURCE_{k}": v for k, v in plain.items()} | s3_server.env(AWS_SECRET_ACCESS_KEY="other")
    code, _, err = _run(
        capsys,
        ["--credentials-prefix", "QMODEL_SOURCE_", "download", "--source", uri, str(tmp_path / "s")],
        env,
    )
    assert code == 0, err
    assert tree(tmp_path / "s") == tree(artifact)


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["ls", "/data/models"], {}, "not a storage URI (did you mean file:///data/models?)"),
        (["upload", "/nonexistent/folder", "file:///tmp/x/"], {}, "/nonexistent/folder is not a folder"),
        (
            ["ls", "s3://b12/m/"],
            {"AWS_ENDPOINT_URL": "minio:9000"},
            "AWS_ENDPOINT_URL 'minio:9000' is not an http",
        ),
        (["download", "file:///nonexistent/m/r1/", "/tmp/x"], {}, "has no qmodel-manifest.json"),
        (["rm", "s3://b12/"], {}, "refusing to delete s3://b12/: name a model or revision prefix"),
        (["rm", "file:///tmp"], {}, "refusing to delete file:///tmp/"),
    ],
)
def test_errors_are_one_line_with_exit_2(
    argv: list[str], env: dict, message: str, capsys: pytest.CaptureFixture
) -> None:
    code, out, err = _run(capsys, argv, env)
    assert (code, out) == (2, "")
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_wrong_credentials_from_a_real_process(s3_server: S3Server, s3_bucket: str, tmp_path: Path) -> None:
    env = {**os.environ, **s3_server.env(AWS_SECRET_ACCESS_KEY="wrong")}
    proc = subprocess.run(
        [sys.executable, "-m", "qmodel_runtime.storage", "-q", "ls", f"s3://{s3_bucket}/qmodel/"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        f"error: s3://{s3_bucket}/qmodel/: the secret key does not match the access key; check "
        "AWS_SECRET_ACCESS_KEY (from the Secret named in credentialsSecret)"
    ]


def test_pvc_uris_resolve_under_the_mount_root(
    artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    env = {"QMODEL_PVC_ROOT": str(tmp_path / "mnt")}  # where the operator mounts claims
    assert _run(capsys, ["upload", str(artifact), "pvc://model-cache/smollm2/r1/"], env)[0] == 0
    assert tree(tmp_path / "mnt" / "model-cache" / "smollm2" / "r1") == tree(artifact)
    assert (
        _run(capsys, ["ls", "pvc://model-cache/smollm2/"], env)[1]
        == f"file://{tmp_path}/mnt/model-cache/smollm2/r1/\n"
    )
    assert _run(capsys, ["download", "pvc://model-cache/smollm2/r1", str(tmp_path / "c")], env)[0] == 0
    assert tree(tmp_path / "c") == tree(artifact)
