"""``check()``: a Job fails in its first second, not after hours, when its storage is unusable;
and once checked, a later outage of the same endpoint is retried instead of fatal."""

from __future__ import annotations

from pathlib import Path

import pytest
from runtime_tests.storage.storage_support import FAST_RETRY, TRANSFER

from qmodel_runtime.storage import (
    PermanentStorageError,
    RetryPolicy,
    S3Settings,
    StorageSettings,
    TransientStorageError,
    check,
    upload,
)
from testbed.s3server import S3Server, free_port


def _settings(env: dict, retry: RetryPolicy = FAST_RETRY) -> StorageSettings:
    return StorageSettings(s3=S3Settings.from_env(env), transfer=TRANSFER, retry=retry)


def _never_sleep(delay: float) -> None:
    raise AssertionError(f"a permanent error was retried (asked to wait {delay:.2f}s)")


def test_check_file_uris(tmp_path: Path) -> None:
    settings = StorageSettings()
    assert check(f"file://{tmp_path}/not/yet/there/", settings, write=True).path == tmp_path / "not/yet/there"
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(PermanentStorageError, match=r"a-file is not a writable folder; check the volume"):
        check(f"file://{tmp_path}/a-file/models/", settings, write=True)


def test_check_s3_writes_nothing_visible(s3_server: S3Server, s3_bucket: str) -> None:
    settings = _settings(s3_server.env())
    check(f"s3://{s3_bucket}/qmodel/", settings, write=True)
    assert s3_server.requests("PutObject", s3_bucket) == ["qmodel/.qmodel-write-check"]
    assert list(s3_server.object_path(s3_bucket, "qmodel").glob("*")) == []  # the marker is gone


@pytest.mark.parametrize(
    ("env", "uri", "message"),
    [
        ({"AWS_SECRET_ACCESS_KEY": "wrong"}, "s3://{bucket}/q/", "check AWS_SECRET_ACCESS_KEY"),
        ({}, "s3://missing-bucket/q/", "bucket 'missing-bucket' does not exist"),
        ({"AWS_ENDPOINT_URL": "http://127.0.0.1:{port}"}, "s3://{bucket}/q/", "cannot reach the S3 endpoint"),
    ],
)
def test_check_fails_fast(s3_server: S3Server, s3_bucket: str, env: dict, uri: str, message: str) -> None:
    env = {k: v.format(port=free_port()) for k, v in env.items()}
    settings = _settings(s3_server.env(**env), RetryPolicy(sleep=_never_sleep))
    with pytest.raises(PermanentStorageError, match=message):
        check(uri.format(bucket=s3_bucket), settings)


def test_after_a_check_an_outage_is_retried_not_fatal(
    s3_server: S3Server, s3_bucket: str, artifact: Path
) -> None:
    waits = []
    settings = _settings(s3_server.env(), RetryPolicy(attempts=3, base=0.01, sleep=waits.append))
    check(f"s3://{s3_bucket}/qmodel/", settings)
    s3_server.stop()  # the S3 pod restarts just when the Job finishes its hours of work
    with pytest.raises(TransientStorageError, match="gave up after 3 tries"):
        upload(artifact, f"s3://{s3_bucket}/qmodel/m/r1/", settings)
    assert len(waits) == 2
