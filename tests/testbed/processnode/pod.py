"""One pod on the process node: volumes, processes, probes, restarts, status, deletion."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from testbed.processnode import spec
from testbed.processnode.config import ProcessNodeConfig
from testbed.processnode.probes import ProbeTracker, run_probe
from testbed.processnode.status import ContainerRun, now, pod_status, will_restart

log = logging.getLogger("testbed.processnode")
SANDBOX = Path(__file__).with_name("sandbox.py")
TERMINATION_MESSAGE_LIMIT = 4096  # bytes, as the kubelet caps it
POLL = 0.2  # seconds between process checks: status lags a process exit by at most this
BACKOFF_START, BACKOFF_MAX = 1.0, 30.0  # restart delay (the kubelet's 10 s..5 min, shortened for tests)


@dataclass(frozen=True)
class NodeContext:
    """What every pod of a node shares."""

    cfg: ProcessNodeConfig
    core: object  # kubernetes.client.CoreV1Api
    workdir: Path
    isolation: str  # "mount" | "none", resolved
    api_port: int  # the API server's port: pods see it as the in-cluster service
    host_ip: str = "127.0.0.1"


@dataclass
class Proc:
    run: ContainerRun
    container: dict
    popen: subprocess.Popen | None = None
    term_file: Path | None = None
    log_file: Path | None = None
    restart_at: float = 0.0
    probes: dict[str, ProbeTracker] = field(default_factory=dict)


class PodWorker(threading.Thread):
    def __init__(self, ctx: NodeContext, pod: dict, pod_ip: str):
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.ctx, self.pod, self.pod_ip = ctx, pod, pod_ip
        self.deleted, self.shutdown = threading.Event(), threading.Event()
        self.dir = ctx.workdir / f"{meta['namespace']}_{meta['name']}_{meta['uid'][:8]}"
        self.start_time = now()
        self.pushed: dict = {}
        self.procs: list[Proc] = []

    # ---- called from the agent's watch thread
    def update(self, pod: dict) -> None:
        self.pod = pod
        if pod["metadata"].get("deletionTimestamp"):
            self.deleted.set()

    def run(self) -> None:
        try:
            if (self.pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed"):
                self._live()
            while not (self.deleted.is_set() or self.shutdown.is_set()):
                self.deleted.wait(1.0)
        except Exception:  # one odd pod must never take the node down
            log.exception("pod %s: unexpected error", self.name)
        finally:
            self._finish()

    # ---- the pod's life
    def _live(self) -> None:
        volumes = self._retry_config(self._volumes)
        if volumes is None:
            return
        policy = self.pod["spec"].get("restartPolicy", "Always")
        inits = [
            Proc(ContainerRun(c["name"], c.get("image", "")), c)
            for c in self.pod["spec"].get("initContainers") or []
        ]
        mains = [Proc(ContainerRun(c["name"], c.get("image", "")), c) for c in self.pod["spec"]["containers"]]
        self._push(inits, mains, initialized=not inits)
        for init in inits:
            if not self._run_init(init, inits, mains, volumes, policy):
                return
        for p in mains:
            self._start(p, volumes)
        self._push(inits, mains, initialized=True)
        while not (self.deleted.is_set() or self.shutdown.is_set()):
            t = time.monotonic()
            for p in mains:
                self._tick(p, volumes, policy, t)
            status = self._push(inits, mains, initialized=True)
            if status.get("phase") in ("Succeeded", "Failed"):
                return
            self.deleted.wait(POLL)

    def _run_init(self, p: Proc, inits: list[Proc], mains: list[Proc], volumes: dict, policy: str) -> bool:
        while not (self.deleted.is_set() or self.shutdown.is_set()):
            if p.popen is None and time.monotonic() >= p.restart_at:
                self._start(p, volumes)
                self._push(inits, mains, initialized=False)
            if p.popen is not None and p.popen.poll() is not None:
                self._exited(p)
                if p.run.exit_code == 0:
                    return True
                if policy == "Never":  # the pod fails; main containers never start
                    for m in mains:
                        m.run.reason = "PodInitializing"
                    self._push(inits, mains, initialized=False, force_phase="Failed")
                    return False
                self._schedule_restart(p)
                self._push(inits, mains, initialized=False)
            self.deleted.wait(POLL)
        return False

    def _tick(self, p: Proc, volumes: dict, policy: str, t: float) -> None:
        if p.popen is None:
            if p.run.state == "waiting" and t >= p.restart_at:
                self._start(p, volumes)
            return
        if p.popen.poll() is not None:
            self._exited(p)
            if will_restart(policy, p.run):
                self._schedule_restart(p)
            return
        self._probe(p, t)

    def _probe(self, p: Proc, t: float) -> None:
        startup = p.probes.get("startupProbe")
        for kind, tracker in p.probes.items():
            if kind != "startupProbe" and startup and not startup.passed:
                continue
            if not tracker.due(t) or (kind == "startupProbe" and tracker.passed):
                continue
            tracker.record(
                run_probe(tracker.probe, p.container, self.pod_ip, p.popen.pid, self.ctx.isolation), t
            )
            if kind != "readinessProbe" and tracker.failed_out:  # liveness/startup: kill, restart per policy
                log.info("pod %s container %s failed its %s; killing it", self.name, p.run.name, kind)
                self._kill(p, grace=float(self.pod["spec"].get("terminationGracePeriodSeconds") or 30))
                return
        ready = p.probes.get("readinessProbe")
        p.run.ready = (ready.passed if ready else True) and (startup.passed if startup else True)

    # ---- processes
    def _start(self, p: Proc, volumes: dict[str, str]) -> None:
        c, run = p.container, p.run
        try:
            env = spec.resolve_env(self._downward_pod(), c, self._lookup, self._image_env())
            argv = spec.command_line(c, env)
            binds = spec.mounts(c, volumes)
        except spec.ConfigError as exc:
            run.state, run.reason, run.message = "waiting", "CreateContainerConfigError", str(exc)
            p.restart_at = time.monotonic() + 2.0
            return
        p.term_file = self.dir / f"termination-{c['name']}"
        p.term_file.write_bytes(b"")
        p.log_file = self.dir / f"{c['name']}.log"
        binds.append(spec.Mount(str(p.term_file), c.get("terminationMessagePath") or "/dev/termination-log"))
        binds += spec.image_binds(binds, self.ctx.cfg.image_dirs)
        cwd = c.get("workingDir") or "/"
        if self.ctx.isolation == "none":
            argv = [spec.rewrite(a, binds) for a in argv]
            env = {k: spec.rewrite(v, binds) for k, v in env.items()}
            cwd = spec.rewrite(cwd, binds) if c.get("workingDir") else str(self.dir)
        plan = {
            "argv": argv,
            "env": env,
            "cwd": cwd,
            "isolation": self.ctx.isolation,
            "binds": [[b.source, b.target, b.read_only] for b in binds],
            **self._fs_dirs(run),
        }
        plan_file = self.dir / f"plan-{c['name']}.json"
        plan_file.write_text(json.dumps(plan))
        with open(p.log_file, "ab") as out:
            p.popen = subprocess.Popen(
                [sys.executable, str(SANDBOX), str(plan_file)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        run.state, run.reason, run.message, run.started_at = "running", "", "", now()
        run.exit_code, run.ready = None, False
        t = time.monotonic()
        p.probes = {
            k: ProbeTracker(c[k], t) for k in ("startupProbe", "readinessProbe", "livenessProbe") if c.get(k)
        }
        if not p.probes:
            run.ready = True
        log.info("pod %s container %s started (pid %d): %s", self.name, c["name"], p.popen.pid, argv)

    def _fs_dirs(self, run: ContainerRun) -> dict:
        """Overlay dirs for one container run (each run starts from the image, as in a container)."""
        base = self.dir / "fs" / f"{run.name}-{run.restart_count}"
        dirs = {"root": base / "root", "upper": base / "upper", "work": base / "work"}
        for d in dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        return {k: str(v) for k, v in dirs.items()}

    def _exited(self, p: Proc) -> None:
        rc = p.popen.returncode
        code = rc if rc >= 0 else 128 - rc  # killed by a signal: 128 + signal number, as runtimes report
        run = p.run
        run.state, run.exit_code, run.finished_at, run.ready = "terminated", code, now(), False
        run.reason = "Completed" if code == 0 else "Error"
        run.message = self._termination_message(p, code)
        p.popen = None
        log.info("pod %s container %s exited %d", self.name, run.name, code)

    def _termination_message(self, p: Proc, code: int) -> str:
        text = p.term_file.read_bytes()[:TERMINATION_MESSAGE_LIMIT] if p.term_file.exists() else b""
        if (
            not text.strip()
            and code != 0
            and p.container.get("terminationMessagePolicy") == "FallbackToLogsOnError"
        ):
            lines = p.log_file.read_bytes().splitlines()[-80:] if p.log_file.exists() else []
            text = b"\n".join(lines)[-2048:]
        return text.decode(errors="replace")

    def _schedule_restart(self, p: Proc) -> None:
        run = p.run
        run.last_terminated = run.terminated()
        delay = min(BACKOFF_MAX, BACKOFF_START * 2**run.restart_count)
        run.restart_count += 1
        run.state, run.reason, run.message = (
            "waiting",
            "CrashLoopBackOff",
            f"back-off {delay:.0f}s restarting",
        )
        p.restart_at = time.monotonic() + delay

    def _kill(self, p: Proc, grace: float) -> None:
        if p.popen is None or p.popen.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(p.popen.pid, sig)
            except ProcessLookupError:
                break
            try:
                p.popen.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue

    # ---- volumes, env, API
    @property
    def name(self) -> str:
        return f"{self.pod['metadata']['namespace']}/{self.pod['metadata']['name']}"

    def _retry_config(self, fn):
        """Run ``fn`` until the objects it needs exist (the kubelet retries too), or the pod goes."""
        while not (self.deleted.is_set() or self.shutdown.is_set()):
            try:
                return fn()
            except spec.ConfigError as exc:
                waiting = [
                    ContainerRun(
                        c["name"], c.get("image", ""), reason="CreateContainerConfigError", message=str(exc)
                    )
                    for c in self.pod["spec"]["containers"]
                ]
                self._send(
                    pod_status(
                        self.pod,
                        [],
                        waiting,
                        initialized=False,
                        pod_ip="",
                        host_ip=self.ctx.host_ip,
                        start_time=self.start_time,
                    )
                )
                self.deleted.wait(2.0)
        return None

    def _volumes(self) -> dict[str, str]:
        """Each volume as a host folder (or the host path itself for hostPath)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        out = {}
        for vol in self.pod["spec"].get("volumes") or []:
            if "hostPath" in vol:
                out[vol["name"]] = self._host_path(vol["hostPath"])
                continue
            path = self.dir / "volumes" / vol["name"]
            path.mkdir(parents=True, exist_ok=True)
            if "emptyDir" not in vol:
                if not any(k in vol for k in ("configMap", "secret", "downwardAPI", "projected")):
                    kinds = sorted(set(vol) - {"name"})
                    raise spec.ConfigError(
                        f"volume {vol['name']!r}: the process node supports emptyDir, configMap, secret, "
                        f"projected, downwardAPI and hostPath volumes, not {kinds}"
                    )
                for rel, data in spec.volume_files(
                    self._downward_pod(), vol, self._lookup, self._token
                ).items():
                    (path / rel).parent.mkdir(parents=True, exist_ok=True)
                    (path / rel).write_bytes(data)
            out[vol["name"]] = str(path)
        return out

    @staticmethod
    def _host_path(src: dict) -> str:
        path, kind = Path(src["path"]), src.get("type") or ""
        if kind == "DirectoryOrCreate":
            path.mkdir(parents=True, exist_ok=True)
        elif kind == "FileOrCreate" and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        elif kind in ("Directory", "File") and not path.exists():
            raise spec.ConfigError(f"hostPath {path} does not exist (type {kind})")
        return str(path)

    def _lookup(self, kind: str, name: str) -> dict | None:
        from kubernetes.client.exceptions import ApiException

        read = (
            self.ctx.core.read_namespaced_secret
            if kind == "Secret"
            else self.ctx.core.read_namespaced_config_map
        )
        try:
            resp = read(name, self.pod["metadata"]["namespace"], _preload_content=False)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return json.loads(resp.data)

    def _token(self, src: dict) -> str:
        """A projected service-account token (TokenRequest API), so in-cluster clients can log in."""
        body = {
            "spec": {
                "audiences": [src["audience"]] if src.get("audience") else None,
                "expirationSeconds": int(src.get("expirationSeconds") or 3600),
            }
        }
        sa = self.pod["spec"].get("serviceAccountName") or "default"
        resp = self.ctx.core.create_namespaced_service_account_token(
            sa, self.pod["metadata"]["namespace"], body
        )
        return resp.status.token

    def _downward_pod(self) -> dict:
        status = {
            **(self.pod.get("status") or {}),
            "podIP": self.pod_ip,
            "podIPs": [{"ip": self.pod_ip}],
            "hostIP": self.ctx.host_ip,
            "hostIPs": [{"ip": self.ctx.host_ip}],
        }
        return {**self.pod, "status": status}

    def _image_env(self) -> dict[str, str]:
        """The "image" environment: the venv first on PATH, the in-cluster API on loopback, the pod IP."""
        cfg = self.ctx.cfg
        env = {k: os.environ[k] for k in cfg.env_passthrough if k in os.environ}
        env.update(
            PATH=f"{cfg.venv_bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            HOME=os.environ.get("HOME", "/root"),
            LANG="C.UTF-8",
            HOSTNAME=self.pod["metadata"]["name"],
            POD_IP=self.pod_ip,
            # In-cluster clients read these; they point at the real API server, never a ClusterIP.
            KUBERNETES_SERVICE_HOST="127.0.0.1",
            KUBERNETES_SERVICE_PORT=str(self.ctx.api_port),
        )
        return env

    def _push(self, inits: list[Proc], mains: list[Proc], initialized: bool, force_phase: str = "") -> dict:
        self.procs = inits + mains
        status = pod_status(
            {**self.pod, "status": self.pushed or self.pod.get("status") or {}},
            [p.run for p in inits],
            [p.run for p in mains],
            initialized=initialized,
            pod_ip=self.pod_ip,
            host_ip=self.ctx.host_ip,
            start_time=self.start_time,
        )
        if force_phase:
            status["phase"] = force_phase
        if status != self.pushed:
            self._send(status)
        return status

    def _send(self, status: dict) -> None:
        from kubernetes.client.exceptions import ApiException

        meta = self.pod["metadata"]
        try:
            self.ctx.core.patch_namespaced_pod_status(meta["name"], meta["namespace"], {"status": status})
            self.pushed = status
        except ApiException as exc:
            if exc.status != 404:
                raise
            self.deleted.set()  # gone already: nothing left to report

    def _finish(self) -> None:
        grace = self.pod["metadata"].get("deletionGracePeriodSeconds")
        grace = float(
            grace if grace is not None else self.pod["spec"].get("terminationGracePeriodSeconds", 30)
        )
        if self.shutdown.is_set():
            grace = min(grace, 5.0)  # the node itself is going away
        for p in self.procs:
            self._kill(p, grace)
        shutil.rmtree(self.dir / "fs", ignore_errors=True)
        if self.deleted.is_set():
            self._final_delete()

    def _final_delete(self) -> None:
        """What the kubelet does once the containers are gone: delete the pod object for good."""
        from kubernetes.client.exceptions import ApiException

        meta = self.pod["metadata"]
        body = {"gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}}
        try:
            self.ctx.core.delete_namespaced_pod(meta["name"], meta["namespace"], body=body)
        except ApiException as exc:
            if exc.status not in (404, 409):
                raise
