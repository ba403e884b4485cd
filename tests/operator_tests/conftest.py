"""Fixtures of the operator tests (helpers live in support.py)."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from operator_tests.support import CRD_PATH


@pytest.fixture(scope="session")
def crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_PATH.read_text())


@pytest.fixture(scope="session")
def crd_schema(crd) -> dict[str, Any]:
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


# --- the test bed (k8s tests) ----------------------------------------------------------------


@pytest.fixture(scope="session")
def qm_crd(k8s_cluster, k8s_api):
    """The QuantizedModel CRD installed in the test bed (the file in crds/, as is)."""
    from operator_tests.k8s_support import install_crd

    install_crd(k8s_api)


@pytest.fixture(scope="session")
def qm_operator(k8s_cluster, qm_crd, tmp_path_factory):
    """One operator process for the session, watching every namespace."""
    from operator_tests.k8s_support import Operator

    operator = Operator(k8s_cluster.kubeconfig, tmp_path_factory.mktemp("qmodel-operator"))
    operator.start()
    try:
        yield operator
    finally:
        operator.stop()


@pytest.fixture
def models(k8s_api, k8s_namespace, qm_crd):
    from operator_tests.k8s_support import Models

    return Models(k8s_api, k8s_namespace)
