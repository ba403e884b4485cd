"""Faults against a real S3 server (versitygw on loopback): the server dies mid-upload, comes back
during the backoff, throttles, holds a corrupt object, refuses credentials, is not there."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import boto3
import botocore.exceptions as bexc
import pytest
from botocore.config import Config
from runtime_tests.storage.storage_support import PART, WEIGHTS, WEIGHTS_SIZE, s3_store, tree

from qmodel_runtime import manifest as mf
from qmodel_runtime.storage import (
    PermanentStorageError,
    RetryPolicy,
    S3Settings,
    S3Store,
    TransferSettings,
    TransientStorageError,
)
from qmodel_runtime.storage.artifact import download_artifact, list_revisions, upload_artifact
from testbed.s3server import S3Server, find_binary, free_port, wait_until

MODEL = "qmodel/smollm2/"
KEY = MODEL + "r1/"


def _after_bytes(limit: int, action):
    """A progress factory that runs ``action`` once, when ``limit`` bytes have moved."""
    moved = 0

    def start(_total: int):
        def update(n: int) -> None:
            nonlocal moved
            before, moved = moved, moved + n
            if before < limit <= moved:
                action()

        return update

    return start


def _small_files(artifact: Path) -> int:
    return sum(
        p.stat().st_size
        for p in artifact.rglob("*")
        if p.is_file() and p.name not in (WEIGHTS, mf.MANIFEST_NAME)
    )


def test_server_killed_mid_upload_leaves_no_revision_and_the_retry_completes(
    s3_server: S3Server, s3_bucket: str, artifact: Path, tmp_path: Path
) -> None:
    store = s3_store(s3_server, s3_bucket)
    # Files go in name order, weights.bin last: kill the server once its first part is sent.
    kill = _after_bytes(_small_files(artifact) + PART, s3_server.stop)
    with pytest.raises(TransientStorageError, match=r"s3://.*weights.bin.*gave up after 3 tries"):
        upload_artifact(store, artifact, KEY, progress=kill)
    assert not s3_server.running

    s3_server.start()
    assert list_revisions(store, MODEL) == []
    assert not [o for o in store.list(KEY) if o.key.endswith((mf.MANIFEST_NAME, WEIGHTS))]

    assert not upload_artifact(store, artifact, KEY).skipped
    assert [r.name for r in list_revisions(store, MODEL)] == ["r1"]
    download_artifact(store, KEY, tmp_path / "cache")
    assert tree(tmp_path / "cache") == tree(artifact)


def test_server_back_during_backoff_lets_the_same_upload_finish(
    s3_server: S3Server, s3_bucket: str, artifact: Path, tmp_path: Path
) -> None:
    waits = []

    def restart_instead_of_sleeping(delay: float) -> None:
        waits.append(delay)
        s3_server.start()

    store = s3_store(
        s3_server, s3_bucket, RetryPolicy(attempts=4, base=0.01, sleep=restart_instead_of_sleeping)
    )
    upload_artifact(
        store, artifact, KEY, progress=_after_bytes(_small_files(artifact) + PART, s3_server.stop)
    )
    assert waits, "the server was stopped, so at least one request must have been retried"
    download_artifact(store, KEY, tmp_path / "cache")
    assert tree(tmp_path / "cache") == tree(artifact)


class _GatedBody:
    """A request body that sends 64 KiB, then waits for ``gate``: the server's handler blocks
    reading it, holding the server's only request slot (--max-requests 1) until the gate opens."""

    def __init__(self, size: int, gate: threading.Event) -> None:
        self.left, self.gate = size, gate

    def read(self, n: int = -1) -> bytes:
        if self.left < (1 << 20) - (64 << 10):
            self.gate.wait(timeout=60)
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return b"x" * n


def _throttled(server: S3Server) -> bool:
    client = boto3.client("s3", config=Config(retries={"total_max_attempts": 1}), **server.boto_args())
    try:
        client.list_objects_v2(Bucket="throttled", MaxKeys=1)
    except bexc.ClientError as exc:
        return exc.response["Error"]["Code"] == "SlowDown"
    return False


def test_throttling_is_retried_until_the_upload_completes(artifact: Path, tmp_path: Path) -> None:
    binary = find_binary()
    if binary is None:
        pytest.skip("versitygw is not installed: run `make setup` (it calls tests/testbed/install_s3.sh)")
    # One request at a time; a slow upload holds that slot, so every other request gets 503 SlowDown.
    server = S3Server(binary, tmp_path / "throttled", extra_args=["--max-requests", "1"])
    server.start()
    gate = threading.Event()
    try:
        server.make_bucket("throttled")
        # Unsigned, unchecksummed body: botocore must not read it all up front to hash it.
        streaming = Config(
            request_checksum_calculation="when_required", s3={"payload_signing_enabled": False}
        )
        blocker = boto3.client("s3", config=streaming, **server.boto_args())
        slow = threading.Thread(
            target=lambda: blocker.put_object(
                Bucket="throttled", Key="slow", Body=_GatedBody(1 << 20, gate), ContentLength=1 << 20
            )
        )
        slow.start()
        wait_until(lambda: _throttled(server), 30, "the slow upload to hold the only request slot")
        waits = []

        def back_off(delay: float) -> None:
            waits.append(delay)
            gate.set()  # the slow upload finishes; the slot frees up
            time.sleep(delay)

        retry = RetryPolicy(attempts=8, base=0.02, cap=0.2, sleep=back_off)
        store = S3Store(
            "throttled", S3Settings.from_env(server.env()), TransferSettings(PART, threads=4), retry
        )
        upload_artifact(store, artifact, KEY)
        download_artifact(store, KEY, tmp_path / "cache")
        assert tree(tmp_path / "cache") == tree(artifact)
        assert waits and any(" SlowDown " in line for line in server.log_lines())
    finally:
        gate.set()
        server.stop(kill=False)


