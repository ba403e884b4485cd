"""The pure parts of storage: URIs, part plans, the ordered pipeline, retries, settings, and how
S3 errors are classified."""

from __future__ import annotations

import itertools
import random
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import botocore.exceptions as bexc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qmodel_runtime.storage import (
    NotFoundError,
    PermanentStorageError,
    RetryPolicy,
    S3Settings,
    StorageSettings,
    StorageURI,
    TransientStorageError,
    URIError,
    parse_uri,
)
from qmodel_runtime.storage.base import MAX_PARTS, log_progress, ordered_map, plan_parts
from qmodel_runtime.storage.retry import call_with_retries
from qmodel_runtime.storage.s3store import classify


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("s3://artifacts/qmodel/smollm2/", StorageURI("s3", "artifacts", "qmodel/smollm2/")),
        ("s3://my.bucket-1", StorageURI("s3", "my.bucket-1", "")),
        ("S3://b12/a//b/", StorageURI("s3", "b12", "a/b/")),
        ("file:///data/models", StorageURI("file", "", "data/models")),
        ("file://localhost/data/", StorageURI("file", "", "data/")),
        ("pvc://model-cache/smollm2/", StorageURI("file", "", "mnt/pvc/model-cache/smollm2/")),
        ("pvc://model-cache", StorageURI("file", "", "mnt/pvc/model-cache/")),
    ],
)
def test_parse_uri(text: str, expected: StorageURI) -> None:
    assert parse_uri(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("/data/models", r"not a storage URI \(did you mean file:///data/models\?\)"),
        ("gs://bucket/x", "not a storage URI.*use s3://bucket/prefix"),
        ("s3:///key", "names no bucket"),
        ("s3://My_Bucket/x", "not a valid S3 bucket name"),
        ("s3://b12/a/../../etc", r"'\.' and '\.\.' are not allowed"),
        ("file://data/models", "three slashes"),
        ("pvc://Bad_Claim/x", "not a PersistentVolumeClaim name"),
    ],
)
def test_parse_uri_explains_bad_input(text: str, message: str) -> None:
    with pytest.raises(URIError, match=message):
        parse_uri(text)


def test_uri_helpers_and_pvc_root() -> None:
    uri = parse_uri("pvc://cache/m", pvc_root=Path("/var/qmodel"))
    assert uri.path == Path("/var/qmodel/cache/m")
    assert str(uri.as_prefix().child("r1")) == "file:///var/qmodel/cache/m/r1"
    assert str(parse_uri("s3://b12/a").child("m", "r1")) == "s3://b12/a/m/r1"
    with pytest.raises(URIError):
        parse_uri("s3://b12/a").child("../x")


@given(size=st.integers(0, 1 << 42), part=st.integers(5 << 20, 64 << 20))
def test_plan_parts_covers_every_byte_once(size: int, part: int) -> None:
    parts = plan_parts(size, part)
    assert len(parts) <= MAX_PARTS
    assert parts[0][0] == 0 and sum(n for _, n in parts) == size
    assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(parts))
    assert all(n == parts[0][1] for _, n in parts[:-1])  # only the last part may be short


def test_ordered_map_keeps_order_and_bounds_in_flight() -> None:
    running, peak, lock = 0, 0, threading.Lock()
    rng = random.Random(0)
    delays = [rng.random() / 500 for _ in range(40)]

    def work(i: int) -> int:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        threading.Event().wait(delays[i])
        with lock:
            running -= 1
        return i * i

    with ThreadPoolExecutor(8) as pool:
        assert list(ordered_map(pool, work, range(40), window=3)) == [i * i for i in range(40)]
    assert 1 <= peak <= 3


def test_ordered_map_stops_on_the_first_error() -> None:
    started = []

    def work(i: int) -> int:
        started.append(i)
        if i == 2:
            raise OSError("boom")
        return i

    with ThreadPoolExecutor(1) as pool, pytest.raises(OSError, match="boom"):
        list(ordered_map(pool, work, range(100), window=4))
    assert max(started) < 10  # the rest were never started


def test_retries_transient_errors_within_the_bound() -> None:
    waits, calls = [], []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset by peer")
        return "ok"

    def convert(exc: Exception):
        return TransientStorageError(str(exc)) if isinstance(exc, ConnectionError) else None

    policy = RetryPolicy(attempts=3, base=1.0, cap=1.5, sleep=waits.append)
    assert call_with_retries(flaky, convert, policy, "test", random.Random(0)) == "ok"
    assert len(waits) == 2 and 0 <= waits[0] <= 1.0 and 0 <= waits[1] <= 1.5

    calls.clear()
    with pytest.raises(TransientStorageError, match="gave up after 2 tries"):
        call_with_retries(flaky, convert, RetryPolicy(attempts=2, sleep=waits.append), "test")
    with pytest.raises(KeyError):  # not a storage fault: raised as is, never retried
        call_with_retries(lambda: {}["x"], convert, RetryPolicy(sleep=pytest.fail), "test")


def test_settings_from_env_keeps_source_and_artifact_credentials_apart() -> None:
    env = {
        "AWS_ENDPOINT_URL": "http://minio.storage:9000",
        "AWS_ACCESS_KEY_ID": "artifact-key",
        "AWS_SECRET_ACCESS_KEY": "artifact-secret",
        "AWS_DEFAULT_REGION": "eu-west-1",
        "QMODEL_SOURCE_AWS_ACCESS_KEY_ID": "source-key",
        "QMODEL_SOURCE_AWS_SECRET_ACCESS_KEY": "source-secret",
        "QMODEL_STORAGE_PART_MIB": "32",
    }
    art = StorageSettings.from_env(env)
    assert (art.s3.endpoint_url, art.s3.access_key_id, art.s3.region) == (
        "http://minio.storage:9000",
        "artifact-key",
        "eu-west-1",
    )
    assert art.s3.addressing_style == "path" and art.transfer.part_size == 32 << 20
    src = S3Settings.from_env(env, "QMODEL_SOURCE_")
    assert (src.endpoint_url, src.access_key_id, src.addressing_style) == (None, "source-key", "auto")
    assert "secret" not in repr(src)
    # No prefixed variable at all: one Secret serves both.
    assert S3Settings.from_env({"AWS_ACCESS_KEY_ID": "k"}, "QMODEL_SOURCE_").access_key_id == "k"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"AWS_ENDPOINT_URL": "minio:9000"}, "AWS_ENDPOINT_URL 'minio:9000' is not an http"),
        ({"QMODEL_S3_ADDRESSING_STYLE": "sideways"}, "must be one of path, virtual, auto"),
        ({"QMODEL_STORAGE_THREADS": "many"}, "QMODEL_STORAGE_THREADS must be a whole number"),
        ({"QMODEL_STORAGE_PART_MIB": "1"}, "at least 5 MiB"),
    ],
)
def test_bad_settings_say_which_variable(env: dict, message: str) -> None:
    with pytest.raises(PermanentStorageError, match=message):
        StorageSettings.from_env(env)


def _client_error(code: str, status: int) -> bexc.ClientError:
    return bexc.ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op"
    )


@pytest.mark.parametrize(
    ("exc", "kind", "message"),
    [
        (_client_error("SlowDown", 503), TransientStorageError, "throttling"),
        (_client_error("InternalError", 500), TransientStorageError, "server error"),
        (_client_error("NoSuchKey", 404), NotFoundError, "does not exist"),
        (_client_error("NoSuchBucket", 404), PermanentStorageError, "bucket 'b12' does not exist"),
        (_client_error("AccessDenied", 403), PermanentStorageError, "access denied.*AWS_ACCESS_KEY_ID"),
        (_client_error("InvalidArgument", 400), PermanentStorageError, "refused the request"),
        (bexc.ReadTimeoutError(endpoint_url="http://x"), TransientStorageError, "broke off"),
        (bexc.NoCredentialsError(), PermanentStorageError, "no usable S3 credentials"),
    ],
)
def test_classify_s3_errors(exc: Exception, kind: type, message: str) -> None:
    error = classify(exc, "s3://b12/k", S3Settings(endpoint_url="http://127.0.0.1:9"), reached=True)
    assert type(error) is kind
    assert str(error).startswith("s3://b12/k") and re.search(message, str(error))


def test_connection_refused_is_permanent_until_the_endpoint_has_answered() -> None:
    exc = bexc.EndpointConnectionError(endpoint_url="http://127.0.0.1:9")
    s3 = S3Settings(endpoint_url="http://127.0.0.1:9")
    assert isinstance(classify(exc, "s3://b12/k", s3, reached=False), PermanentStorageError)
    assert isinstance(classify(exc, "s3://b12/k", s3, reached=True), TransientStorageError)
    assert classify(ValueError("x"), "s3://b12/k", s3, reached=True) is None


def test_log_progress_reports_whole_mib(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="qmodel.progress")
    update = log_progress("upload", every=1e9)(3 << 20)
    for _ in range(6):
        update(1 << 19)
    assert [r.getMessage().split(" MiB")[0] for r in caplog.records] == ["upload: 3/3"]
