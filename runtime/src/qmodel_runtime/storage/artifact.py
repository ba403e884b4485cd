"""Artifacts in storage: upload (manifest last), verified download with resume, revisions, delete.

Written once against the ``Store`` interface, so file:// and s3:// behave the same:
- a revision exists for readers exactly when its ``qmodel-manifest.json`` does: uploads write
  it last and deletes remove it first;
- a download checks every byte against the manifest while streaming, writes each file under a
  temporary name and renames it only once it matches, and writes the local manifest last; so a
  cut-off or refused download never leaves a folder that looks complete, and a rerun reuses the
  files already there that still match.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from qmodel_runtime import manifest as mf
from qmodel_runtime.storage.base import ObjectInfo, ProgressFactory, ProgressFn, Store, no_progress
from qmodel_runtime.storage.errors import IntegrityError, NotFoundError, PermanentStorageError
from qmodel_runtime.storage.filestore import TMP_MARK

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UploadResult:
    uri: str
    manifest_digest: str
    size_bytes: int
    files: int
    skipped: bool = False  # the same manifest was already there: nothing was sent


@dataclass(frozen=True)
class DownloadResult:
    path: Path
    manifest: dict | None
    manifest_digest: str | None
    fetched: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    size_bytes: int = 0


@dataclass(frozen=True)
class Revision:
    name: str
    uri: str


def _prefix(key: str) -> str:
    return key if not key or key.endswith("/") else key + "/"


def local_manifest(folder: Path) -> tuple[dict, bytes] | None:
    path = Path(folder) / mf.MANIFEST_NAME
    if not path.is_file():
        return None
    data = path.read_bytes()
    return mf.load_manifest(data, str(path)), data


def upload_artifact(
    store: Store,
    folder: Path,
    key: str,
    metadata: dict | None = None,
    progress: ProgressFactory = no_progress,
) -> UploadResult:
    """Upload ``folder`` as the revision at ``key``: files first, ``qmodel-manifest.json`` last.

    With a manifest in ``folder`` (the quantize Job writes one), every file is checked against it
    while it is read for sending and the manifest is uploaded byte for byte (its digest stays the
    one the Job reports). Without one, a manifest is built from the hashes taken while sending,
    with ``metadata`` merged in. An existing, different revision at ``key`` is hidden (its manifest
    deleted) before any file is replaced."""
    folder, key = Path(folder), _prefix(key)
    if not folder.is_dir():
        raise PermanentStorageError(f"{folder} is not a folder; upload needs the artifact's folder")
    found = local_manifest(folder)
    names = sorted(found[0]["files"]) if found else mf.artifact_files(folder)
    expected = found[0]["files"] if found else {}
    for name in names:
        if not (folder / name).is_file():
            raise IntegrityError(f"{name}: listed in {folder / mf.MANIFEST_NAME} but missing from {folder}")
    manifest_key = key + mf.MANIFEST_NAME
    if found and _remote_bytes(store, manifest_key) == found[1]:
        log.info("%s already holds this revision; nothing to upload", store.describe(key))
        return _upload_result(store, key, found[0], found[1], skipped=True)
    store.delete([manifest_key])  # readers stop seeing the old revision before any file changes
    moved = progress(sum((folder / n).stat().st_size for n in names))
    entries = {}
    for name in names:
        path = folder / name
        want = expected.get(name, {}).get("sha256")
        entries[name] = {
            "sha256": store.upload_file(key + name, path, want, moved),
            "size": path.stat().st_size,
        }
        log.debug("sent %s", store.describe(key + name))
    if found:
        manifest, data = found
    else:
        manifest = {"format": mf.FORMAT, **(metadata or {}), "files": entries}
        data = mf.dumps(manifest)
    store.write_bytes(manifest_key, data)
    return _upload_result(store, key, manifest, data)


def _upload_result(
    store: Store, key: str, manifest: dict, data: bytes, skipped: bool = False
) -> UploadResult:
    files = manifest["files"]
    return UploadResult(
        uri=store.describe(key),
        manifest_digest=mf.digest(data),
        size_bytes=sum(int(e["size"]) for e in files.values()),
        files=len(files),
        skipped=skipped,
    )


def _remote_bytes(store: Store, key: str) -> bytes | None:
    try:
        return store.read_bytes(key)
    except NotFoundError:
        return None


def download_artifact(
    store: Store, key: str, dest: Path, progress: ProgressFactory = no_progress
) -> DownloadResult:
    """Fetch the revision at ``key`` into ``dest``, verifying every file against its manifest.
    Files already in ``dest`` that match are kept (resume). Raises IntegrityError naming the
    first file that does not match; ``dest`` then holds no manifest (it never looks complete)."""
    key, dest = _prefix(key), Path(dest)
    try:
        data = store.read_bytes(key + mf.MANIFEST_NAME)
    except NotFoundError:
        raise NotFoundError(
            f"{store.describe(key)} has no {mf.MANIFEST_NAME}: the revision does not exist or its upload "
            f"never finished; `python -m qmodel_runtime.storage ls <model prefix>` lists complete revisions"
        ) from None
    manifest = mf.load_manifest(data, store.describe(key + mf.MANIFEST_NAME))
    dest.mkdir(parents=True, exist_ok=True)
    (dest / mf.MANIFEST_NAME).unlink(missing_ok=True)
    remote = {o.key[len(key) :]: o for o in store.list(key)}
    size = sum(int(e["size"]) for e in manifest["files"].values())
    moved = progress(size)
    fetched, reused = [], []
    for name, entry in sorted(manifest["files"].items()):
        target = dest / name
        if _matches(target, entry):
            reused.append(name)
            moved(int(entry["size"]))
            continue
        info = remote.get(name)
        if info is None:
            raise IntegrityError(f"{name}: listed in the manifest but missing from {store.describe(key)}")
        if info.size != int(entry["size"]):
            raise IntegrityError(
                f"{name}: {info.size} bytes in {store.describe(key)}, the manifest says {entry['size']}"
            )
        _fetch(store, info, target, name, entry["sha256"], moved)
        fetched.append(name)
    _write_atomic(dest / mf.MANIFEST_NAME, data)
    log.info(
        "%s: %d files verified (%d fetched, %d reused)",
        dest,
        len(fetched) + len(reused),
        len(fetched),
        len(reused),
    )
    return DownloadResult(dest, manifest, mf.digest(data), fetched, reused, size)


def _matches(path: Path, entry: dict) -> bool:
    try:
        mf.verify_file(path, path.name, entry)
    except mf.ManifestError:
        return False
    return True


def _fetch(
    store: Store, info: ObjectInfo, target: Path, name: str, sha256: str | None, progress: ProgressFn
) -> None:
    """Download to a hidden temporary name; rename into place only when it matches."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f"{TMP_MARK}{target.name}"
    try:
        actual = store.download_file(info, tmp, progress)
        size = tmp.stat().st_size
        if size != info.size:
            raise IntegrityError(
                f"{name}: received {size} bytes from {store.describe(info.key)}, expected {info.size}"
            )
        if sha256 is not None and actual != sha256:
            raise IntegrityError(
                f"{name}: sha256 of {store.describe(info.key)} is {actual[:16]}..., the manifest says "
                f"{sha256[:16]}...; the stored object is corrupt or was replaced; publish the revision again"
            )
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.parent / f"{TMP_MARK}{path.name}"
    tmp.write_bytes(data)
    os.replace(tmp, path)


