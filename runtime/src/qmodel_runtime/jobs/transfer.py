"""Every storage call the quantize Job makes, in one thin layer over ``qmodel_runtime.storage``.

Sources and datasets on local disk (file://, or pvc:// mounted by the operator) are read in
place; s3:// ones are downloaded into the Job's work folder first. The source's Secret may
differ from the artifact's: its variables carry the prefix ``QMODEL_SOURCE_`` (docs/contracts.md).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from pathlib import Path

from qmodel_runtime import assets
from qmodel_runtime.jobs.spec import InputError
from qmodel_runtime.storage import (
    StorageSettings,
    UploadResult,
    check,
    download_source,
    log_progress,
    parse_uri,
    upload,
)

log = logging.getLogger(__name__)

SOURCE_ENV_PREFIX = "QMODEL_SOURCE_"
BUILTIN_TEXTS = assets.TEXTS  # ("wiki-vital",)


def _local_or_download(uri: str, dest: Path, env: Mapping[str, str], desc: str) -> Path:
    settings = StorageSettings.from_env(env, SOURCE_ENV_PREFIX)
    parsed = parse_uri(uri, settings.pvc_root)
    if parsed.scheme == "file":
        return parsed.path
    return download_source(parsed, dest, settings, log_progress(desc)).path


def fetch_source(uri: str, work_dir: Path, env: Mapping[str, str]) -> Path:
    """The source model as a local folder (downloaded when it is in object storage)."""
    return _local_or_download(uri, Path(work_dir) / "source", env, "download source")


def dataset_text(dataset: str, split: str, work_dir: Path, env: Mapping[str, str]) -> str:
    """A named text: the bundled ``wiki-vital`` (its ``split``), or a UTF-8 text file, or a folder
    of ``*.txt`` files read in name order (the same text serves calibration and validation)."""
    if dataset in BUILTIN_TEXTS:
        return assets.wiki_text(split)
    dest = Path(work_dir) / "datasets" / hashlib.sha256(dataset.encode()).hexdigest()[:16]
    path = _local_or_download(dataset, dest, env, "download dataset")
    if path.is_file():
        return path.read_text(encoding="utf-8")
    files = sorted(path.rglob("*.txt")) if path.is_dir() else []
    if not files:
        raise FileNotFoundError(
            f"dataset {dataset}: no text file there (give a .txt file or a folder of them)"
        )
    return "\n\n".join(f.read_text(encoding="utf-8") for f in files)


def check_dataset(dataset: str, env: Mapping[str, str]) -> None:
    """Fail early, before any heavy work, on a local dataset path that does not exist."""
    if dataset in BUILTIN_TEXTS or dataset.startswith("s3://"):
        return
    path = parse_uri(dataset, StorageSettings.from_env(env, SOURCE_ENV_PREFIX).pvc_root).path
    if not path.exists():
        raise InputError(
            f"dataset {dataset}: {path} does not exist; give a text file or a folder of .txt files"
        )


def check_artifacts(uri: str, env: Mapping[str, str]) -> None:
    """Fail early if the artifact location cannot be written (bucket, credentials, folder)."""
    check(uri, StorageSettings.from_env(env), write=True)


def publish(folder: Path, uri: str, env: Mapping[str, str]) -> UploadResult:
    """Upload the artifact folder to ``uri`` (files first, the manifest last)."""
    return upload(folder, uri, StorageSettings.from_env(env), progress=log_progress("upload artifact"))
