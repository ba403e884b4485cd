"""A real S3-compatible server (versitygw, POSIX backend) on a free loopback port, for tests.

    from testbed.s3server import s3_server, s3_bucket   # pytest fixtures (import them in a conftest)

``s3_server`` (session scope) starts one server for the whole run; ``s3_bucket`` gives each test
a fresh, empty bucket and makes sure the server is up again after a test that stopped it.
``S3Server.stop()`` / ``start()`` restart the same server on the same port and data folder, for
fault tests. ``S3Server.requests(op)`` reads the server's own access log: what the server
really saw, not what the client meant to send.

Standalone (the demo): ``python tests/testbed/s3server.py [--root DIR]`` prints the AWS_*
variables to use and serves until interrupted.

The binary comes from tests/testbed/install_s3.sh (run by ``make setup``); the tests skip only
when it is missing. ``QMODEL_VERSITYGW`` overrides the binary's path.
"""

from __future__ import annotations

import atexit
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

INSTALL_SCRIPT = Path(__file__).with_name("install_s3.sh")
ACCESS_KEY = "qmodel-test-access"
SECRET_KEY = "qmodel-test-secret-0123456789"
REGION = "us-east-1"
START_TIMEOUT = 30.0


def find_binary() -> Path | None:
    """The versitygw binary, or None when it is not installed (run tests/testbed/install_s3.sh)."""
    override = os.environ.get("QMODEL_VERSITYGW")
    if override:
        return Path(override) if Path(override).is_file() else None
    out = subprocess.run(
        ["bash", str(INSTALL_SCRIPT), "--print-bin"], capture_output=True, text=True, check=True, timeout=30
    )
    path = Path(out.stdout.strip())
    return path if path.is_file() and os.access(path, os.X_OK) else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll ``predicate`` until true or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout:.0f}s")
        time.sleep(interval)


def _xattrs_supported(folder: Path) -> bool:
    probe = folder / ".xattr-probe"
    probe.touch()
    try:
        os.setxattr(probe, "user.qmodel", b"1")
        return True
    except OSError:
        return False
    finally:
        probe.unlink()


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass(eq=False)  # hashable by identity (kept in a WeakSet)
class S3Server:
    """One versitygw process; ``root`` holds the buckets (one folder each) and the logs."""

    binary: Path
    root: Path
    port: int = field(default_factory=free_port)
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    # e.g. ["--max-requests", "2"]: versitygw then answers 503 SlowDown beyond 2 concurrent requests
    extra_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    # A fault test may restart the server from several transfer threads at once.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def access_log(self) -> Path:
        return self.root / "access.log"

    def env(self, **overrides: str) -> dict[str, str]:
        """The AWS_* variables a client of this server needs (as a Secret would give them)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": REGION,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            **overrides,
        }

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        with self._lock:
            self._start()

    def _start(self) -> None:
        if self.running:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {"PATH": os.environ.get("PATH", ""), "HOME": str(self.root)}
        env.update(ROOT_ACCESS_KEY=self.access_key, ROOT_SECRET_KEY=self.secret_key)
        cmd = [str(self.binary), "--port", f"127.0.0.1:{self.port}", "--access-log", str(self.access_log)]
        cmd += self.extra_args
        # versitygw keeps ETags and checksums in user xattrs; where the file system refuses them
        # (some overlay/tmpfs setups) --nometa still serves objects, without stored ETags.
        meta = [] if _xattrs_supported(self.data_dir) else ["--nometa"]
        cmd += ["posix", *meta, str(self.data_dir)]
        with open(self.root / "server.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        _STARTED.add(self)
        try:
            wait_until(
                lambda: _port_open(self.port) or not self.running, START_TIMEOUT, "versitygw to listen"
            )
        except TimeoutError:
            self._stop(kill=True)
            raise
        if not self.running:
            tail = (self.root / "server.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"versitygw exited with {self.proc.returncode}:\n{tail}")

    def stop(self, kill: bool = True) -> None:
        """Stop the server: SIGKILL by default (a crash: connections drop mid-transfer)."""
        with self._lock:
            self._stop(kill)

    def _stop(self, kill: bool) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            self.proc.wait(timeout=30)
        self.proc = None
        wait_until(lambda: not _port_open(self.port), 10, "the port to close")

    def boto_args(self) -> dict[str, str]:
        """Keyword arguments for ``boto3.client("s3", **server.boto_args())``."""
        return {
            "endpoint_url": self.endpoint,
            "region_name": REGION,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
        }

    def make_bucket(self, name: str) -> None:
        # A bucket is a folder under the POSIX backend's root; creating it through the API keeps
        # the server's view consistent (it owns the bucket's ACL/ownership records).
        import boto3

        boto3.client("s3", **self.boto_args()).create_bucket(Bucket=name)

    def object_path(self, bucket: str, key: str) -> Path:
        """Where the POSIX backend keeps an object's bytes (to corrupt them in fault tests)."""
        return self.data_dir / bucket / key

    def log_lines(self) -> list[str]:
        return self.access_log.read_text().splitlines() if self.access_log.is_file() else []

    def requests(self, operation: str, bucket: str, since: int = 0) -> list[str]:
        """Keys of the ``operation`` requests (e.g. "GetObject") the server logged for ``bucket``,
        from access-log line ``since`` on (``len(log_lines())`` marks a point in time)."""
        pattern = re.compile(
            rf"^\S+ {re.escape(bucket)} \[[^\]]*\] .*? (?:s3_)?{re.escape(operation)} (\S+) "
        )
        return [m.group(1) for line in self.log_lines()[since:] if (m := pattern.match(line))]


_bucket_ids = itertools.count()
# Servers this process started: stopped at exit even when a test run ends abnormally.
_STARTED: weakref.WeakSet[S3Server] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for server in list(_STARTED):
        server.stop(kill=True)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    binary = find_binary()
    if binary is None:
        pytest.skip("versitygw is not installed: run `make setup` (it calls tests/testbed/install_s3.sh)")
    server = S3Server(binary, tmp_path_factory.mktemp("s3server"))
    server.start()
    yield server
    server.stop(kill=False)


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> Iterator[str]:
    """A fresh bucket on a running server; restarts the server after a test that stopped it."""
    s3_server.start()
    name = f"qm-test-{os.getpid()}-{next(_bucket_ids)}"
    s3_server.make_bucket(name)
    yield name
    s3_server.start()


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Serve a local S3-compatible store until interrupted.")
    parser.add_argument("--root", type=Path, help="data folder (default: a fresh temporary folder)")
    parser.add_argument("--port", type=int, default=0, help="loopback port (default: a free one)")
    parser.add_argument("--bucket", action="append", default=[], help="create this bucket (repeatable)")
    args = parser.parse_args(argv)
    binary = find_binary()
    if binary is None:
        print("versitygw is not installed; run tests/testbed/install_s3.sh", file=sys.stderr)
        return 2
    root = args.root or Path(tempfile.mkdtemp(prefix="qmodel-s3-"))
    server = S3Server(binary, root, port=args.port or free_port())
    server.start()
    for bucket in args.bucket:
        server.make_bucket(bucket)
    for key, value in server.env().items():
        print(f"export {key}={value}")
    sys.stdout.flush()
    stop_on = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_on)
    try:
        signal.sigwait(stop_on)
    finally:
        server.stop(kill=False)
        if args.root is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
