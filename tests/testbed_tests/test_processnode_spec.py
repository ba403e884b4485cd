"""The process node's pure parts: env, $(VAR) expansion, volumes, path rewriting, pod phase."""

from __future__ import annotations

import base64

import pytest

from testbed.processnode import spec
from testbed.processnode.status import ContainerRun, phase, pod_status

POD = {
    "metadata": {
        "name": "p",
        "namespace": "ns",
        "uid": "u-1",
        "labels": {"app": "x"},
        "annotations": {"a": "b"},
    },
    "spec": {"nodeName": "process-0", "serviceAccountName": "default", "restartPolicy": "Never"},
    "status": {"podIP": "127.201.0.2", "podIPs": [{"ip": "127.201.0.2"}], "hostIP": "127.0.0.1"},
}
OBJECTS = {
    ("ConfigMap", "cm"): {"data": {"MODE": "fast", "file.txt": "hello"}},
    ("Secret", "sec"): {"data": {"TOKEN": base64.b64encode(b"s3cr3t").decode()}},
}


def lookup(kind: str, name: str):
    return OBJECTS.get((kind, name))


def test_env_resolves_every_source_in_order():
    container = {
        "name": "c",
        "resources": {"limits": {"cpu": "1500m", "memory": "1Gi"}},
        "envFrom": [{"configMapRef": {"name": "cm"}, "prefix": "CM_"}],
        "env": [
            {"name": "PLAIN", "value": "v"},
            {"name": "EXPANDED", "value": "$(PLAIN)-$(CM_MODE)-$(UNDEFINED)-$$(PLAIN)"},
            {"name": "SECRET", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "TOKEN"}}},
            {"name": "FROM_CM", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "MODE"}}},
            {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
            {"name": "CPU", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
            {
                "name": "MEM_MI",
                "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}},
            },
        ],
    }
    env = spec.resolve_env(POD, container, lookup, {"PATH": "/venv/bin"})
    assert env["PATH"] == "/venv/bin"
    assert env["CM_MODE"] == "fast" and env["CM_file.txt"] == "hello"
    assert env["EXPANDED"] == "v-fast-$(UNDEFINED)-$(PLAIN)"
    assert env["SECRET"] == "s3cr3t"
    assert env["FROM_CM"] == "fast"
    assert env["IP"] == "127.201.0.2"
    assert env["APP"] == "x"
    assert env["CPU"] == "2"  # 1.5 cores rounded up, as the kubelet does
    assert env["MEM_MI"] == "1024"


def test_missing_references_raise_config_errors_unless_optional():
    missing = {
        "name": "c",
        "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "k"}}}],
    }
    with pytest.raises(spec.ConfigError, match='secret "nope" not found'):
        spec.resolve_env(POD, missing, lookup, {})
    bad_key = {
        "name": "c",
        "env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "k"}}}],
    }
    with pytest.raises(spec.ConfigError, match="couldn't find key k"):
        spec.resolve_env(POD, bad_key, lookup, {})
    optional = {
        "name": "c",
        "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "k", "optional": True}}}],
    }
    assert "X" not in spec.resolve_env(POD, optional, lookup, {})


def test_command_is_required_because_images_are_ignored():
    assert spec.command_line({"name": "c", "command": ["python"], "args": ["-c", "$(A)"]}, {"A": "1"}) == [
        "python",
        "-c",
        "1",
    ]
    with pytest.raises(spec.ConfigError, match="has no command"):
        spec.command_line({"name": "c", "args": ["x"]}, {})


def test_volume_files_and_mounts():
    token = lambda src: "tok-" + src.get("audience", "")  # noqa: E731 - the TokenRequest stand-in
    cm = {"name": "v", "configMap": {"name": "cm", "items": [{"key": "file.txt", "path": "sub/f.txt"}]}}
    assert spec.volume_files(POD, cm, lookup, token) == {"sub/f.txt": b"hello"}
    sec = {"name": "v", "secret": {"secretName": "sec"}}
    assert spec.volume_files(POD, sec, lookup, token) == {"TOKEN": b"s3cr3t"}
    projected = {
        "name": "v",
        "projected": {
            "sources": [
                {"serviceAccountToken": {"path": "token", "audience": "api"}},
                {
                    "downwardAPI": {
                        "items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]
                    }
                },
            ]
        },
    }
    assert spec.volume_files(POD, projected, lookup, token) == {"token": b"tok-api", "namespace": b"ns"}
    container = {
        "name": "c",
        "volumeMounts": [{"name": "v", "mountPath": "/data", "subPath": "x", "readOnly": True}],
    }
    assert spec.mounts(container, {"v": "/host/v"}) == [spec.Mount("/host/v/x", "/data", True)]
    with pytest.raises(spec.ConfigError, match="names no volume"):
        spec.mounts(container, {})


