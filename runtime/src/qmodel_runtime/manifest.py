"""``qmodel-manifest.json``: what an artifact holds, written last, trusted only when it verifies.

Shape (every key is stable; readers ignore keys they do not know)::

    {
      "format": "qmodel-artifact/v1",
      "files": {"model.safetensors": {"sha256": "...", "size": 123}, ...},
      ... producer metadata (revision, source digest, quantization, perplexities, tools, timings)
    }

The manifest's own digest (sha256 of its bytes) identifies the artifact: it is the
``manifestDigest`` the operator records in status.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

MANIFEST_NAME = "qmodel-manifest.json"
FORMAT = "qmodel-artifact/v1"
_CHUNK = 8 << 20


class ManifestError(ValueError):
    """An artifact does not match its manifest (or has none); the message names the file."""


def sha256_file(path: Path, chunk: int = _CHUNK) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def artifact_files(folder: Path) -> list[str]:
    """Relative POSIX paths of every regular file under ``folder`` except the manifest."""
    folder = Path(folder)
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.name != MANIFEST_NAME and not p.name.startswith(".")
    )


def build_manifest(folder: Path, metadata: dict | None = None, files: Iterable[str] | None = None) -> dict:
    """Hash every file of ``folder`` (or only ``files``) into a manifest dict."""
    folder = Path(folder)
    names = sorted(files) if files is not None else artifact_files(folder)
    entries = {n: {"sha256": sha256_file(folder / n), "size": (folder / n).stat().st_size} for n in names}
    return {"format": FORMAT, **(metadata or {}), "files": entries}


def dumps(manifest: dict) -> bytes:
    """Canonical bytes (sorted keys) so the digest of a manifest is reproducible."""
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()


def digest(manifest_bytes: bytes) -> str:
    return "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()


def write_manifest(folder: Path, metadata: dict | None = None) -> tuple[dict, str]:
    """Write the manifest LAST, atomically; -> (manifest, its digest)."""
    folder = Path(folder)
    manifest = build_manifest(folder, metadata)
    data = dumps(manifest)
    tmp = folder / f".{MANIFEST_NAME}.tmp"
    tmp.write_bytes(data)
    tmp.replace(folder / MANIFEST_NAME)
    return manifest, digest(data)


def load_manifest(data: bytes, where: str = "manifest") -> dict:
    try:
        manifest = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{where} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ManifestError(f"{where} has no 'files' table; is this a qmodel artifact?")
    for name, entry in manifest["files"].items():
        if not isinstance(entry, dict) or "sha256" not in entry or "size" not in entry:
            raise ManifestError(f"{where}: entry {name!r} lacks sha256/size")
        if name.startswith("/") or ".." in Path(name).parts:
            raise ManifestError(f"{where}: entry {name!r} escapes the artifact folder")
    return manifest


def verify_folder(folder: Path) -> dict:
    """Check every file listed in ``folder``'s manifest; -> the manifest. Raises ManifestError
    naming the first file that is missing, of the wrong size, or of the wrong digest."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{folder} has no {MANIFEST_NAME}: the artifact is incomplete or not ours")
    manifest = load_manifest(path.read_bytes(), str(path))
    for name, entry in manifest["files"].items():
        verify_file(folder / name, name, entry)
    return manifest


def verify_file(path: Path, name: str, entry: dict) -> None:
    if not path.is_file():
        raise ManifestError(f"{name}: listed in the manifest but missing")
    size = path.stat().st_size
    if size != entry["size"]:
        raise ManifestError(f"{name}: size {size} bytes, manifest says {entry['size']}")
    actual = sha256_file(path)
    if actual != entry["sha256"]:
        raise ManifestError(f"{name}: sha256 {actual[:16]}..., manifest says {entry['sha256'][:16]}...")
