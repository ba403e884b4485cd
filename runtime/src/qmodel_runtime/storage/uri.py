"""Storage URIs, parsed once into a frozen value (pure; no I/O).

    s3://bucket/prefix/      any S3-compatible endpoint (endpoint and keys from the environment)
    file:///abs/path/        local disk (the embedded default)
    pvc://claim/path/        a PersistentVolumeClaim the pod has mounted at <pvc_root>/<claim>;
                             resolved here to file://<pvc_root>/<claim>/path

The operator mounts each claim a pod needs at ``<pvc_root>/<claim>`` (``pvc_root`` defaults to
``/mnt/pvc`` and is set with ``QMODEL_PVC_ROOT``), so a pvc:// URI names the same bytes in
every pod that mounts the claim.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from qmodel_runtime.storage.errors import PermanentStorageError

SCHEMES = ("s3", "file", "pvc")
DEFAULT_PVC_ROOT = Path("/mnt/pvc")
# AWS's bucket naming rules (MinIO and versitygw enforce the same): 3-63 characters of
# lowercase letters, digits, dots and hyphens, starting and ending with a letter or digit.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
# A PVC name is a DNS-1123 subdomain.
_CLAIM = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")


class URIError(PermanentStorageError, ValueError):
    """A URI the user wrote cannot be used; the message says how to write it."""


@dataclass(frozen=True)
class StorageURI:
    """``scheme`` is "s3" or "file" (pvc:// resolves to file); ``bucket`` is empty for file;
    ``key`` is the object key (s3) or the absolute path without its leading "/" (file)."""

    scheme: str
    bucket: str
    key: str

    def __str__(self) -> str:
        if self.scheme == "s3":
            return f"s3://{self.bucket}/{self.key}"
        return f"file:///{self.key}"

    @property
    def path(self) -> Path:
        """The local path of a file URI."""
        if self.scheme != "file":
            raise ValueError(f"{self} is not a local path")
        return Path("/" + self.key)

    def as_prefix(self) -> StorageURI:
        """The same URI as a folder: ends with "/" (a revision, a model, a source folder)."""
        if not self.key or self.key.endswith("/"):
            return self
        return StorageURI(self.scheme, self.bucket, self.key + "/")

    def child(self, *names: str) -> StorageURI:
        """``child("model", "rev")`` -> ``<prefix>model/rev``; names are single path segments."""
        for name in names:
            if not name or name in (".", "..") or "/" in name.strip("/"):
                raise URIError(f"{name!r} is not a single path segment (below {self})")
        tail = "/".join(n.strip("/") for n in names)
        return StorageURI(self.scheme, self.bucket, self.as_prefix().key + tail)


def parse_uri(text: str, pvc_root: Path = DEFAULT_PVC_ROOT) -> StorageURI:
    """Parse ``s3://``, ``file://`` or ``pvc://`` into a StorageURI; raise URIError saying how to fix it."""
    text = text.strip()
    scheme, sep, rest = text.partition("://")
    if not sep or scheme.lower() not in SCHEMES:
        hint = f" (did you mean file://{text}?)" if text.startswith("/") else ""
        raise URIError(
            f"{text!r} is not a storage URI{hint}; use s3://bucket/prefix, file:///absolute/path "
            "or pvc://claim/path"
        )
    scheme = scheme.lower()
    if scheme == "s3":
        return _parse_s3(text, rest)
    if scheme == "file":
        return _parse_file(text, rest)
    return _parse_pvc(text, rest, Path(pvc_root))


def _clean_key(text: str, key: str) -> str:
    """Reject "." / ".." segments (they would escape a prefix) and collapse doubled slashes."""
    segments = key.split("/")
    if any(s in (".", "..") for s in segments):
        raise URIError(f"{text!r}: '.' and '..' are not allowed in storage paths")
    trailing = key.endswith("/")
    key = "/".join(s for s in segments if s)
    return key + "/" if trailing and key else key


def _parse_s3(text: str, rest: str) -> StorageURI:
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise URIError(f"{text!r} names no bucket; write s3://bucket/prefix")
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise URIError(
            f"{text!r}: bucket {bucket!r} is not a valid S3 bucket name (3-63 lowercase letters, "
            "digits, dots and hyphens)"
        )
    return StorageURI("s3", bucket, _clean_key(text, key))


def _parse_file(text: str, rest: str) -> StorageURI:
    host, slash, path = rest.partition("/")
    if host not in ("", "localhost"):
        raise URIError(
            f"{text!r}: file URIs need an absolute path with three slashes, e.g. file:///data/models "
            f"(got host {host!r})"
        )
    if not slash:
        raise URIError(f"{text!r} has no path; write file:///absolute/path")
    return StorageURI("file", "", _clean_key(text, path))


def _parse_pvc(text: str, rest: str, pvc_root: Path) -> StorageURI:
    claim, _, path = rest.partition("/")
    if not _CLAIM.match(claim):
        raise URIError(
            f"{text!r}: {claim!r} is not a PersistentVolumeClaim name (lowercase letters, digits, "
            "'-' and '.'); write pvc://claim/path"
        )
    if not pvc_root.is_absolute():
        raise URIError(f"the PVC mount root must be an absolute path, got {str(pvc_root)!r}")
    local = PurePosixPath(pvc_root.as_posix(), claim).as_posix().lstrip("/")
    key = _clean_key(text, path)
    return StorageURI("file", "", f"{local}/{key}" if key else local + "/")
