"""``make demo``: the whole qmodel lifecycle on the local test bed, shown as it happens.

    PYTHONPATH=tests python -m e2e.demo          # up: start (or reuse) the stack, run the story
    PYTHONPATH=tests python -m e2e.demo status   # what runs
    PYTHONPATH=tests python -m e2e.demo down     # stop exactly what `up` started

The story: a real Kubernetes control plane with one CPU node posing as a GPU node; a local S3
server holding the bundled SmolLM2-135M; `helm install` of charts/qmodel (the operator runs as a
pod with the chart's ServiceAccount token); `kubectl apply` of examples/smollm2-135m.yaml, the
quantize Job and the runtime pod running for real; a chat completion through the `openai` client;
then examples/smollm2-135m-strict.yaml, rejected by the perplexity gate.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

from e2e.stack import EXAMPLES, Stack, StackConfig
from e2e.watch import Timeline, follow

from testbed import paths

MAIN, STRICT = "smollm2-135m", "smollm2-135m-strict"
QUESTION = "What is the capital of France? Answer in one sentence."


def run_dir() -> Path:
    return paths.cache_root() / "run" / "demo"


def say(text: str = "") -> None:
    print(text, flush=True)


def step(title: str) -> None:
    say(f"\n=== {title}")


def chat(stack: Stack, model: str, question: str) -> tuple[str, float, str]:
    """One chat completion from the served model with the openai client -> (answer, seconds, pod IP)."""
    import openai

    pod = stack.server_pod(model)
    if pod is None:
        raise RuntimeError(f"no ready runtime pod for {model}")
    ip = pod["status"]["podIP"]
    # The pod IP, never the Service's ClusterIP: the test bed has no kube-proxy.
    client = openai.OpenAI(base_url=f"http://{ip}:8000/v1", api_key="unused", max_retries=0, timeout=300)
    t0 = time.monotonic()
    answer = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=48, temperature=0
    )
    return answer.choices[0].message.content or "", time.monotonic() - t0, ip


def bring_up() -> Stack:
    stack = Stack.attach(run_dir())
    if stack is not None and stack.alive():
        say(f"reusing the demo's test bed in {run_dir()} (`make demo-down` stops it)")
        return stack
    if stack is not None:
        say("a previous demo's test bed is partly gone; stopping what is left of it")
        stack.stop()
    shutil.rmtree(run_dir(), ignore_errors=True)
    paths.ensure_installed()
    say("starting a Kubernetes control plane, one process node posing as a 2-GPU node, an S3 server ...")
    stack = Stack.start(StackConfig(workdir=run_dir(), die_with_parent=False))
    say(f"  up in {stack.timings['cluster']:.0f}s; kubeconfig {stack.cluster.kubeconfig}")
    return stack


def upload(stack: Stack) -> None:
    from qmodel_runtime import assets

    folder = Path(assets.model_path())
    step(f"upload the bundled SmolLM2-135M ({folder}) to s3://models/smollm2-135m/")
    sent = stack.upload_model(folder)
    say(f"  {sent / 2**20:.0f} MiB sent in {stack.timings['upload']:.0f}s" if sent else "  already there")


def install(stack: Stack) -> None:
    cfg = stack.config
    values = "-f examples/testbed-values.yaml"
    step(f"helm upgrade --install {cfg.release} charts/qmodel -n {cfg.operator_namespace} {values}")
    stack.install_chart()
    pod = stack.operator_pod()
    say(
        f"  operator pod {pod['metadata']['name']} ready on node {pod['spec']['nodeName']} in "
        f"{stack.timings['helm']:.0f}s, ServiceAccount {pod['spec']['serviceAccountName']} "
        f"(watching namespace {cfg.namespace})"
    )


def lifecycle(stack: Stack, name: str, timeout: float) -> Timeline:
    step(f"kubectl apply -n {stack.config.namespace} -f examples/{name}.yaml")
    stack.apply(EXAMPLES / f"{name}.yaml")
    return follow(stack, name, timeout, say)


def show_timeline(timeline: Timeline) -> None:
    *steps, (last, _) = timeline.durations()
    if not steps:
        say(f"  {timeline.model}: {last} already (applied by an earlier `make demo`)")
        return
    spent = ", ".join(f"{phase} {sec:.0f}s" for phase, sec in steps)
    say(f"  {timeline.model}: {spent}; {last} {timeline.phases[last]:.0f}s after kubectl apply")


def up(_: argparse.Namespace) -> int:
    t0 = time.monotonic()
    stack = bring_up()
    upload(stack)
    install(stack)
    main = lifecycle(stack, MAIN, timeout=3600)
    if main.final["status"]["phase"] != "Ready":
        say(f"{MAIN} ended {main.final['status']['phase']}: see `kubectl describe qm {MAIN} -n demo`")
        return 1
    step(f"chat completion from {MAIN} with the openai client")
    answer, seconds, ip = chat(stack, MAIN, QUESTION)
    say(f"  POST http://{ip}:8000/v1/chat/completions  ({seconds:.1f}s)")
    say(f"  user: {QUESTION}\n  {MAIN}: {answer.strip()}")
    strict = lifecycle(stack, STRICT, timeout=1800)
    deployments = stack.kubectl("get", "deployments", "-n", stack.config.namespace, "-o", "name")
    say(f"  Deployments in {stack.config.namespace}: {' '.join(deployments.split()) or '(none)'}")
    step(f"kubectl get qm -n {stack.config.namespace} -o wide")
    say(stack.kubectl("get", "qm", "-n", stack.config.namespace, "-o", "wide").rstrip())
    step("timings")
    show_timeline(main)
    show_timeline(strict)
    say(f"  whole demo: {time.monotonic() - t0:.0f}s")
    step("explore, then tear down")
    say(f"  export KUBECONFIG={stack.cluster.kubeconfig} PATH={paths.bin_dir()}:$PATH   # kubectl, helm")
    say(f"  kubectl describe qm {MAIN} -n {stack.config.namespace}")
    say(f"  curl http://{ip}:8000/v1/models      # the runtime pod; no kube-proxy here, so not the Service")
    say(
        f"  make demo-down      # stops the control plane, the node, the S3 server (logs stay in {run_dir()})"
    )
    return 0


def status(_: argparse.Namespace) -> int:
    stack = Stack.attach(run_dir())
    if stack is None:
        say("the demo is not up (make demo)")
        return 1
    for proc in [*stack.cluster.procs.values(), stack.s3]:
        say(f"{proc.name:24s} pid {proc.pid:<8d} {'running' if proc.alive() else 'STOPPED'}")
    say(f"kubeconfig: {stack.cluster.kubeconfig}")
    return 0 if stack.alive() else 1


def down(_: argparse.Namespace) -> int:
    stack = Stack.attach(run_dir())
    if stack is None:
        say("the demo is not up")
        return 0
    stack.stop(keep_workdir=True)
    shutil.rmtree(run_dir() / "s3", ignore_errors=True)  # the model and artifacts: 0.7 GB
    say(f"demo stopped (logs kept in {stack.cluster.log_dir})")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m e2e.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", nargs="?", default="up", choices=("up", "status", "down"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    return {"up": up, "status": status, "down": down}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
