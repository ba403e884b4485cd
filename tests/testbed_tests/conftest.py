"""Helpers shared by the test bed's own k8s tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def core(k8s_api):
    from kubernetes import client

    return client.CoreV1Api(k8s_api)


@pytest.fixture(scope="session")
def batch(k8s_api):
    from kubernetes import client

    return client.BatchV1Api(k8s_api)


@pytest.fixture(scope="session")
def apps(k8s_api):
    from kubernetes import client

    return client.AppsV1Api(k8s_api)
