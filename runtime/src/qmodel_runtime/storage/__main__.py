"""``python -m qmodel_runtime.storage {upload,download,ls,rm}``: the storage CLI.

Used by the Jobs (artifact clean-up runs ``rm``), by the runtime's startup and by people.
Credentials and endpoint come from the usual AWS environment variables (see settings.py).
Results go to stdout (JSON for upload/download, one URI per line for ls); progress and
diagnostics go to stderr as log lines. Exit 0 on success; 2 with one line on stderr when the
input, the configuration or the storage refuses (never a traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from qmodel_runtime.manifest import ManifestError
from qmodel_runtime.storage import (
    StorageError,
    StorageSettings,
    download,
    download_source,
    log_progress,
    open_store,
    remove,
    resolve,
    revisions,
    upload,
)

log = logging.getLogger("qmodel.storage")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m qmodel_runtime.storage",
        description="Move qmodel artifacts between a local folder and s3:// / file:// / pvc:// storage.",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    parser.add_argument(
        "--credentials-prefix",
        default="",
        metavar="PREFIX",
        help="read PREFIX+AWS_* variables instead of AWS_* (the quantize Job's source uses QMODEL_SOURCE_)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    up = sub.add_parser("upload", help="upload an artifact folder as one revision (manifest last)")
    up.add_argument("folder", type=Path)
    up.add_argument("uri", help="the revision's URI, e.g. s3://bucket/qmodel/<model>/<revision>/")
    up.add_argument(
        "--metadata", type=Path, help="a JSON object merged into the manifest when the folder has none"
    )
    down = sub.add_parser("download", help="download and verify a revision (resumes)")
    down.add_argument("uri")
    down.add_argument("dest", type=Path)
    down.add_argument(
        "--source", action="store_true", help="a plain model folder without a qmodel manifest (size-checked)"
    )
    ls = sub.add_parser("ls", help="list the complete revisions under a model prefix")
    ls.add_argument("uri")
    ls.add_argument("--files", action="store_true", help="list every object (size and URI) instead")
    rm = sub.add_parser("rm", help="delete a revision or a whole model prefix")
    rm.add_argument("uri")
    return parser


def _read_metadata(path: Path | None) -> dict | None:
    if path is None:
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise StorageError(f"--metadata {path}: cannot read a JSON object ({exc})") from exc
    if not isinstance(data, dict):
        raise StorageError(f"--metadata {path}: expected a JSON object, got {type(data).__name__}")
    return data


def run(args: argparse.Namespace, settings: StorageSettings) -> int:
    if args.command == "upload":
        result = upload(
            args.folder, args.uri, settings, _read_metadata(args.metadata), log_progress(f"upload {args.uri}")
        )
        out = {"uri": result.uri, "manifestDigest": result.manifest_digest, "sizeBytes": result.size_bytes}
        print(json.dumps({**out, "files": result.files, "skipped": result.skipped}))
    elif args.command == "download":
        fetch = download_source if args.source else download
        got = fetch(args.uri, args.dest, settings, log_progress(f"download {args.uri}"))
        out = {"path": str(got.path), "manifestDigest": got.manifest_digest, "sizeBytes": got.size_bytes}
        print(json.dumps({**out, "fetched": got.fetched, "reused": got.reused}))
    elif args.command == "ls" and args.files:
        target = resolve(args.uri, settings)
        store = open_store(target, settings)
        for info in store.list(target.key):
            print(f"{info.size:>14} {store.describe(info.key)}")
    elif args.command == "ls":
        for rev in revisions(args.uri, settings):
            print(rev.uri)
    else:
        count = remove(args.uri, settings)
        log.info("deleted %d objects under %s", count, args.uri)
    return 0


def main(argv: Sequence[str] | None = None, env: dict[str, str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        settings = StorageSettings.from_env(os.environ if env is None else env, args.credentials_prefix)
        return run(args, settings)
    except (StorageError, ManifestError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
