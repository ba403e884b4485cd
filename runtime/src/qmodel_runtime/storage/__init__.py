"""Artifact storage: s3:// (any S3-compatible endpoint), file:// and pvc:// behind one interface.

    settings = StorageSettings.from_env(os.environ)              # once, at startup
    result = upload(folder, "s3://artifacts/qmodel/smollm2/r-0123456789ab/", settings)
    download("s3://artifacts/qmodel/smollm2/r-0123456789ab/", cache_dir, settings)   # verified
    download_source("s3://models/smollm2-135m/", dest, StorageSettings.from_env(os.environ, "QMODEL_SOURCE_"))
    check("s3://artifacts/qmodel/", settings, write=True)        # at a Job's start: fail fast
    revisions("s3://artifacts/qmodel/smollm2/", settings)       # complete revisions only
    remove("s3://artifacts/qmodel/smollm2/", settings)          # a revision or a whole model

Guarantees (see ``artifact.py``): the manifest is written last and deleted first, so readers
see a revision whole or not at all; downloads verify every byte against the manifest while
streaming and resume; transient faults are retried with bounded backoff (``retry.py``) and
permanent ones fail at once with a message naming the URI and what to check.
The CLI is ``python -m qmodel_runtime.storage {upload,download,ls,rm}``.
"""

from __future__ import annotations

from pathlib import Path

from qmodel_runtime.storage.artifact import (
    DownloadResult,
    Revision,
    UploadResult,
    delete_prefix,
    download_artifact,
    download_prefix,
    list_revisions,
    upload_artifact,
)
from qmodel_runtime.storage.base import (
    ObjectInfo,
    ProgressFactory,
    Store,
    TransferSettings,
    log_progress,
    no_progress,
)
from qmodel_runtime.storage.errors import (
    IntegrityError,
    NotFoundError,
    PermanentStorageError,
    StorageError,
    TransientStorageError,
)
from qmodel_runtime.storage.filestore import FileStore
from qmodel_runtime.storage.retry import RetryPolicy
from qmodel_runtime.storage.s3store import S3Store
from qmodel_runtime.storage.settings import S3Settings, StorageSettings
from qmodel_runtime.storage.uri import StorageURI, URIError, parse_uri

__all__ = [
    "DownloadResult",
    "FileStore",
    "IntegrityError",
    "NotFoundError",
    "ObjectInfo",
    "PermanentStorageError",
    "RetryPolicy",
    "Revision",
    "S3Settings",
    "S3Store",
    "StorageError",
    "StorageSettings",
    "StorageURI",
    "Store",
    "TransferSettings",
    "TransientStorageError",
    "URIError",
    "UploadResult",
    "check",
    "download",
    "download_source",
    "log_progress",
    "open_store",
    "parse_uri",
    "remove",
    "revisions",
    "upload",
]


def resolve(uri: str | StorageURI, settings: StorageSettings) -> StorageURI:
    return uri if isinstance(uri, StorageURI) else parse_uri(uri, settings.pvc_root)


def open_store(uri: StorageURI, settings: StorageSettings) -> Store:
    if uri.scheme == "s3":
        return S3Store(uri.bucket, settings.s3, settings.transfer, settings.retry)
    return FileStore(Path("/"))


def check(uri: str | StorageURI, settings: StorageSettings, write: bool = False) -> StorageURI:
    """Fail fast, before hours of work, if ``uri`` is unusable: a bad URI or endpoint, a missing
    bucket, refused credentials, a missing or read-only folder. -> the parsed URI. After a check
    the endpoint counts as reachable, so later connection faults are retried, not fatal."""
    target = resolve(uri, settings)
    open_store(target, settings).probe(target.key, write)
    return target


def upload(
    folder: Path,
    uri: str | StorageURI,
    settings: StorageSettings,
    metadata: dict | None = None,
    progress: ProgressFactory = no_progress,
) -> UploadResult:
    """Upload an artifact folder as the revision at ``uri`` (manifest last)."""
    target = resolve(uri, settings)
    return upload_artifact(open_store(target, settings), folder, target.key, metadata, progress)


def download(
    uri: str | StorageURI, dest: Path, settings: StorageSettings, progress: ProgressFactory = no_progress
) -> DownloadResult:
    """Download and verify the revision at ``uri`` into ``dest`` (resumes)."""
    source = resolve(uri, settings)
    return download_artifact(open_store(source, settings), source.key, dest, progress)


def download_source(
    uri: str | StorageURI, dest: Path, settings: StorageSettings, progress: ProgressFactory = no_progress
) -> DownloadResult:
    """Download a plain folder (source weights; size-checked only unless it has a qmodel manifest)."""
    source = resolve(uri, settings)
    return download_prefix(open_store(source, settings), source.key, dest, progress)


def revisions(uri: str | StorageURI, settings: StorageSettings) -> list[Revision]:
    """The complete revisions under a model prefix."""
    model = resolve(uri, settings)
    return list_revisions(open_store(model, settings), model.key)


def remove(uri: str | StorageURI, settings: StorageSettings) -> int:
    """Delete a revision or a whole model prefix (manifests first); -> objects deleted."""
    target = resolve(uri, settings)
    return delete_prefix(open_store(target, settings), target.key)
