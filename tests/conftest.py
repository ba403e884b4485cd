"""Shared pytest wiring: markers and skips that depend on the machine."""

from __future__ import annotations

import pytest

# The local Kubernetes test bed's fixtures (k8s_cluster, k8s_api, k8s_namespace): tests/testbed.
pytest_plugins = ["testbed.pytest_plugin"]


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # Never pass by running nothing: pytest already exits 5 when nothing was collected;
    # also fail when everything collected was deselected or skipped.
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or exitstatus != 0:
        return
    passed = len(reporter.stats.get("passed", []))
    if passed == 0:
        session.exitstatus = pytest.ExitCode.NO_TESTS_COLLECTED