def test_rewrite_moves_paths_under_mounts_only():
    binds = [spec.Mount("/h/data", "/data"), spec.Mount("/h/deep", "/data/deep")]
    assert spec.rewrite("/data/x.json", binds) == "/h/data/x.json"
    assert spec.rewrite("/data/deep/y", binds) == "/h/deep/y"  # the longest mount path wins
    assert spec.rewrite("/data", binds) == "/h/data"
    assert spec.rewrite("/database", binds) == "/database"
    assert spec.rewrite("--flag", binds) == "--flag"


def run(state: str, code: int | None = None, restarts: int = 0) -> ContainerRun:
    return ContainerRun("c", state=state, exit_code=code, restart_count=restarts)


@pytest.mark.parametrize(
    ("policy", "runs", "expected"),
    [
        ("Never", [run("waiting")], "Pending"),
        ("Never", [run("running")], "Running"),
        ("Never", [run("terminated", 0)], "Succeeded"),
        ("Never", [run("terminated", 1)], "Failed"),
        ("Never", [run("terminated", 0), run("running")], "Running"),
        ("Never", [run("terminated", 0), run("terminated", 2)], "Failed"),
        ("OnFailure", [run("terminated", 1)], "Running"),  # it will be restarted
        ("OnFailure", [run("terminated", 0)], "Succeeded"),
        ("Always", [run("terminated", 0)], "Running"),
        ("Always", [run("waiting", restarts=3)], "Running"),  # crash-looping, not Pending
    ],
)
def test_phase_follows_kubernetes_rules(policy, runs, expected):
    assert phase(policy, runs, initialized=True) == expected


def test_pod_status_reports_ip_readiness_and_termination():
    done = ContainerRun(
        "c", state="terminated", exit_code=3, reason="Error", message="bad bits", finished_at="t"
    )
    status = pod_status(
        POD, [], [done], initialized=True, pod_ip="127.201.0.9", host_ip="127.0.0.1", start_time="t0"
    )
    assert status["phase"] == "Failed"
    assert status["podIP"] == "127.201.0.9"
    term = status["containerStatuses"][0]["state"]["terminated"]
    assert (term["exitCode"], term["reason"], term["message"]) == (3, "Error", "bad bits")
    ready = {c["type"]: c["status"] for c in status["conditions"]}
    assert ready["Ready"] == "False" and ready["Initialized"] == "True"
    up = ContainerRun("c", state="running", ready=True, started_at="t1")
    status = pod_status(
        POD, [], [up], initialized=True, pod_ip="127.201.0.9", host_ip="127.0.0.1", start_time="t0"
    )
    assert {c["type"]: c["status"] for c in status["conditions"]}["Ready"] == "True"


def test_image_folders_a_volume_would_hide_are_bound_back_on_top():
    # The charts mount an emptyDir at /tmp; a checkout under /tmp holds the "image" (venv, sources).
    binds = [spec.Mount("/node/pods/a/tmp", "/tmp/"), spec.Mount("/node/pods/a/data", "/data")]
    image = ["/tmp/ci/.venv", "/tmp/ci", "/work/other", "/tmpfoo/.venv"]
    assert spec.image_binds(binds, image) == [  # outermost first
        spec.Mount("/tmp/ci", "/tmp/ci", True),
        spec.Mount("/tmp/ci/.venv", "/tmp/ci/.venv", True),
    ]
    assert spec.image_binds(binds, ["/data"]) == [spec.Mount("/data", "/data", True)]
    assert spec.image_binds([], image) == []
    # Without mount namespaces the rewrite leaves the image's paths where they are.
    assert spec.rewrite("/tmp/ci/.venv/bin", binds + spec.image_binds(binds, image)) == "/tmp/ci/.venv/bin"
    assert spec.rewrite("/tmp/x", binds + spec.image_binds(binds, image)) == "/node/pods/a/tmp/x"
