"""``python -m testbed up|down|status``: a test bed that stays up, for people and the demo.

python -m testbed up       # build if needed, start, print the kubeconfig path
export KUBECONFIG=$(python -m testbed kubeconfig)
python -m testbed status
python -m testbed down     # stops exactly the processes `up` started (PIDs from the state file)
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

from testbed import cluster as tb_cluster
from testbed import paths
from testbed.procs import stop


def run_dir() -> Path:
    return paths.cache_root() / "run" / "default"


def up(args: argparse.Namespace) -> int:
    workdir = run_dir()
    if (workdir / "state.json").exists():
        existing = tb_cluster.attach(workdir / "admin.kubeconfig")
        if any(p.alive() for p in existing.procs.values()):
            print(f"already up: {existing.kubeconfig} (use `down` first)", file=sys.stderr)
            return 1
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    paths.ensure_installed()
    c = tb_cluster.start(tb_cluster.ClusterConfig(workdir=workdir, die_with_parent=False))
    print(f"test bed up at {c.server}\nkubeconfig: {c.kubeconfig}\nlogs: {c.log_dir}")
    print(f"export KUBECONFIG={c.kubeconfig}")
    return 0


def down(args: argparse.Namespace) -> int:
    kubeconfig = run_dir() / "admin.kubeconfig"
    if not (run_dir() / "state.json").exists():
        print("no test bed is up", file=sys.stderr)
        return 0
    c = tb_cluster.attach(kubeconfig)
    for p in reversed(list(c.procs.values())):
        stop(p, grace=15.0)  # stop() checks that each PID still runs the binary we started
    shutil.rmtree(run_dir() / "etcd", ignore_errors=True)
    (run_dir() / "state.json").unlink()
    print(f"test bed down (logs kept in {c.log_dir})")
    return 0


def status(args: argparse.Namespace) -> int:
    if not (run_dir() / "state.json").exists():
        print("no test bed is up")
        return 1
    c = tb_cluster.attach(run_dir() / "admin.kubeconfig")
    for p in c.procs.values():
        print(f"{p.name:28s} pid {p.pid:<8d} {'running' if p.alive() else 'STOPPED'}")
    print(f"kubeconfig: {c.kubeconfig}")
    return 0 if all(p.alive() for p in c.procs.values()) else 1


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m testbed", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name, fn in (("up", up), ("down", down), ("status", status)):
        sub.add_parser(name).set_defaults(fn=fn)
    sub.add_parser("kubeconfig", help="print the kubeconfig path").set_defaults(
        fn=lambda a: print(run_dir() / "admin.kubeconfig") or 0
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
