"""Running readiness/liveness/startup probes against a pod that lives on loopback."""

from __future__ import annotations

import ipaddress
import logging
import socket
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass

log = logging.getLogger("testbed.processnode")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # a 3xx answer is a success, as for the kubelet
        return None


_opener = urllib.request.build_opener(_NoRedirect)


def _port(value, container: dict) -> int:
    if isinstance(value, int) or str(value).isdigit():
        return int(value)
    for p in container.get("ports") or []:
        if p.get("name") == value:
            return int(p["containerPort"])
    raise ValueError(f"probe names port {value!r}, which the container does not declare")


def _loopback(host: str) -> str:
    # The network rule: the test bed never sends traffic anywhere but loopback.
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(
            f"probe host {host} is not a loopback address; the process node probes only loopback"
        )
    return host


def run_probe(probe: dict, container: dict, pod_ip: str, pid: int | None, isolation: str) -> bool:
    """One probe attempt: True on success. Errors (refused, timeout, bad spec) are failures."""
    timeout = float(probe.get("timeoutSeconds") or 1)
    try:
        if "httpGet" in probe:
            get = probe["httpGet"]
            host = _loopback(get.get("host") or pod_ip)
            scheme = get.get("scheme", "HTTP").lower()
            url = f"{scheme}://{host}:{_port(get['port'], container)}{get.get('path') or '/'}"
            headers = {h["name"]: h["value"] for h in get.get("httpHeaders") or []}
            try:
                with _opener.open(urllib.request.Request(url, headers=headers), timeout=timeout) as resp:
                    return 200 <= resp.status < 400
            except urllib.error.HTTPError as exc:
                return 300 <= exc.code < 400
        if "tcpSocket" in probe:
            host = _loopback(probe["tcpSocket"].get("host") or pod_ip)
            with socket.create_connection(
                (host, _port(probe["tcpSocket"]["port"], container)), timeout=timeout
            ):
                return True
        if "exec" in probe:
            argv = probe["exec"]["command"]
            if isolation == "mount" and pid:  # run it in the pod's own mount namespace and root
                argv = ["nsenter", "-t", str(pid), "-m", "-r", "-w", *argv]
            return subprocess.run(argv, capture_output=True, timeout=timeout, check=False).returncode == 0
        log.warning("unsupported probe %s: counted as failed", sorted(probe))
        return False
    except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
        log.debug("probe failed: %s", exc)
        return False


@dataclass
class ProbeTracker:
    """Thresholds and timing of one probe of one container run (kubelet semantics, in seconds)."""

    probe: dict
    started: float
    next_at: float = 0.0
    successes: int = 0
    failures: int = 0
    passed: bool = False  # the last verdict: flipped by successThreshold / failureThreshold

    def __post_init__(self) -> None:
        self.next_at = self.started + float(self.probe.get("initialDelaySeconds") or 0)

    def due(self, t: float) -> bool:
        return t >= self.next_at

    def record(self, ok: bool, t: float) -> None:
        self.next_at = t + float(self.probe.get("periodSeconds") or 10)
        if ok:
            self.successes, self.failures = self.successes + 1, 0
            if self.successes >= int(self.probe.get("successThreshold") or 1):
                self.passed = True
        else:
            self.successes, self.failures = 0, self.failures + 1
            if self.failures >= int(self.probe.get("failureThreshold") or 3):
                self.passed = False

    @property
    def failed_out(self) -> bool:
        return self.failures >= int(self.probe.get("failureThreshold") or 3)
