"""The S3 backend (any S3-compatible endpoint), on boto3.

botocore's own retries are off: every request goes through ``call_with_retries`` with one
bounded policy, which also covers what botocore cannot retry (a connection reset while a GET's
body streams). Big files move as ranged GETs / multipart parts, ``threads`` at a time, while
the calling thread reads or writes the file in order and hashes it on the way.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import boto3
import botocore.exceptions as bexc
import urllib3.exceptions
from botocore.config import Config

from qmodel_runtime.storage.base import (
    ObjectInfo,
    ProgressFn,
    TransferSettings,
    check_digest,
    hash_stream,
    ordered_map,
    plan_parts,
)
from qmodel_runtime.storage.errors import (
    NotFoundError,
    PermanentStorageError,
    StorageError,
    TransientStorageError,
)
from qmodel_runtime.storage.retry import RetryPolicy, call_with_retries
from qmodel_runtime.storage.settings import S3Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

_THROTTLED = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests"}
_SERVER = {"InternalError", "ServiceUnavailable", "RequestTimeout", "OperationAborted"}
_NOT_FOUND = {"NoSuchKey", "NotFound", "404"}  # "404": a HEAD's error has no body, only the status
# AWS and MinIO say InvalidAccessKeyId (403); versitygw says XAdminUserNotFound (404).
_UNKNOWN_KEY = {"InvalidAccessKeyId", "XAdminUserNotFound"}
_DENIED = {"AccessDenied", "403", "AllAccessDisabled", "InvalidToken", "ExpiredToken", "TokenRefreshRequired"}
# Connection-level faults: retried once the endpoint has answered at least once.
_CONNECT = (bexc.EndpointConnectionError, bexc.ConnectTimeoutError)
_STREAM = (
    bexc.ConnectionClosedError,
    bexc.ReadTimeoutError,
    bexc.ResponseStreamingError,
    bexc.IncompleteReadError,
    urllib3.exceptions.HTTPError,
    ConnectionError,
)


def classify(exc: Exception, where: str, s3: S3Settings, reached: bool) -> StorageError | None:
    """A boto3/urllib3 exception -> a StorageError saying what to check (None: not a storage fault)."""
    creds = f"the credentials ({s3.env_prefix}AWS_ACCESS_KEY_ID / {s3.env_prefix}AWS_SECRET_ACCESS_KEY"
    creds += ", from the Secret named in credentialsSecret)"
    if isinstance(exc, bexc.ClientError):
        return _classify_response(exc, where, s3, creds)
    if isinstance(exc, _CONNECT):
        if reached:
            return TransientStorageError(f"{where}: lost the connection to {s3.endpoint_name()} ({exc})")
        return PermanentStorageError(
            f"{where}: cannot reach the S3 endpoint {s3.endpoint_name()}; check "
            f"{s3.env_prefix}AWS_ENDPOINT_URL and that the server is up and reachable from here"
        )
    if isinstance(exc, _STREAM):
        return TransientStorageError(f"{where}: transfer from {s3.endpoint_name()} broke off ({exc})")
    if isinstance(exc, (bexc.NoCredentialsError, bexc.PartialCredentialsError)):
        return PermanentStorageError(f"{where}: no usable S3 credentials; set {creds}")
    if isinstance(exc, bexc.BotoCoreError):
        return PermanentStorageError(f"{where}: {exc}")
    return None


def _classify_response(exc: bexc.ClientError, where: str, s3: S3Settings, creds: str) -> StorageError:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    detail = f"{code or status}: {error.get('Message') or 'no message'}"
    if code in _THROTTLED or status in (429, 503):
        return TransientStorageError(f"{where}: the server is throttling requests ({detail})")
    if code in _SERVER or status >= 500:
        return TransientStorageError(f"{where}: server error ({detail})")
    if code == "NoSuchBucket":
        bucket = where.removeprefix("s3://").split("/", 1)[0]
        # Not a NotFoundError: callers treat "no such object" as an answer, a missing bucket never is.
        return PermanentStorageError(
            f"{where}: bucket {bucket!r} does not exist at {s3.endpoint_name()}; create it or fix the URI"
        )
    if code in _NOT_FOUND:
        return NotFoundError(f"{where} does not exist")
    if code in _UNKNOWN_KEY:
        return PermanentStorageError(
            f"{where}: the server does not know this access key; check {s3.env_prefix}AWS_ACCESS_KEY_ID "
            "(from the Secret named in credentialsSecret)"
        )
    if code == "SignatureDoesNotMatch":
        return PermanentStorageError(
            f"{where}: the secret key does not match the access key; check {s3.env_prefix}"
            "AWS_SECRET_ACCESS_KEY (from the Secret named in credentialsSecret)"
        )
    if code in _DENIED or status == 403:
        return PermanentStorageError(
            f"{where}: access denied ({detail}); check {creds} and that they may use this bucket"
        )
    if code == "PreconditionFailed" or status == 412:
        return PermanentStorageError(
            f"{where} was overwritten while it was being read; run the download again"
        )
    return PermanentStorageError(f"{where}: the server refused the request ({detail})")


_SESSION_LOCK = threading.Lock()


@functools.cache
def _session() -> boto3.session.Session:
    # One session per process: it caches botocore's parsed service model, which costs ~0.35 s
    # per new session. Credentials are passed per client, so stores never share them.
    return boto3.session.Session()


def make_client(s3: S3Settings, pool: int):
    """An S3 client for these settings; without keys, boto3's default chain applies (web identity,
    instance profile, ~/.aws)."""
    config = Config(
        region_name=s3.region,
        retries={"total_max_attempts": 1, "mode": "standard"},  # ours are in retry.py
        connect_timeout=s3.connect_timeout,
        read_timeout=s3.read_timeout,
        max_pool_connections=pool,
        # Over plain http (in-cluster MinIO, loopback) botocore also sha256-signs every payload;
        # the CRC32 each part carries (checked by the server) and the manifest's sha256 (checked
        # by every reader) already cover integrity. Off: 1.6-1.9 -> 1.2 client CPU-seconds per
        # 512 MiB uploaded (2 cores, versitygw on loopback). On https botocore does the same itself.
        s3={"addressing_style": s3.addressing_style, "payload_signing_enabled": False},
        # Never pick up AWS_ENDPOINT_URL behind our back: a source's prefixed settings may
        # deliberately name no endpoint (AWS itself) while the artifact's name one.
        ignore_configured_endpoint_urls=True,
    )
    try:
        with _SESSION_LOCK:  # creating clients from one session is not thread-safe
            return _session().client(
                "s3",
                endpoint_url=s3.endpoint_url,
                config=config,
                aws_access_key_id=s3.access_key_id,
                aws_secret_access_key=s3.secret_access_key,
                aws_session_token=s3.session_token,
            )
    except ValueError as exc:  # botocore's invalid-endpoint errors are ValueErrors
        raise PermanentStorageError(
            f"{s3.env_prefix}AWS_ENDPOINT_URL {s3.endpoint_url!r} is not usable ({exc})"
        ) from exc


# Endpoints that have answered in this process. A refused connection to one of them means
# "down for now" (retried); to an endpoint never reached it means a wrong URL (fails at once).
# Process-wide, so a Job that checked its endpoint at start still retries an upload hours later
# through a new store while the S3 pod restarts.
_REACHED: set[str] = set()


class S3Store:
    """Objects in one bucket. Thread-safe: boto3 clients are, and the store keeps no other state."""

    def __init__(
        self, bucket: str, s3: S3Settings, transfer: TransferSettings, retry: RetryPolicy, client=None
    ) -> None:
        self.bucket = bucket
        self.s3 = s3
        self.transfer = transfer
        self.retry = retry
        self.client = client or make_client(s3, pool=transfer.threads + 2)

    def describe(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def _call(self, what: str, key: str, fn: Callable[[], T]) -> T:
        where = self.describe(key)

        endpoint = self.s3.endpoint_name()

        def once() -> T:
            result = fn()
            _REACHED.add(endpoint)
            return result

        def convert(exc: Exception) -> StorageError | None:
            return classify(exc, where, self.s3, endpoint in _REACHED)

        return call_with_retries(once, convert, self.retry, f"{what} {where}")

    def probe(self, prefix: str, write: bool = False) -> None:
        """Reach the endpoint, the bucket and the credentials with one small listing; with
        ``write``, also write and delete an empty marker (read-only keys fail here, not after
        hours of quantization). Readers ignore the marker: it is no manifest."""
        self._call(
            "check",
            prefix,
            lambda: self.client.list_objects_v2(Bucket=self.bucket, Prefix=prefix, MaxKeys=1),
        )
        if write:
            marker = prefix + ".qmodel-write-check"
            self.write_bytes(marker, b"")
            self.delete([marker])

    def list(self, prefix: str) -> list[ObjectInfo]:
        def listing() -> list[ObjectInfo]:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
            return [
                ObjectInfo(o["Key"], int(o["Size"]), o.get("ETag", ""))
                for page in pages
                for o in page.get("Contents", [])
            ]

        return sorted(self._call("list", prefix, listing), key=lambda o: o.key)

    def read_bytes(self, key: str) -> bytes:
        return self._call(
            "read", key, lambda: self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        )

    def write_bytes(self, key: str, data: bytes) -> None:
        self._call("write", key, lambda: self.client.put_object(Bucket=self.bucket, Key=key, Body=data))

    def delete(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = {"Objects": [{"Key": k} for k in keys[start : start + 1000]], "Quiet": True}
            resp = self._call(
                "delete",
                keys[start],
                lambda b=batch: self.client.delete_objects(Bucket=self.bucket, Delete=b),
            )
            if resp.get("Errors"):
                first = resp["Errors"][0]
                raise PermanentStorageError(
                    f"{self.describe(first.get('Key', ''))}: delete refused ({first.get('Code')}: "
                    f"{first.get('Message')}); check that the credentials may delete in this bucket"
                )

    def upload_file(self, key: str, path: Path, expect_sha256: str | None, progress: ProgressFn) -> str:
        size = Path(path).stat().st_size
        parts = plan_parts(size, self.transfer.part_size)
        if len(parts) == 1:
            data = Path(path).read_bytes()
            actual = hashlib.sha256(data).hexdigest()
            check_digest(Path(key).name, str(path), actual, expect_sha256)
            self.write_bytes(key, data)
            progress(len(data))
            return actual
        return self._upload_parts(key, Path(path), parts, expect_sha256, progress)

    def _upload_parts(
        self, key: str, path: Path, parts: list[tuple[int, int]], expect: str | None, progress: ProgressFn
    ) -> str:
        # CRC32 per part lets the server reject a part damaged in transit (botocore computes it).
        created = self._call(
            "start upload",
            key,
            lambda: self.client.create_multipart_upload(
                Bucket=self.bucket, Key=key, ChecksumAlgorithm="CRC32"
            ),
        )
        upload_id = created["UploadId"]
        digest = hashlib.sha256()

        def read_parts() -> Iterator[tuple[int, bytes]]:
            with open(path, "rb") as fh:
                for number, (_offset, length) in enumerate(parts, 1):
                    data = fh.read(length)
                    if len(data) != length:
                        raise PermanentStorageError(f"{path} changed size while it was being uploaded")
                    digest.update(data)
                    yield number, data

        def send(item: tuple[int, bytes]) -> dict:
            number, data = item
            resp = self._call(
                f"upload part {number}/{len(parts)} of",
                key,
                lambda: self.client.upload_part(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=data,
                    ChecksumAlgorithm="CRC32",
                ),
            )
            return {"PartNumber": number, "ETag": resp["ETag"], "ChecksumCRC32": resp["ChecksumCRC32"]}

        try:
            done = []
            with ThreadPoolExecutor(self.transfer.threads, thread_name_prefix="s3-put") as pool:
                for part, (_offset, length) in zip(
                    ordered_map(pool, send, read_parts(), self.transfer.threads), parts, strict=True
                ):
                    done.append(part)
                    progress(length)
            actual = digest.hexdigest()
            check_digest(Path(key).name, str(path), actual, expect)
            self._call(
                "finish upload",
                key,
                lambda: self.client.complete_multipart_upload(
                    Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": done}
                ),
            )
            return actual
        except BaseException:
            self._abort(key, upload_id)
            raise

    def _abort(self, key: str, upload_id: str) -> None:
        # Best effort: if the server is gone the parts stay invisible (never listed as objects)
        # until a bucket lifecycle rule (AbortIncompleteMultipartUpload) or a later abort clears them.
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except (bexc.BotoCoreError, bexc.ClientError) as exc:
            log.warning("could not abort the multipart upload of %s: %s", self.describe(key), exc)

    def download_file(self, info: ObjectInfo, dest: Path, progress: ProgressFn) -> str:
        parts = plan_parts(info.size, self.transfer.part_size)
        # If-Match pins every range to the same object version: an overwrite mid-download fails
        # instead of stitching two versions together.
        match = {"IfMatch": info.etag} if info.etag else {}

        def fetch(part: tuple[int, int]) -> bytes:
            offset, length = part
            if length == 0:
                return b""

            def get() -> bytes:
                resp = self.client.get_object(
                    Bucket=self.bucket, Key=info.key, Range=f"bytes={offset}-{offset + length - 1}", **match
                )
                data = resp["Body"].read()
                if len(data) != length:
                    raise TransientStorageError(
                        f"{self.describe(info.key)}: got {len(data)} of {length} bytes at offset {offset}"
                    )
                return data

            return self._call("read", info.key, get)

        threads = min(self.transfer.threads, len(parts))
        with open(dest, "wb") as out, ThreadPoolExecutor(threads, thread_name_prefix="s3-get") as pool:
            return hash_stream(ordered_map(pool, fetch, parts, threads), out.write, progress)
