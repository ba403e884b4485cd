"""One stack for the whole e2e module: cluster, S3 server, model uploaded, chart installed with helm.

Cleaned up at the end (only the processes it started); its work dir is kept when a test failed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from e2e.stack import Stack, StackConfig

from testbed import paths

_failed = {"any": False}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    paths.ensure_installed()
    from qmodel_runtime import assets

    s = Stack.start(StackConfig(workdir=tmp_path_factory.mktemp("e2e-stack")))
    try:
        s.upload_model(Path(assets.model_path()))
        s.install_chart()
        yield s
    finally:
        s.stop(keep_workdir=_failed["any"])


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and "e2e" in item.keywords:
        _failed["any"] = True
        stack = item.funcargs.get("stack") if hasattr(item, "funcargs") else None
        if stack is not None:
            report.sections.append(("operator log", stack.operator_log_tail(80)))
            report.sections.append(("test bed logs", stack.cluster.logs(lines=30)))
