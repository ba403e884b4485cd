"""Pure builders for the pod status the process node reports (what the kubelet would write)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class ContainerRun:
    """What the node knows about one container: its state as the kubelet would report it."""

    name: str
    image: str = ""
    state: str = "waiting"  # waiting | running | terminated
    reason: str = "ContainerCreating"
    message: str = ""
    started_at: str = ""
    finished_at: str = ""
    exit_code: int | None = None
    ready: bool = False
    restart_count: int = 0
    last_terminated: dict | None = None

    def terminated(self) -> dict:
        out = {
            "exitCode": self.exit_code,
            "reason": self.reason,
            "startedAt": self.started_at or None,
            "finishedAt": self.finished_at,
        }
        if self.message:
            out["message"] = self.message
        return out

    def to_status(self) -> dict:
        if self.state == "running":
            state = {"running": {"startedAt": self.started_at}}
        elif self.state == "terminated":
            state = {"terminated": self.terminated()}
        else:
            state = {
                "waiting": {"reason": self.reason, **({"message": self.message} if self.message else {})}
            }
        out = {
            "name": self.name,
            "image": self.image,
            "imageID": "",
            "ready": self.ready,
            "restartCount": self.restart_count,
            "started": self.state == "running",
            "state": state,
        }
        if self.last_terminated:
            out["lastState"] = {"terminated": self.last_terminated}
        return out


def will_restart(policy: str, run: ContainerRun) -> bool:
    return policy == "Always" or (policy == "OnFailure" and run.exit_code not in (0, None))


def phase(policy: str, runs: list[ContainerRun], initialized: bool) -> str:
    """Kubernetes' pod phase from its containers' states and the restart policy."""
    if not initialized or any(r.state == "waiting" and r.restart_count == 0 for r in runs):
        return "Pending"
    done = [r for r in runs if r.state == "terminated" and not will_restart(policy, r)]
    if len(done) < len(runs):
        return "Running"
    return "Succeeded" if all(r.exit_code == 0 for r in done) else "Failed"


def _condition(previous: dict, ctype: str, ok: bool, reason: str = "") -> dict:
    status = "True" if ok else "False"
    old = previous.get(ctype) or {}
    cond = {
        "type": ctype,
        "status": status,
        "lastTransitionTime": old["lastTransitionTime"] if old.get("status") == status else now(),
    }
    if reason and not ok:
        cond["reason"] = reason
    return cond


def pod_status(
    pod: dict,
    init_runs: list[ContainerRun],
    runs: list[ContainerRun],
    *,
    initialized: bool,
    pod_ip: str,
    host_ip: str,
    start_time: str,
) -> dict:
    """The status subresource body: phase, conditions, IPs and container statuses."""
    policy = pod["spec"].get("restartPolicy", "Always")
    ph = phase(policy, runs, initialized)
    previous = {c["type"]: c for c in (pod.get("status") or {}).get("conditions") or []}
    ready = ph == "Running" and all(r.ready for r in runs)
    not_ready = "PodCompleted" if ph in ("Succeeded", "Failed") else "ContainersNotReady"
    conditions = [
        _condition(previous, "PodReadyToStartContainers", True),
        _condition(previous, "Initialized", initialized, "ContainersNotInitialized"),
        _condition(previous, "ContainersReady", ready, not_ready),
        _condition(previous, "Ready", ready, not_ready),
    ]
    status = {
        "phase": ph,
        "conditions": conditions,
        "hostIP": host_ip,
        "hostIPs": [{"ip": host_ip}],
        "startTime": start_time,
        "containerStatuses": [r.to_status() for r in runs],
    }
    if pod_ip:
        status.update(podIP=pod_ip, podIPs=[{"ip": pod_ip}])
    if init_runs:
        status["initContainerStatuses"] = [r.to_status() for r in init_runs]
    return status