def test_interrupted_download_resumes_without_refetching_complete_files(
    s3_server: S3Server, s3_bucket: str, artifact: Path, tmp_path: Path
) -> None:
    store = s3_store(s3_server, s3_bucket)
    upload_artifact(store, artifact, KEY)
    dest = tmp_path / "cache"
    # Files arrive in name order, weights.bin last: stop the server once the others are complete.
    stop = _after_bytes(_small_files(artifact), s3_server.stop)
    with pytest.raises(TransientStorageError):
        download_artifact(store, KEY, dest, progress=stop)
    assert not (dest / mf.MANIFEST_NAME).exists() and not (dest / WEIGHTS).exists()

    s3_server.start()
    mark = len(s3_server.log_lines())
    again = download_artifact(store, KEY, dest)
    assert again.fetched == [WEIGHTS]
    assert sorted(again.reused) == ["config.json", "empty.txt", "sub/extra.txt", "tokenizer.json"]
    # What the server saw: the manifest once, then one ranged GET per part of weights.bin only.
    gets = sorted(s3_server.requests("GetObject", s3_bucket, since=mark))
    assert gets == [KEY + mf.MANIFEST_NAME] + [KEY + WEIGHTS] * -(-WEIGHTS_SIZE // PART)
    assert tree(dest) == tree(artifact)


def _never_sleep(delay: float) -> None:
    raise AssertionError(f"a permanent error was retried (asked to wait {delay:.2f}s)")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"AWS_SECRET_ACCESS_KEY": "wrong-secret"},
            "the secret key does not match.*check AWS_SECRET_ACCESS_KEY",
        ),
        (
            {"AWS_ACCESS_KEY_ID": "nobody"},
            "the server does not know this access key; check AWS_ACCESS_KEY_ID",
        ),
    ],
)
def test_wrong_credentials_fail_fast_with_what_to_check(
    s3_server: S3Server, s3_bucket: str, artifact: Path, env: dict, message: str
) -> None:
    store = s3_store(s3_server, s3_bucket, RetryPolicy(sleep=_never_sleep), **env)
    with pytest.raises(PermanentStorageError, match=rf"^s3://{s3_bucket}/{KEY}.*: {message}"):
        upload_artifact(store, artifact, KEY)


def test_missing_bucket_is_named(s3_server: S3Server, artifact: Path, tmp_path: Path) -> None:
    store = s3_store(s3_server, "no-such-bucket", RetryPolicy(sleep=_never_sleep))
    with pytest.raises(PermanentStorageError, match=r"bucket 'no-such-bucket' does not exist at http://127"):
        download_artifact(store, KEY, tmp_path / "cache")
    with pytest.raises(PermanentStorageError, match=r"bucket 'no-such-bucket' does not exist"):
        upload_artifact(store, artifact, KEY)


def test_unreachable_endpoint_fails_fast(s3_server: S3Server, tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    store = s3_store(
        s3_server, "bucket", RetryPolicy(sleep=_never_sleep), AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}"
    )
    with pytest.raises(
        PermanentStorageError,
        match=rf"cannot reach the S3 endpoint http://127.0.0.1:{port}; check AWS_ENDPOINT_URL",
    ):
        download_artifact(store, KEY, tmp_path / "cache")


def test_object_overwritten_mid_download_is_refused(
    s3_server: S3Server, s3_bucket: str, artifact: Path, tmp_path: Path
) -> None:
    store = s3_store(s3_server, s3_bucket)
    upload_artifact(store, artifact, KEY)
    # One part in flight at a time, so the overwrite lands between two ranged GETs.
    reader = S3Store(s3_bucket, store.s3, TransferSettings(PART, threads=1), store.retry)
    other = tmp_path / "other.bin"
    other.write_bytes(b"\0" * WEIGHTS_SIZE)

    def overwrite() -> None:
        store.upload_file(KEY + WEIGHTS, other, None, lambda _n: None)

    with pytest.raises(PermanentStorageError, match=rf"{WEIGHTS} was overwritten while it was being read"):
        download_artifact(
            reader, KEY, tmp_path / "cache", progress=_after_bytes(_small_files(artifact) + 1, overwrite)
        )
