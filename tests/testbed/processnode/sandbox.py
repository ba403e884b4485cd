"""Exec a container's command in a private mount namespace (run as a script: stdlib only).

    python sandbox.py PLAN.json

PLAN: {"argv", "env", "cwd", "isolation": "mount"|"none", "root", "upper", "work",
"binds": [[host, target, read_only], ...]}. With "mount": unshare the mount namespace, make
every mount private (nothing leaks back to the host), mount an overlay of "/" at root (the
pod's writes land in upper, which the process node removes with the pod), bind the host's
other mounts (/proc, /dev, /sys, ...) and the pod's volumes, chroot, exec. The namespace and
its mounts vanish with the last process in it. With "none": chdir and exec.
"""

import ctypes
import json
import os
import sys

CLONE_NEWNS = 0x00020000
PR_SET_PDEATHSIG = 1
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18
_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source, target, fstype, flags, data=None):
    _check(
        _libc.mount(
            source.encode() if source else None,
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {source} on {target}",
    )


def host_mounts(root):
    """The host's mount points other than "/", outermost first, skipping the pod's own dirs."""
    points = []
    with open("/proc/self/mounts") as f:
        for line in f:
            point = line.split()[1].encode().decode("unicode_escape")
            if point != "/" and not point.startswith(root):
                points.append(point)
    outer = []
    for p in sorted(set(points)):
        if not any(p.startswith(o.rstrip("/") + "/") for o in outer):
            outer.append(p)
    return outer


def resolve_in_root(root, target, _depth=0):
    """``target`` (absolute, as the container sees it) as a host path inside ``root``, following
    symlinks the way the container would: an absolute link restarts at ``root``, never at the
    host's "/" (Debian's /var/run -> /run would otherwise put a pod's service-account token on
    the host's /run, outside the container's view)."""
    if _depth > 40:
        raise OSError(40, f"too many levels of symbolic links resolving {target} in {root}")
    resolved = ""
    parts = [p for p in target.split("/") if p not in ("", ".")]
    for i, part in enumerate(parts):
        if part == "..":
            resolved = os.path.dirname(resolved).rstrip("/")  # never above the root
            continue
        candidate = f"{resolved}/{part}"
        if os.path.islink(root + candidate):
            link = os.readlink(root + candidate)
            base = "" if link.startswith("/") else resolved
            rest = "/".join(parts[i + 1 :])
            return resolve_in_root(root, f"{base}/{link}/{rest}", _depth + 1)
        resolved = candidate
    return root + (resolved or "/")


def _ensure(path, like):
    if os.path.isdir(like):
        os.makedirs(path, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if not os.path.exists(path):
            open(path, "a").close()


def make_dev(dev):
    """A fresh /dev (tmpfs) with the usual devices: the host's /dev must not receive pod files."""
    os.makedirs(dev, exist_ok=True)
    mount("tmpfs", dev, "tmpfs", 0, "mode=755")
    for name in ("null", "zero", "full", "random", "urandom", "tty"):
        if os.path.exists("/dev/" + name):
            _ensure(f"{dev}/{name}", "/dev/" + name)
            mount("/dev/" + name, f"{dev}/{name}", None, MS_BIND)
    for name in ("pts", "shm"):
        if os.path.isdir("/dev/" + name):
            os.makedirs(f"{dev}/{name}", exist_ok=True)
            mount("/dev/" + name, f"{dev}/{name}", None, MS_BIND | MS_REC)
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ):
        os.symlink(target, f"{dev}/{name}")


def enter(plan):
    root = plan["root"]
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount("overlay", root, "overlay", 0, f"lowerdir=/,upperdir={plan['upper']},workdir={plan['work']}")
    make_dev(root + "/dev")
    for point in host_mounts(os.path.dirname(root)):
        if point == "/dev" or point.startswith("/dev/"):
            continue
        target = root + point
        if os.path.exists(target) or os.path.isdir(point):
            _ensure(target, point)
            mount(point, target, None, MS_BIND | MS_REC)
    for host, target, read_only in plan["binds"]:
        inside = resolve_in_root(root, target)
        _ensure(inside, host)
        mount(host, inside, None, MS_BIND | MS_REC)
        if read_only:
            mount(None, inside, None, MS_BIND | MS_REMOUNT | MS_RDONLY)
    os.chroot(root)


def main():
    with open(sys.argv[1]) as f:
        plan = json.load(f)
    # Killed with the node agent's pod thread, even if the agent itself is SIGKILLed.
    _libc.prctl(PR_SET_PDEATHSIG, 9)
    try:
        if plan["isolation"] == "mount":
            enter(plan)
            os.makedirs(plan["cwd"], exist_ok=True)  # as the kubelet does for a missing workingDir
        os.chdir(plan["cwd"])
        os.execvpe(plan["argv"][0], plan["argv"], plan["env"])
    except OSError as exc:
        # Exit 128 like a runtime that cannot start the container; the reason goes to the log.
        print(f"process node: cannot start {plan['argv'][:1]}: {exc}", file=sys.stderr)
        sys.exit(128)


if __name__ == "__main__":
    main()
