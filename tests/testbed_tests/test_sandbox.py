"""The process node's sandbox on this machine: a private mount namespace over an overlay root."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from testbed.processnode.agent import detect_isolation
from testbed.processnode.pod import SANDBOX
from testbed.processnode.sandbox import resolve_in_root

needs_mounts = pytest.mark.skipif(
    detect_isolation("auto") != "mount",
    reason="needs root and mount namespaces (isolation falls back to none)",
)


def plan(tmp_path, code: str, binds: list) -> dict:
    dirs = {k: tmp_path / k for k in ("root", "upper", "work")}
    for d in dirs.values():
        d.mkdir()
    return {
        "argv": [sys.executable, "-c", code],
        "env": {"PATH": os.environ["PATH"]},
        "cwd": "/nonexistent/workdir",
        "isolation": "mount",
        "binds": binds,
        **{k: str(v) for k, v in dirs.items()},
    }


@needs_mounts
def test_volumes_bind_at_their_paths_and_writes_stay_private(tmp_path):
    vol, ro, term = tmp_path / "vol", tmp_path / "ro", tmp_path / "term"
    vol.mkdir()
    ro.mkdir()
    (ro / "in.txt").write_text("input")
    term.write_text("")
    private = f"/tmp/qmodel-sandbox-private-{os.getpid()}"
    code = (
        "import os\n"
        "open('/data/out.txt', 'w').write(open('/ro/in.txt').read() + ' ' + os.getcwd())\n"
        "open('/dev/termination-log', 'w').write('the message')\n"
        f"open('{private}', 'w').write('x')\n"
        "try:\n    open('/ro/nope', 'w')\nexcept OSError as e:\n    print('readonly', e.errno)\n"
    )
    binds = [[str(vol), "/data", False], [str(ro), "/ro", True], [str(term), "/dev/termination-log", False]]
    p = tmp_path / "plan.json"
    p.write_text(json.dumps(plan(tmp_path, code, binds)))
    out = subprocess.run([sys.executable, str(SANDBOX), str(p)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "readonly 30"  # EROFS
    assert (vol / "out.txt").read_text() == "input /nonexistent/workdir"
    assert term.read_text() == "the message"
    assert not os.path.exists(private) and not os.path.exists("/dev/termination-log")
    assert (tmp_path / "upper" / private.lstrip("/")).exists()  # it landed in the pod's own layer


@needs_mounts
def test_a_command_that_cannot_start_exits_128_with_the_reason(tmp_path):
    p = tmp_path / "plan.json"
    body = plan(tmp_path, "", [])
    body["argv"] = ["no-such-binary-anywhere"]
    p.write_text(json.dumps(body))
    out = subprocess.run([sys.executable, str(SANDBOX), str(p)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 128
    assert "cannot start ['no-such-binary-anywhere']" in out.stderr


def test_mount_targets_follow_symlinks_inside_the_root(tmp_path):
    """/var/run -> /run (Debian) must land on <root>/run, not on the host's /run."""
    root = tmp_path / "root"
    (root / "var").mkdir(parents=True)
    (root / "run").mkdir()
    (root / "var" / "run").symlink_to("/run")
    (root / "var" / "lib").symlink_to("../run/lib")
    r = str(root)
    sa = "/var/run/secrets/kubernetes.io/serviceaccount"
    assert resolve_in_root(r, sa) == f"{r}/run/secrets/kubernetes.io/serviceaccount"
    assert resolve_in_root(r, "/var/lib/x") == f"{r}/run/lib/x"
    assert resolve_in_root(r, "/data/../tmp/./y") == f"{r}/tmp/y"
    (root / "loop").symlink_to("/loop")
    with pytest.raises(OSError, match="too many levels"):
        resolve_in_root(r, "/loop/x")


@needs_mounts
def test_a_volume_under_a_symlinked_path_is_visible_inside(tmp_path):
    vol = tmp_path / "token"
    vol.mkdir()
    (vol / "token").write_text("t0ken")
    code = "print(open('/var/run/secrets/kubernetes.io/serviceaccount/token').read())"
    p = tmp_path / "plan.json"
    p.write_text(
        json.dumps(plan(tmp_path, code, [[str(vol), "/var/run/secrets/kubernetes.io/serviceaccount", True]]))
    )
    out = subprocess.run([sys.executable, str(SANDBOX), str(p)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "t0ken"
