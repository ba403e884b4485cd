"""Helpers shared by the storage tests (fixtures are in conftest.py)."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qmodel_runtime import manifest as mf
from qmodel_runtime.storage import RetryPolicy, S3Settings, S3Store, Store, TransferSettings
from testbed.s3server import S3Server

PART = 5 << 20  # S3's minimum part size, so multipart paths run on small files
TRANSFER = TransferSettings(part_size=PART, threads=4)
# Three quick tries: fault tests see the retry path without waiting seconds.
FAST_RETRY = RetryPolicy(attempts=3, base=0.01, cap=0.02)
WEIGHTS = "weights.bin"
WEIGHTS_SIZE = 2 * PART + 12345  # three parts, the last one partial


def make_artifact(folder: Path, seed: int = 0, metadata: dict | None = None) -> Path:
    """A small artifact folder with its manifest; different ``seed`` -> different bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    (folder / "config.json").write_text(f'{{"model_type": "llama", "seed": {seed}}}\n')
    (folder / "tokenizer.json").write_bytes(rng.randbytes(100_000))
    (folder / "empty.txt").write_bytes(b"")
    (folder / "sub").mkdir(exist_ok=True)
    (folder / "sub" / "extra.txt").write_text(f"nested {seed}\n")
    (folder / WEIGHTS).write_bytes(rng.randbytes(WEIGHTS_SIZE))
    mf.write_manifest(folder, metadata or {"revision": f"r-{seed}"})
    return folder


def flip_byte(path: Path, offset: int) -> None:
    """Corrupt a stored object in place, keeping its size (bit rot, a bad disk)."""
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0xFF]))


@dataclass
class Target:
    """A store plus the key prefix a test may use, and where a key's bytes sit on disk."""

    kind: str
    store: Store
    base: str
    local_path: Callable[[str], Path]


def s3_store(server: S3Server, bucket: str, retry: RetryPolicy = FAST_RETRY, **env: str) -> S3Store:
    return S3Store(bucket, S3Settings.from_env(server.env(**env)), TRANSFER, retry)


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative POSIX path -> bytes), hidden files included."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }
