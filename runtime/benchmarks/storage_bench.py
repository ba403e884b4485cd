"""Storage throughput: upload and verified download of a 2 GiB artifact vs a plain file copy.

    python runtime/benchmarks/storage_bench.py [--size-gib 2] [--part-mib 16] [--threads 8]

One run of each, on the same disk, in one process, against a real versitygw on loopback
(tests/testbed/install_s3.sh builds it). The baseline is ``shutil.copyfile`` of the same bytes
(a kernel-side copy: the floor for moving bytes on this disk); sha256 of the file alone shows the
floor for verifying them (one core). Prints a table; asserts nothing about absolute times.
CPU is this process's user+system time (boto3, hashing, file I/O); the server's own CPU is
read from /proc.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from qmodel_runtime import manifest as mf
from qmodel_runtime.storage import (
    FileStore,
    RetryPolicy,
    S3Settings,
    S3Store,
    TransferSettings,
    log_progress,
)
from qmodel_runtime.storage.artifact import download_artifact, upload_artifact

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
from testbed.s3server import S3Server, find_binary  # noqa: E402  (the test bed's helper)

log = logging.getLogger("storage_bench")
CHUNK = 64 << 20


def make_artifact(folder: Path, size: int) -> Path:
    """One big weights file plus the small files an artifact has, and its manifest."""
    folder.mkdir(parents=True)
    with open(folder / "model.safetensors", "wb") as fh:
        for off in range(0, size, CHUNK):
            fh.write(os.urandom(min(CHUNK, size - off)))
    (folder / "config.json").write_text('{"model_type": "llama"}\n')
    (folder / "tokenizer.json").write_bytes(os.urandom(2 << 20))
    mf.write_manifest(folder, {"revision": "bench"})
    return folder


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _server_cpu(server: S3Server | None) -> float:
    if server is None or server.proc is None:
        return 0.0
    fields = Path(f"/proc/{server.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def measure(name: str, fn: Callable[[], object], size: int, server: S3Server | None = None) -> dict:
    os.sync()  # start each step with no dirty pages from the one before
    cpu0, srv0, t0 = _cpu(), _server_cpu(server), time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    row = {"name": name, "seconds": seconds, "gib_s": size / seconds / (1 << 30)}
    row.update(cpu=_cpu() - cpu0, server_cpu=_server_cpu(server) - srv0)
    log.info("%s: %.2f s", name, seconds)
    return row


def print_table(rows: list[dict], baseline: float, header: str) -> None:
    print(f"\n{header}")
    print(f"{'step':44} {'seconds':>8} {'GiB/s':>7} {'x copy':>7} {'CPU s':>6} {'server CPU s':>12}")
    for r in rows:
        print(
            f"{r['name']:44} {r['seconds']:8.2f} {r['gib_s']:7.2f} {r['seconds'] / baseline:7.2f} "
            f"{r['cpu']:6.1f} {r['server_cpu']:12.1f}"
        )


def run(args: argparse.Namespace, work: Path) -> None:
    size = int(args.size_gib * (1 << 30))
    transfer = TransferSettings(part_size=args.part_mib << 20, threads=args.threads)
    t0 = time.perf_counter()
    art = make_artifact(work / "artifact", size)
    log.info("wrote a %.1f GiB artifact in %.1f s", size / (1 << 30), time.perf_counter() - t0)
    total = sum(
        int(e["size"]) for e in mf.load_manifest((art / mf.MANIFEST_NAME).read_bytes())["files"].values()
    )
    big = art / "model.safetensors"

    binary = find_binary()
    if binary is None:
        sys.exit("versitygw is not installed: run tests/testbed/install_s3.sh")
    server = S3Server(binary, work / "s3")
    server.start()
    try:
        server.make_bucket("bench")
        s3 = S3Store("bench", S3Settings.from_env(server.env()), transfer, RetryPolicy())
        files = FileStore()
        file_key = (work / "filestore").as_posix().lstrip("/") + "/m/r1/"
        rows = [
            measure("plain copy (shutil.copyfile)", lambda: shutil.copyfile(big, work / "copy.bin"), size),
            measure("sha256 of the file (one core)", lambda: mf.sha256_file(big), size),
            measure(
                "upload  s3:// (verify while sending)",
                lambda: upload_artifact(s3, art, "m/r1/", progress=log_progress("upload")),
                total,
                server,
            ),
            measure(
                "download s3:// + verify (fresh cache)",
                lambda: download_artifact(s3, "m/r1/", work / "cache-s3", log_progress("download")),
                total,
                server,
            ),
            measure(
                "resume   s3:// (all present: re-hash only)",
                lambda: download_artifact(s3, "m/r1/", work / "cache-s3"),
                total,
                server,
            ),
            measure("upload  file:// (fsync, rename)", lambda: upload_artifact(files, art, file_key), total),
            measure(
                "download file:// + verify",
                lambda: download_artifact(files, file_key, work / "cache-file"),
                total,
            ),
        ]
    finally:
        server.stop(kill=False)
    baseline = rows[0]["seconds"]
    print_table(
        rows,
        baseline,
        f"{size / (1 << 30):.1f} GiB artifact, part {args.part_mib} MiB x {args.threads} threads, "
        f"{os.cpu_count()} CPUs, work dir {work}",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=float, default=2.0)
    parser.add_argument("--part-mib", type=int, default=TransferSettings.part_size >> 20)
    parser.add_argument("--threads", type=int, default=TransferSettings.threads)
    parser.add_argument(
        "--workdir", type=Path, default=None, help="a folder on the disk to measure (default: $TMPDIR)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    work = Path(tempfile.mkdtemp(prefix="qmodel-storage-bench-", dir=args.workdir))
    try:
        run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
