"""Starting, watching and stopping the test bed's own processes (by PID, never by name)."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from testbed.paths import TestbedError

log = logging.getLogger("testbed")
PR_SET_PDEATHSIG = 1  # prctl option, <linux/prctl.h>


@dataclass
class Proc:
    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen | None = None
    pid: int = 0

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return pid_matches(self.pid, self.argv[0])

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL it when the process that started it dies (even by SIGKILL).

    SIGKILL, not SIGTERM: an orphaned kube-apiserver whose etcd is gone ignores SIGTERM for
    more than 10 s; the data is throwaway. A process node's pods die with it (sandbox.py)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def spawn(
    name: str,
    argv: list[str],
    log_dir: Path,
    env: dict[str, str] | None = None,
    die_with_parent: bool = False,
) -> Proc:
    """Start ``argv`` in its own session (so stopping it stops its children too), output to a log.

    ``die_with_parent``: a test session killed by CI's timeout must not leave a control plane
    behind (``python -m testbed up`` leaves it off: its cluster outlives the command).
    """
    log_path = log_dir / f"{name}.log"
    with open(log_path, "ab") as out:
        popen = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent if die_with_parent else None,
        )
    log.debug("started %s (pid %d): %s", name, popen.pid, " ".join(argv))
    return Proc(name=name, argv=argv, log_path=log_path, popen=popen, pid=popen.pid)


def pid_matches(pid: int, exe: str) -> bool:
    """True when ``pid`` is alive and still runs ``exe`` (a recycled PID is not ours to stop)."""
    if pid <= 0:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(cmdline) and cmdline[0].decode(errors="replace") == exe


def stop(proc: Proc, grace: float = 10.0) -> None:
    """SIGTERM the process group, SIGKILL it after ``grace`` seconds."""
    if not proc.alive():
        _reap(proc)
        return
    _signal_group(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while proc.alive() and time.monotonic() < deadline:
        if proc.popen is not None:
            _reap(proc, timeout=0.1)
        else:  # not our child (attached from a state file): nothing to wait on but the PID
            time.sleep(0.1)
    if proc.alive():
        log.warning("%s (pid %d) ignored SIGTERM for %.0fs; killing it", proc.name, proc.pid, grace)
        _signal_group(proc.pid, signal.SIGKILL)
    _reap(proc, timeout=5)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # our processes lead their own session (start_new_session)
    except ProcessLookupError:
        pass


def _reap(proc: Proc, timeout: float = 0.0) -> None:
    if proc.popen is None:
        return
    try:
        proc.popen.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (the kernel picks it; the caller binds it right away)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(
    check: Callable[[], bool], what: str, timeout: float, watch: list[Proc] = (), interval: float = 0.2
) -> None:
    """Poll ``check`` until it is true; fail early, with its log, if a watched process died."""
    deadline = time.monotonic() + timeout
    while True:
        for proc in watch:
            if not proc.alive():
                raise TestbedError(
                    f"{proc.name} exited while waiting for {what}; its log ({proc.log_path}):\n"
                    f"{proc.log_tail()}"
                )
        try:
            if check():
                return
        except (OSError, ValueError) as exc:  # not listening yet, half-written file, ...
            log.debug("waiting for %s: %s", what, exc)
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p.name} ({p.log_path}):\n{p.log_tail()}" for p in watch)
            raise TestbedError(f"timed out after {timeout:.0f}s waiting for {what}\n{tails}")
        time.sleep(interval)
