"""Why a model's runtime pods are not ready, read from their status (pure).

A Deployment only counts ready replicas; the reason a pod is not ready lives in the pod: not
scheduled (the scheduler's message), a container waiting (an image that cannot be pulled, a
missing Secret), or a container that keeps exiting. The runtime, given ``--termination-log``,
exits with the reason it refuses to serve (an artifact that fails its manifest's sha256, say),
so the kubelet keeps that reason as the container's last termination message. The reconciler
reads the pods of Deployments that are short of ready replicas, and the Serving condition
carries the first problem found.

A node deleted under a running pod (a cloud instance gone) leaves the pod behind, still Ready
in the API server, until the pod garbage collector removes it (a 40 s quarantine, checked every
20 s). Its Deployment counts it ready the whole time, and its Service sends it traffic. The
reconciler reads the pods once after any GPU node vanishes, and a ready pod whose node is not
among the GPU nodes is ``stranded``: it does not count as serving.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from qmodel_operator import results

# Waiting reasons that only mean "starting": no problem yet.
STARTING = frozenset({"ContainerCreating", "PodInitializing"})


def _ready(status: Mapping[str, Any]) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or ())


def _deleting(pod: Mapping[str, Any]) -> bool:
    return bool((pod.get("metadata") or {}).get("deletionTimestamp"))


def _name(pod: Mapping[str, Any]) -> str:
    return (pod.get("metadata") or {}).get("name", "?")


def _unscheduled(status: Mapping[str, Any]) -> str | None:
    for cond in status.get("conditions") or ():
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            return f"not scheduled: {cond.get('message') or cond.get('reason') or 'no node fits'}"
    return None


def _container(cs: Mapping[str, Any]) -> str | None:
    """A container's problem: its last exit (with the reason it left), else a waiting reason."""
    last = (cs.get("lastState") or {}).get("terminated") or (cs.get("state") or {}).get("terminated")
    restarts = cs.get("restartCount") or 0
    if last and last.get("exitCode") != 0:
        code = last.get("exitCode")
        reason = results.kill_note(code, last.get("reason"))
        reason = reason or results.failure_reason(last.get("message"), code)
        times = f"restarted {restarts} time{'s' if restarts != 1 else ''}, " if restarts else ""
        return f"{times}exited with code {code}: {reason}"
    waiting = (cs.get("state") or {}).get("waiting") or {}
    if waiting.get("reason") and waiting["reason"] not in STARTING:
        message = waiting.get("message")
        return f"{waiting['reason']}: {message}" if message else waiting["reason"]
    return None


def pod_problem(pod: Mapping[str, Any]) -> str | None:
    """Why this pod is not ready, when its status says; None when it is ready or still starting."""
    status = pod.get("status") or {}
    if _ready(status) or _deleting(pod):
        return None
    found = _unscheduled(status)
    for cs in status.get("containerStatuses") or ():
        found = found or _container(cs)
    if found is None:
        return None
    return f"pod {_name(pod)} {found}"


def pods_problem(pods: Iterable[Mapping[str, Any]]) -> str | None:
    """The first pod problem (by pod name), and how many other pods have one."""
    named = sorted(pods, key=lambda p: (p.get("metadata") or {}).get("name", ""))
    problems = [p for p in (pod_problem(pod) for pod in named) if p]
    if not problems:
        return None
    more = f" (and {len(problems) - 1} more pods)" if len(problems) > 1 else ""
    return problems[0] + more


def stranded(pods: Iterable[Mapping[str, Any]], nodes: Iterable[str]) -> list[Mapping[str, Any]]:
    """The pods that count as ready though their node is not among ``nodes`` (the GPU nodes):
    their node was deleted under them (see the module docstring). Sorted by name."""
    present = frozenset(nodes)
    return sorted(
        (
            pod
            for pod in pods
            if _ready(pod.get("status") or {})
            and not _deleting(pod)
            and (node := (pod.get("spec") or {}).get("nodeName"))
            and node not in present
        ),
        key=_name,
    )


def stranded_problem(pods: Iterable[Mapping[str, Any]]) -> str | None:
    """What to say of stranded pods: the first, and how many more."""
    found = list(pods)
    if not found:
        return None
    first = found[0]
    node = (first.get("spec") or {}).get("nodeName")
    more = f" (and {len(found) - 1} more pods)" if len(found) > 1 else ""
    return (
        f"pod {_name(first)} is on node {node}, which is no longer a GPU node of the cluster; it is "
        f"not serving, and Kubernetes deletes it when its pod garbage collector gives up on the "
        f"node{more}"
    )
