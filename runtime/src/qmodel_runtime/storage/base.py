"""The interface every backend implements, and the pure pieces they share.

A backend moves bytes between local files and keys under one root (an S3 bucket, or "/" for
local disk); the artifact logic in ``artifact.py`` (manifest last, verification, resume) is
written once against this interface. Keys are "/"-separated, never start with "/".
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from qmodel_runtime.progress import Progress
from qmodel_runtime.storage.errors import IntegrityError

# Called with the number of bytes just moved (from the calling thread, in order).
ProgressFn = Callable[[int], None]
# Called once with the total bytes a transfer will move; returns the per-chunk callback.
ProgressFactory = Callable[[int], ProgressFn]
T = TypeVar("T")
R = TypeVar("R")

# S3 allows at most 10,000 parts per multipart upload, each at least 5 MiB except the last.
MAX_PARTS = 10_000
MIN_PART = 5 << 20


@dataclass(frozen=True)
class TransferSettings:
    """How big files move: in ``part_size`` pieces, ``threads`` at a time.

    16 MiB parts x 8 threads keep at most 9 parts (144 MiB) in memory per file, and a 100 GB
    file stays within S3's 10,000-part limit without growing the part size.
    """

    part_size: int = 16 << 20
    threads: int = 8

    def __post_init__(self) -> None:
        if self.part_size < MIN_PART:
            raise ValueError(f"part size must be at least 5 MiB (S3's minimum), got {self.part_size} bytes")
        if not 1 <= self.threads <= 64:
            raise ValueError(f"threads must be between 1 and 64, got {self.threads}")


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str = ""


class Store(Protocol):
    """A backend: bytes under keys. Each write is atomic: a reader sees the old object or the
    whole new one, never a part (multipart completes at once; files are renamed into place)."""

    def describe(self, key: str) -> str:
        """The URI of ``key``, for messages."""
        ...

    def probe(self, prefix: str, write: bool = False) -> None:
        """Fail now (PermanentStorageError) if ``prefix`` cannot be reached, read or written."""
        ...

    def list(self, prefix: str) -> list[ObjectInfo]:
        """Every object whose key starts with ``prefix`` (recursively), sorted by key."""
        ...

    def read_bytes(self, key: str) -> bytes:
        """A small object's bytes; NotFoundError if it does not exist."""
        ...

    def write_bytes(self, key: str, data: bytes) -> None: ...

    def upload_file(self, key: str, path: Path, expect_sha256: str | None, progress: ProgressFn) -> str:
        """Send ``path`` to ``key`` hashing as it reads; -> sha256 hex. With ``expect_sha256``,
        a mismatch raises IntegrityError and nothing is written under ``key``."""
        ...

    def download_file(self, info: ObjectInfo, dest: Path, progress: ProgressFn) -> str:
        """Write the object to ``dest`` (created or truncated) hashing in order; -> sha256 hex."""
        ...

    def delete(self, keys: Iterable[str]) -> None:
        """Delete these keys (missing ones are fine)."""
        ...


def _ignore(_n: int) -> None:
    return None


def no_progress(_total: int) -> ProgressFn:
    return _ignore


def log_progress(desc: str, every: float = 5.0) -> ProgressFactory:
    """Progress as log lines in MiB (``qmodel_runtime.progress``), for transfers that take a while."""

    def start(total: int) -> ProgressFn:
        meter = Progress(desc, total=-(-total >> 20), unit="MiB", every=every)
        moved = 0

        def mib(n: int) -> int:  # whole MiB done; the last partial MiB counts only at the very end
            return meter.total if n >= total else n >> 20

        def update(n: int) -> None:
            nonlocal moved
            before = mib(moved)
            moved += n
            meter.update(mib(moved) - before)

        return update

    return start


def plan_parts(size: int, part_size: int) -> list[tuple[int, int]]:
    """Split ``size`` bytes into (offset, length) parts of ``part_size``, growing the part size
    when a file would need more than S3's 10,000 parts (above 156 GiB at 16 MiB)."""
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    if size == 0:
        return [(0, 0)]
    part = max(part_size, -(-size // MAX_PARTS))
    return [(off, min(part, size - off)) for off in range(0, size, part)]


def ordered_map(
    pool: ThreadPoolExecutor, fn: Callable[[T], R], items: Iterable[T], window: int
) -> Iterator[R]:
    """``map(fn, items)`` on ``pool`` with at most ``window`` calls in flight, results in order.

    ``items`` is consumed lazily on the calling thread (an upload reads and hashes the file there
    while earlier parts are in flight). On any error the calls not yet started are cancelled."""
    pending: deque[Future[R]] = deque()
    source = iter(items)
    try:
        for item in source:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


def hash_stream(chunks: Iterable[bytes], sink: Callable[[bytes], object], progress: ProgressFn) -> str:
    """Feed ``chunks`` to ``sink`` and to sha256 in one pass; -> hex digest.
    hashlib and file writes release the GIL for buffers this size, so worker threads keep
    transferring while this thread hashes (sha256 runs at ~550 MB/s per core here)."""
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
        sink(chunk)
        progress(len(chunk))
    return digest.hexdigest()


def check_digest(name: str, where: str, actual: str, expected: str | None) -> None:
    if expected is not None and actual != expected:
        raise IntegrityError(
            f"{name}: sha256 {actual[:16]}... does not match the manifest's {expected[:16]}... "
            f"({where}); the file changed after its manifest was written"
        )
