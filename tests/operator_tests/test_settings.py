"""Operator settings come from the environment, once, with clear errors for bad values."""

from __future__ import annotations

import pytest

from qmodel_operator.settings import Settings, SettingsError


def test_defaults_without_environment():
    s = Settings.from_env({"PATH": "/bin", "QMODEL_CACHE": "/tmp/x"})  # others' variables are ignored
    assert s == Settings()
    assert s.namespaces == () and s.metrics_port == 8081 and s.peering == ""


def test_parses_every_kind_of_value():
    s = Settings.from_env(
        {
            "QMODEL_OPERATOR_NAMESPACES": "ml, research,ml",
            "QMODEL_OPERATOR_RUNTIME_IMAGE": "registry.local/qmodel-runtime:1.2",
            "QMODEL_OPERATOR_IMAGE_PULL_POLICY": "always",
            "QMODEL_OPERATOR_JOB_RESOURCES": '{"requests": {"cpu": "8"}}',
            "QMODEL_OPERATOR_LOG_FORMAT": "JSON",
            "QMODEL_OPERATOR_METRICS_PORT": "0",
            "QMODEL_OPERATOR_RESYNC_SECONDS": "30.5",
            "QMODEL_OPERATOR_PEERING": "qmodel",
        }
    )
    assert s.namespaces == ("ml", "research")
    assert s.runtime_image == "registry.local/qmodel-runtime:1.2"
    assert s.image_pull_policy == "Always" and s.log_format == "json"
    assert s.job_resources == {"requests": {"cpu": "8"}}
    assert s.metrics_port == 0 and s.resync_seconds == 30.5 and s.peering == "qmodel"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"QMODEL_OPERATOR_NAMESPACE": "ml"}, "unknown setting.*QMODEL_OPERATOR_NAMESPACE\\b.*known:"),
        ({"QMODEL_OPERATOR_METRICS_PORT": "99999"}, "METRICS_PORT='99999': must be a TCP port"),
        ({"QMODEL_OPERATOR_LOG_FORMAT": "yaml"}, "expected one of plain, json"),
        ({"QMODEL_OPERATOR_JOB_RESOURCES": '{"cpu": "2"}'}, 'expected JSON like {"requests"'),
        ({"QMODEL_OPERATOR_WORKERS": "0"}, "WORKERS='0': must be >= 1"),
    ],
)
def test_bad_values_name_the_variable_and_the_fix(env, message):
    with pytest.raises(SettingsError, match=message):
        Settings.from_env(env)
