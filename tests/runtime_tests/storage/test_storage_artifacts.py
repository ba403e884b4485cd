"""Artifact behaviour on both backends (file:// and a real S3 server): round trip, manifest last,
verification, resume, revisions, delete, plain source folders."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from runtime_tests.storage.storage_support import WEIGHTS, Target, flip_byte, make_artifact, tree

from qmodel_runtime import manifest as mf
from qmodel_runtime.storage import IntegrityError, NotFoundError
from qmodel_runtime.storage.artifact import (
    delete_prefix,
    download_artifact,
    download_prefix,
    list_revisions,
    upload_artifact,
)
from qmodel_runtime.storage.filestore import TMP_MARK


def test_round_trip_is_byte_identical(target: Target, artifact: Path, tmp_path: Path) -> None:
    up = upload_artifact(target.store, artifact, target.base + "smollm2/r1/")
    manifest_bytes = (artifact / mf.MANIFEST_NAME).read_bytes()
    assert up.manifest_digest == mf.digest(manifest_bytes)  # the Job's digest survives the upload
    assert up.size_bytes == sum(len(v) for k, v in tree(artifact).items() if k != mf.MANIFEST_NAME)
    assert [r.name for r in list_revisions(target.store, target.base + "smollm2/")] == ["r1"]

    got = download_artifact(target.store, target.base + "smollm2/r1/", tmp_path / "cache")
    assert tree(tmp_path / "cache") == tree(artifact)
    assert got.manifest_digest == up.manifest_digest
    assert sorted(got.fetched) == sorted(mf.load_manifest(manifest_bytes)["files"])
    mf.verify_folder(tmp_path / "cache")


def test_readers_never_see_a_revision_before_its_manifest(target: Target, artifact: Path) -> None:
    model = target.base + "smollm2/"
    seen = []

    def progress(_total: int):
        def check(_n: int) -> None:
            # Every file written so far is listed, but the revision is not.
            seen.append([r.name for r in list_revisions(target.store, model)])
            with pytest.raises(NotFoundError):
                target.store.read_bytes(model + "r1/" + mf.MANIFEST_NAME)

        return check

    upload_artifact(target.store, artifact, model + "r1/", progress=progress)
    assert len(seen) >= 5 and all(names == [] for names in seen)
    assert any(o.key.endswith(WEIGHTS) for o in target.store.list(model))
    assert [r.name for r in list_revisions(target.store, model)] == ["r1"]


def test_corrupted_object_fails_naming_the_file(target: Target, artifact: Path, tmp_path: Path) -> None:
    key = target.base + "smollm2/r1/"
    upload_artifact(target.store, artifact, key)
    flip_byte(target.local_path(key + WEIGHTS), offset=7_000_000)  # inside the second part

    dest = tmp_path / "cache"
    with pytest.raises(IntegrityError, match=rf"^{WEIGHTS}: sha256 .* the manifest says"):
        download_artifact(target.store, key, dest)
    assert not (dest / mf.MANIFEST_NAME).exists()  # nothing looks complete
    assert not (dest / WEIGHTS).exists()
    assert not [p for p in dest.rglob("*") if TMP_MARK in p.name]


def test_truncated_object_fails_before_downloading(target: Target, artifact: Path, tmp_path: Path) -> None:
    key = target.base + "smollm2/r1/"
    upload_artifact(target.store, artifact, key)
    target.store.write_bytes(key + "tokenizer.json", b"short")
    with pytest.raises(IntegrityError, match=r"^tokenizer.json: 5 bytes in .*manifest says 100000"):
        download_artifact(target.store, key, tmp_path / "cache")


def test_download_resumes_reusing_matching_files(target: Target, artifact: Path, tmp_path: Path) -> None:
    key = target.base + "smollm2/r1/"
    upload_artifact(target.store, artifact, key)
    dest = tmp_path / "cache"
    download_artifact(target.store, key, dest)
    (dest / mf.MANIFEST_NAME).unlink()
    (dest / "tokenizer.json").write_bytes(b"partial")  # a damaged local copy
    (dest / "sub" / "extra.txt").unlink()  # never fetched
    flip_byte(dest / WEIGHTS, 10)  # right size, wrong bytes: must be refetched too

    again = download_artifact(target.store, key, dest)
    assert sorted(again.fetched) == ["sub/extra.txt", "tokenizer.json", WEIGHTS]
    assert sorted(again.reused) == ["config.json", "empty.txt"]
    assert tree(dest) == tree(artifact)


def test_reupload_is_skipped_or_hides_the_old_revision_first(
    target: Target, artifact: Path, tmp_path: Path
) -> None:
    model, key = target.base + "smollm2/", target.base + "smollm2/r1/"
    upload_artifact(target.store, artifact, key)
    assert upload_artifact(target.store, artifact, key).skipped  # same manifest: nothing sent

    changed = make_artifact(tmp_path / "changed", seed=1)
    during = []

    def progress(_total: int):
        return lambda _n: during.append([r.name for r in list_revisions(target.store, model)])

    result = upload_artifact(target.store, changed, key, progress=progress)
    assert not result.skipped
    assert during and all(names == [] for names in during)
    download_artifact(target.store, key, tmp_path / "cache")
    assert tree(tmp_path / "cache") == tree(changed)


def test_upload_refuses_a_file_changed_after_its_manifest(
    target: Target, artifact: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "art"
    shutil.copytree(artifact, folder)
    flip_byte(folder / WEIGHTS, 6_000_000)
    key = target.base + "smollm2/r1/"
    with pytest.raises(IntegrityError, match=rf"^{WEIGHTS}: sha256 .*changed after its manifest"):
        upload_artifact(target.store, folder, key)
    assert list_revisions(target.store, target.base + "smollm2/") == []
    # The bad file never became an object (the multipart upload was aborted / the temp file removed).
    assert not [o.key for o in target.store.list(key) if o.key.endswith(WEIGHTS)]


def test_folder_without_manifest_gets_one_built_while_uploading(
    target: Target, artifact: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "art"
    shutil.copytree(artifact, folder)
    (folder / mf.MANIFEST_NAME).unlink()
    up = upload_artifact(target.store, folder, target.base + "m/r2/", metadata={"revision": "r2"})
    got = download_artifact(target.store, target.base + "m/r2/", tmp_path / "cache")
    assert got.manifest_digest == up.manifest_digest
    assert got.manifest["revision"] == "r2"
    assert got.manifest["files"] == mf.build_manifest(artifact)["files"]


def test_incomplete_revision_is_invisible_and_refused(target: Target, tmp_path: Path) -> None:
    target.store.write_bytes(target.base + "m/r9/config.json", b"{}")  # an upload cut off early
    assert list_revisions(target.store, target.base + "m/") == []
    with pytest.raises(NotFoundError, match=r"has no qmodel-manifest.json.*never finished"):
        download_artifact(target.store, target.base + "m/r9/", tmp_path / "cache")


def test_delete_revision_then_model(target: Target, artifact: Path, tmp_path: Path) -> None:
    model = target.base + "smollm2/"
    upload_artifact(target.store, artifact, model + "r1/")
    upload_artifact(target.store, make_artifact(tmp_path / "a2", seed=2), model + "r2/")
    upload_artifact(target.store, artifact, target.base + "other/r1/")
    assert [r.name for r in list_revisions(target.store, model)] == ["r1", "r2"]

    assert delete_prefix(target.store, model + "r1/") == 6
    assert [r.name for r in list_revisions(target.store, model)] == ["r2"]
    assert delete_prefix(target.store, model) == 6
    assert target.store.list(model) == []
    assert delete_prefix(target.store, model) == 0  # nothing left: still fine
    assert [r.name for r in list_revisions(target.store, target.base + "other/")] == ["r1"]


def test_plain_source_folder_downloads_with_size_checks(
    target: Target, artifact: Path, tmp_path: Path
) -> None:
    source = target.base + "models/smollm2-135m/"
    files = [n for n in mf.artifact_files(artifact)]
    for name in files:  # a user's HF folder: no qmodel manifest
        target.store.upload_file(source + name, artifact / name, None, lambda _n: None)
    dest = tmp_path / "src"
    got = download_prefix(target.store, source, dest)
    assert got.manifest is None and sorted(got.fetched) == sorted(files)
    assert tree(dest) == {k: v for k, v in tree(artifact).items() if k != mf.MANIFEST_NAME}

    (dest / "tokenizer.json").write_bytes(b"cut")
    again = download_prefix(target.store, source, dest)
    assert again.fetched == ["tokenizer.json"]
    with pytest.raises(NotFoundError, match="holds no files"):
        download_prefix(target.store, target.base + "models/nothing-here/", dest)


def test_source_uri_naming_one_file_downloads_that_file(
    target: Target, artifact: Path, tmp_path: Path
) -> None:
    key = target.base + "data/calibration.txt"
    target.store.upload_file(key, artifact / "config.json", None, lambda _n: None)
    target.store.upload_file(key + ".bak", artifact / "empty.txt", None, lambda _n: None)  # a prefix sibling
    got = download_prefix(target.store, key, tmp_path / "ds")
    assert got.fetched == ["calibration.txt"]
    assert tree(tmp_path / "ds") == {"calibration.txt": (artifact / "config.json").read_bytes()}
