"""KWOK's configuration: kwok's own default stages plus the test bed's pod stages.

Stages are kwok's state machine for fake pods. From kwok's defaults (copied out of its module
by install.sh) we keep node-initialize, node-heartbeat-with-lease, pod-ready and pod-delete;
its pod-complete is replaced by ours, which also carries a termination message, and a
label-selected stage makes a pod fail with a chosen exit code and message:

- Job pods succeed; ``testbed.qmodel.dev/termination-message`` (annotation) becomes the
  container's termination message, so a test can fake a quantize Job's result.
- Pods labelled ``testbed.qmodel.dev/fail: "true"`` fail; the annotations
  ``testbed.qmodel.dev/exit-code`` (default 1), ``testbed.qmodel.dev/termination-message`` and
  ``testbed.qmodel.dev/reason`` (default Error; e.g. OOMKilled) set the exit code, message and reason.
- ``testbed.qmodel.dev/run-seconds`` (annotation, e.g. "5s") delays completion or failure,
  so a test can watch the Running phase.
"""

from __future__ import annotations

from pathlib import Path

from testbed import paths

FAIL_LABEL = "testbed.qmodel.dev/fail"
EXIT_CODE_ANNOTATION = "testbed.qmodel.dev/exit-code"
REASON_ANNOTATION = "testbed.qmodel.dev/reason"
MESSAGE_ANNOTATION = "testbed.qmodel.dev/termination-message"
RUN_SECONDS_ANNOTATION = "testbed.qmodel.dev/run-seconds"
KEPT_DEFAULT_STAGES = (
    "node-initialize.yaml",
    "node-heartbeat-with-lease.yaml",
    "pod-ready.yaml",
    "pod-delete.yaml",
)

# Go templates rendered by kwok against the pod; a missing annotation renders nothing.
_TERMINATED = """\
      {{{{ $now := Now }}}}
      {{{{ $ann := or .metadata.annotations dict }}}}
      containerStatuses:
      {{{{ range .spec.containers }}}}
      - image: {{{{ .image | Quote }}}}
        name: {{{{ .name | Quote }}}}
        ready: false
        restartCount: 0
        started: false
        state:
          terminated:
            exitCode: {exit_code}
            reason: {reason}
            {{{{ with index $ann "{message}" }}}}
            message: {{{{ . | Quote }}}}
            {{{{ end }}}}
            startedAt: {{{{ $now | Quote }}}}
            finishedAt: {{{{ $now | Quote }}}}
      {{{{ end }}}}
      phase: {phase}
"""


def _stage(name: str, selector: str, template: str) -> str:
    return f"""\
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: {name}
spec:
  resourceRef:
    apiGroup: v1
    kind: Pod
  selector:
{selector}
  delay:
    durationMilliseconds: 0
    durationFrom:
      expressionFrom: '.metadata.annotations["{RUN_SECONDS_ANNOTATION}"]'
  next:
    statusTemplate: |
{template}"""


_RUNNING = """\
    matchExpressions:
    - key: '.metadata.deletionTimestamp'
      operator: 'DoesNotExist'
    - key: '.status.phase'
      operator: 'In'
      values: ['Running']
"""


def testbed_stages() -> list[str]:
    """Our two pod stages: complete (Job pods not labelled to fail) and fail (labelled pods)."""
    complete = _stage(
        "testbed-pod-complete",
        _RUNNING
        + f"""\
    - key: '.metadata.ownerReferences.[].kind'
      operator: 'In'
      values: ['Job']
    - key: '.metadata.labels["{FAIL_LABEL}"]'
      operator: 'NotIn'
      values: ['true']
""",
        _TERMINATED.format(exit_code=0, reason="Completed", message=MESSAGE_ANNOTATION, phase="Succeeded"),
    )
    exit_code = f'{{{{ or (index $ann "{EXIT_CODE_ANNOTATION}") "1" }}}}'
    reason = f'{{{{ or (index $ann "{REASON_ANNOTATION}") "Error" }}}}'
    fail = _stage(
        "testbed-pod-fail",
        _RUNNING
        + f"""\
    - key: '.metadata.labels["{FAIL_LABEL}"]'
      operator: 'In'
      values: ['true']
""",
        _TERMINATED.format(exit_code=exit_code, reason=reason, message=MESSAGE_ANNOTATION, phase="Failed"),
    )
    return [complete, fail]


def write_config(path: Path, stages_dir: Path | None = None) -> Path:
    """Write kwok's --config: the kept default stages followed by ours, as one YAML stream."""
    stages_dir = stages_dir or paths.kwok_stages_dir()
    docs = [(stages_dir / name).read_text() for name in KEPT_DEFAULT_STAGES]
    path.write_text("\n---\n".join([*docs, *testbed_stages()]))
    return path


def argv(kwok: Path, kubeconfig: Path, config: Path, health_port: int) -> list[str]:
    return [
        str(kwok),
        f"--kubeconfig={kubeconfig}",
        f"--config={config}",
        "--manage-all-nodes=false",
        "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
        "--manage-nodes-with-label-selector=",
        # Fake pod IPs come from a loopback range: nothing listens there, and nothing the
        # test bed runs ever sends traffic off this machine (the network rule).
        "--cidr=127.100.0.0/16",
        "--node-ip=127.100.0.1",
        "--node-lease-duration-seconds=40",
        f"--server-address=127.0.0.1:{health_port}",
    ]
