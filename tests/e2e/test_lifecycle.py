"""What `make demo` does, asserted: the chart installed with `helm install`, the operator running as
a pod with the chart's ServiceAccount token, SmolLM2-135M quantized, gated, stored in S3, served
and answering through the `openai` client; the strict variant rejected with nothing deployed.

One stack and one pair of models for the module (the quantize Jobs are the expensive part);
the tests then read what happened. The chart upgrade/uninstall test runs last.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time

import pytest
import yaml
from e2e.demo import MAIN, QUESTION, STRICT, chat
from e2e.stack import CHART, EXAMPLES, Stack
from e2e.watch import follow

from qmodel_runtime import storage
from testbed.procs import wait_until

pytestmark = pytest.mark.e2e
# CPU quantization under a shared 2-core machine's load: measured 5-9 minutes for the pair.
MODEL_TIMEOUT = 2400


@pytest.fixture(scope="module")
def models(stack: Stack) -> dict:
    """Both examples applied at once (the node has two "GPUs"), followed to their end."""
    t0 = time.monotonic()
    stack.apply(EXAMPLES / f"{MAIN}.yaml")
    stack.apply(EXAMPLES / f"{STRICT}.yaml")
    strict = follow(stack, STRICT, MODEL_TIMEOUT)
    main = follow(stack, MAIN, MODEL_TIMEOUT)
    print(f"\ne2e: both models done {time.monotonic() - t0:.0f}s after apply; stack {stack.timings}")
    return {MAIN: main.final, STRICT: strict.final}


def condition(body: dict, type_: str) -> dict:
    return next(c for c in body["status"]["conditions"] if c["type"] == type_)


def test_operator_is_the_charts_pod_on_the_test_bed(stack: Stack):
    pod = stack.operator_pod()
    assert pod["spec"]["serviceAccountName"] == stack.fullname
    assert pod["spec"]["nodeName"] == stack.config.node.name
    # The API server injected the projected token (TokenRequest); the process node mounted it at
    # /var/run/secrets/kubernetes.io/serviceaccount, where the in-cluster client reads it.
    mounts = pod["spec"]["containers"][0]["volumeMounts"]
    assert any(m["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount" for m in mounts)
    assert "KUBECONFIG" not in {e["name"] for e in pod["spec"]["containers"][0]["env"]}


def test_model_becomes_ready_with_both_perplexities_and_the_artifact_digest(models):
    body = models[MAIN]
    status = body["status"]
    assert status["phase"] == "Ready", status
    assert condition(body, "Ready")["status"] == "True"
    v = status["validation"]
    assert 1.0 < v["baselinePerplexity"] < v["quantizedPerplexity"] < 100.0
    assert v["increasePercent"] == pytest.approx(
        100 * (v["quantizedPerplexity"] / v["baselinePerplexity"] - 1), abs=0.01
    )
    assert (
        v["passed"] is True
        and v["increasePercent"] <= body["spec"]["validation"]["maxPerplexityIncreasePercent"]
    )
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", status["artifact"]["manifestDigest"])
    assert status["artifact"]["uri"] == f"s3://artifacts/qmodel/{MAIN}/{status['revision']}/"
    assert status["serving"]["revision"] == status["revision"] and status["serving"]["readyReplicas"] == 1


def test_artifact_in_s3_verifies_against_the_status(stack: Stack, models, tmp_path):
    status = models[MAIN]["status"]
    settings = storage.StorageSettings.from_env(stack.s3_env())
    # Every file is checked against the manifest while it streams; a mismatch raises.
    result = storage.download(status["artifact"]["uri"], tmp_path, settings)
    assert result.manifest_digest == status["artifact"]["manifestDigest"]
    manifest_bytes = (tmp_path / "qmodel-manifest.json").read_bytes()
    assert "sha256:" + hashlib.sha256(manifest_bytes).hexdigest() == status["artifact"]["manifestDigest"]
    assert json.loads(manifest_bytes) == result.manifest
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert (config["quant_method"], config["bits"], config["group_size"]) == ("gptq", 4, 32)


def test_served_model_answers_a_chat_completion(stack: Stack, models):
    answer, _, _ = chat(stack, MAIN, QUESTION)
    assert answer.strip() and any(ch.isalpha() for ch in answer), repr(answer)


def test_strict_variant_is_rejected_and_nothing_is_deployed(stack: Stack, models):
    body = models[STRICT]
    assert body["status"]["phase"] == "Rejected"
    validated = condition(body, "Validated")
    assert validated["status"] == "False"
    assert "exceeds the 2% limit of spec.validation.maxPerplexityIncreasePercent" in validated["message"]
    assert body["status"]["validation"]["increasePercent"] > 2.0
    ns, selector = stack.config.namespace, f"qmodel.dev/model={STRICT}"
    assert stack.kubectl("get", "deployments,services", "-n", ns, "-l", selector, "-o", "name").strip() == ""
    assert stack.kubectl("get", "jobs", "-n", ns, "-l", selector, "-o", "name").strip()  # it did quantize


def test_service_account_has_no_more_than_it_needs(stack: Stack):
    cfg = stack.config
    sa = f"system:serviceaccount:{cfg.operator_namespace}:{stack.fullname}"

    def can(*args: str) -> bool:
        return stack.kubectl("auth", "can-i", *args, f"--as={sa}", check=False).strip() == "yes"

    assert can("create", "jobs", "-n", cfg.namespace)
    assert can("patch", "quantizedmodels/status", "-n", cfg.namespace)
    assert can("watch", "nodes")
    assert not can("get", "secrets", "-n", cfg.namespace)
    assert not can("create", "jobs", "-n", "default")  # not a watched namespace
    assert not can("delete", "pods", "-n", cfg.namespace)
    assert not can("update", "quantizedmodels", "-n", cfg.namespace)
    assert not can("patch", "nodes")


def test_operator_log_has_no_permission_errors(stack: Stack, models):
    log = stack.operator_log()
    assert "forbidden" not in log.lower() and "Traceback" not in log, log[-3000:]


def test_operator_acts_with_the_charts_service_account_token(stack: Stack, models):
    """Take the operator's RoleBinding away: its next status write is refused *as that ServiceAccount*;
    give it back: the write goes through. So the operator's identity is the chart's token."""
    cfg = stack.config
    ns, binding = cfg.namespace, stack.fullname
    saved = json.loads(stack.kubectl("get", "rolebinding", binding, "-n", ns, "-o", "json"))
    stack.kubectl("delete", "rolebinding", binding, "-n", ns)
    # A threshold change is re-gated without a new Job: the operator must write the status.
    patch = json.dumps({"spec": {"validation": {"maxPerplexityIncreasePercent": 3.0}}})
    stack.kubectl("patch", "qm", STRICT, "-n", ns, "--type=merge", "-p", patch)
    refused = f'User "system:serviceaccount:{cfg.operator_namespace}:{binding}" cannot patch resource'
    wait_until(lambda: refused in stack.operator_log(), "the operator's status write to be refused", 60)
    for key in ("resourceVersion", "uid", "creationTimestamp", "managedFields"):
        saved["metadata"].pop(key, None)
    _create(stack, saved)

    def regated() -> bool:
        return stack.model(STRICT)["status"]["validation"].get("maxPerplexityIncreasePercent") == 3.0

    wait_until(regated, "the operator to write the status once the RoleBinding is back", 120)


def _create(stack: Stack, manifest: dict) -> None:
    path = stack.config.workdir / "restore.yaml"
    path.write_text(yaml.safe_dump(manifest))
    stack.kubectl("create", "-f", str(path))


def test_helm_upgrade_upgrades_the_crd_and_uninstall_keeps_it(stack: Stack, models, tmp_path):
    """The CRD is a template: a chart whose CRD changed upgrades it (Helm never upgrades crds/);
    `helm uninstall` keeps it (helm.sh/resource-policy: keep), and with it every model."""
    chart = tmp_path / "qmodel"
    shutil.copytree(CHART, chart)
    crd_file = chart / "files" / "quantizedmodel.yaml"
    crd = yaml.safe_load(crd_file.read_text())
    marker = "(upgraded by the e2e test)"
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    schema["description"] += " " + marker
    crd_file.write_text(yaml.safe_dump(crd))
    stack.install_chart(chart=chart)

    def live_description() -> str:
        live = json.loads(stack.kubectl("get", "crd", "quantizedmodels.qmodel.dev", "-o", "json"))
        return live["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["description"]

    assert live_description().endswith(marker)
    stack.helm("uninstall", stack.config.release, "--namespace", stack.config.operator_namespace, "--wait")
    assert live_description().endswith(marker)  # still there
    names = stack.kubectl("get", "qm", "-n", stack.config.namespace, "-o", "name").split()
    assert sorted(names) == sorted(f"quantizedmodel.qmodel.dev/{n}" for n in (MAIN, STRICT))