def download_prefix(
    store: Store, key: str, dest: Path, progress: ProgressFactory = no_progress
) -> DownloadResult:
    """Fetch every object under ``key`` into ``dest`` (a source model: a plain Hugging Face folder;
    or, when ``key`` names one object, that file, into ``dest/<its name>``: a dataset file).

    With a qmodel manifest there, this is ``download_artifact`` (verified). Without one there is
    nothing to verify against, so each file is checked for size only; files already in ``dest``
    with the listed size are kept (resume), the others land under a temporary name first."""
    dest = Path(dest)
    single = [o for o in store.list(key) if o.key == key] if key and not key.endswith("/") else []
    if single:
        key = key.rpartition("/")[0] + "/" if "/" in key else ""
        objects = single
    else:
        key = _prefix(key)
        objects = [o for o in store.list(key) if not o.key.endswith("/")]
    if not objects:
        raise NotFoundError(f"{store.describe(key)} holds no files; check the URI (a folder of model files)")
    if any(o.key == key + mf.MANIFEST_NAME for o in objects):
        return download_artifact(store, key, dest, progress)
    dest.mkdir(parents=True, exist_ok=True)
    moved = progress(sum(o.size for o in objects))
    fetched, reused = [], []
    for info in objects:
        name = info.key[len(key) :]
        if name.startswith("/") or ".." in name.split("/"):
            raise PermanentStorageError(
                f"{store.describe(info.key)}: object name escapes the folder; refusing it"
            )
        target = dest / name
        if target.is_file() and target.stat().st_size == info.size:
            reused.append(name)
            moved(info.size)
            continue
        _fetch(store, info, target, name, None, moved)
        fetched.append(name)
    return DownloadResult(dest, None, None, fetched, reused, sum(o.size for o in objects))


def list_revisions(store: Store, key: str) -> list[Revision]:
    """Complete revisions directly under the model prefix ``key``: those whose manifest exists."""
    key = _prefix(key)
    names = []
    for info in store.list(key):
        rest = info.key[len(key) :]
        rev, _, tail = rest.partition("/")
        if rev and tail == mf.MANIFEST_NAME:
            names.append(rev)
    return [Revision(n, store.describe(key + n + "/")) for n in sorted(names)]


def delete_prefix(store: Store, key: str) -> int:
    """Delete everything under ``key`` (a revision or a whole model); -> objects deleted.
    Manifests go first, so each revision disappears for readers before any of its files do."""
    key = _prefix(key)
    # An empty key is a whole bucket (or "/"); a top-level folder is never one model's.
    if key.count("/") < (2 if store.describe(key).startswith("file:") else 1):
        raise PermanentStorageError(
            f"refusing to delete {store.describe(key)}: name a model or revision prefix"
        )
    keys = [o.key for o in store.list(key)]
    manifests = {k for k in keys if k.rsplit("/", 1)[-1] == mf.MANIFEST_NAME}
    store.delete(sorted(manifests))
    store.delete([k for k in keys if k not in manifests])
    left = store.list(key)
    if left:  # a writer raced us, or the store kept something: the clean-up Job must not report done
        raise PermanentStorageError(
            f"{len(left)} objects are still under {store.describe(key)} after deleting (e.g. {left[0].key}); "
            "is a quantize Job still writing there?"
        )
    return len(keys)
