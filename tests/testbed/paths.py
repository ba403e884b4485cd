"""Where the test bed's binaries live: one cache folder per set of pinned versions.

The versions are in ``versions.env`` beside this file (read by ``install.sh`` too), so the
Python side and the build agree on the cache key without a second copy of the numbers.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
INSTALL_SCRIPT = HERE / "install.sh"


class TestbedError(RuntimeError):
    """The test bed could not do what was asked; the message says what to do about it."""


def versions() -> dict[str, str]:
    """The pinned versions, e.g. ``{"K8S_VERSION": "1.36.3", ...}``."""
    out = {}
    for line in (HERE / "versions.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def cache_root() -> Path:
    return Path(os.environ.get("QMODEL_TESTBED_CACHE") or Path.home() / ".cache" / "qmodel-testbed")


def version_key() -> str:
    v = versions()
    return f"k8s{v['K8S_VERSION']}-etcd{v['ETCD_VERSION']}-kwok{v['KWOK_VERSION']}-helm{v['HELM_VERSION']}"


def install_root() -> Path:
    return cache_root() / version_key()


def bin_dir() -> Path:
    """The folder holding etcd, kube-*, kubectl, kwok, helm (and the S3 server from install_s3.sh)."""
    return install_root() / "bin"


def kwok_stages_dir() -> Path:
    """kwok's own default Stage files, copied from its module by install.sh."""
    return install_root() / "share" / "kwok-stages"


def binary(name: str) -> Path:
    path = bin_dir() / name
    if not path.is_file():
        raise TestbedError(
            f"{path} is missing: build the test bed's binaries with `make testbed` "
            f"(or `bash {INSTALL_SCRIPT}`)"
        )
    return path


def ensure_installed(timeout: float = 3600.0) -> Path:
    """Run install.sh (seconds when cached, 10-20 min cold on 2 cores) and return the bin dir."""
    proc = subprocess.run(
        ["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        raise TestbedError(f"{INSTALL_SCRIPT} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return bin_dir()
