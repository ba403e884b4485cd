"""The local-disk backend (file:// and pvc:// URIs): keys are paths under "/".

Writes go to a hidden temporary file in the target folder, are fsync'ed, then renamed into
place, so a reader (or a crash) sees the old file or the new one, never a half-written one.
"""

from __future__ import annotations

import errno
import logging
import os
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from qmodel_runtime.storage.base import ObjectInfo, ProgressFn, check_digest, hash_stream
from qmodel_runtime.storage.errors import NotFoundError, PermanentStorageError, StorageError

log = logging.getLogger(__name__)
TMP_MARK = ".qmodel-tmp-"
_CHUNK = 8 << 20


def _read_chunks(fh, chunk: int = _CHUNK) -> Iterator[bytes]:
    while block := fh.read(chunk):
        yield block


class FileStore:
    """Local disk. ``root`` is "/" in production (keys are absolute paths without the leading
    slash); tests may root it elsewhere."""

    def __init__(self, root: Path = Path("/")) -> None:
        self.root = Path(root)

    def describe(self, key: str) -> str:
        uri = (self.root / key).as_uri()
        return uri + "/" if key.endswith("/") and not uri.endswith("/") else uri

    def _path(self, key: str) -> Path:
        return self.root / key

    def probe(self, prefix: str, write: bool = False) -> None:
        """The folder (or its nearest existing parent) must be a readable, and if ``write``
        writable, folder: a missing or read-only volume mount fails here, before any work."""
        path = self._path(prefix)
        while not path.exists() and path != self.root:
            path = path.parent
        mode = os.R_OK | os.X_OK | (os.W_OK if write else 0)
        if not path.is_dir() or not os.access(path, mode):
            need = "writable" if write else "readable"
            raise PermanentStorageError(
                f"{self.describe(prefix)}: {path} is not a {need} folder; "
                "check the volume mount and its permissions"
            )

    def list(self, prefix: str) -> list[ObjectInfo]:
        # A prefix ending in "/" is a folder; otherwise match names that start with the last segment.
        base = self._path(prefix) if prefix.endswith("/") or not prefix else self._path(prefix).parent
        if not base.is_dir():
            return []
        found = []
        for dirpath, _dirs, names in os.walk(base):
            for name in names:
                if name.startswith(TMP_MARK) or TMP_MARK in name:
                    continue
                path = Path(dirpath, name)
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix) and path.is_file():
                    found.append(ObjectInfo(key, path.stat().st_size))
        return sorted(found, key=lambda o: o.key)

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError as exc:
            raise NotFoundError(f"{self.describe(key)} does not exist") from exc
        except OSError as exc:
            raise _os_error(exc, self.describe(key)) from exc

    def write_bytes(self, key: str, data: bytes) -> None:
        self._write(key, lambda fh: fh.write(data))

    def upload_file(self, key: str, path: Path, expect_sha256: str | None, progress: ProgressFn) -> str:
        def copy(out) -> str:
            with open(path, "rb") as src:
                actual = hash_stream(_read_chunks(src), out.write, progress)
            check_digest(Path(key).name, str(path), actual, expect_sha256)
            return actual

        return self._write(key, copy)

    def download_file(self, info: ObjectInfo, dest: Path, progress: ProgressFn) -> str:
        src_path = self._path(info.key)
        try:
            with open(src_path, "rb") as src, open(dest, "wb") as out:
                return hash_stream(_read_chunks(src), out.write, progress)
        except FileNotFoundError as exc:
            raise NotFoundError(f"{self.describe(info.key)} does not exist") from exc
        except OSError as exc:
            raise _os_error(exc, self.describe(info.key)) from exc

    def delete(self, keys: Iterable[str]) -> None:
        touched = set()
        for key in keys:
            path = self._path(key)
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                raise _os_error(exc, self.describe(key)) from exc
            touched.add(path.parent)
        for folder in sorted(touched, key=lambda p: len(p.parts), reverse=True):
            _remove_empty_dirs(folder, self.root)

    def _write(self, key: str, fill):
        target = self._path(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.parent / f"{TMP_MARK}{uuid.uuid4().hex}-{target.name}"
            try:
                with open(tmp, "wb") as fh:
                    result = fill(fh)
                    fh.flush()
                    os.fsync(fh.fileno())
                tmp.replace(target)
            finally:
                tmp.unlink(missing_ok=True)
            _fsync_dir(target.parent)
            return result
        except StorageError:
            raise
        except OSError as exc:
            raise _os_error(exc, self.describe(key)) from exc


def _fsync_dir(folder: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_empty_dirs(folder: Path, root: Path) -> None:
    """Remove ``folder`` and its parents while they are empty (never ``root`` itself)."""
    while folder != root and root in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return  # not empty (or gone): stop climbing
        folder = folder.parent


def _os_error(exc: OSError, where: str) -> PermanentStorageError:
    reasons = {
        errno.EACCES: "permission denied: check the volume's ownership and the pod's fsGroup/runAsUser",
        errno.EPERM: "operation not permitted: check the volume's ownership and mount options",
        errno.ENOSPC: "no space left on the device: free space or use a larger volume",
        errno.EROFS: "the file system is read-only: mount the volume read-write",
        errno.EDQUOT: "the disk quota is exhausted",
    }
    reason = reasons.get(exc.errno, exc.strerror or str(exc))
    return PermanentStorageError(f"{where}: {reason}")
