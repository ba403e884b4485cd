"""Fixtures for the storage tests: a small artifact, and a store on each backend.

The S3 store talks to a real versitygw server (tests/testbed/s3server.py) on a loopback port;
the file store to a temporary folder.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from runtime_tests.storage.storage_support import Target, make_artifact, s3_store

from qmodel_runtime.storage import FileStore
from testbed.s3server import S3Server, s3_bucket, s3_server  # noqa: F401  (fixtures)


@pytest.fixture(scope="session")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Read-only for tests: copy it before changing anything."""
    return make_artifact(tmp_path_factory.mktemp("artifact") / "art")


@pytest.fixture(params=["file", "s3"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    if request.param == "file":
        base = (tmp_path / "store").as_posix().lstrip("/") + "/"
        return Target("file", FileStore(), base, lambda key: Path("/" + key))
    server: S3Server = request.getfixturevalue("s3_server")
    bucket: str = request.getfixturevalue("s3_bucket")
    return Target("s3", s3_store(server, bucket), "qmodel/", lambda key: server.object_path(bucket, key))
