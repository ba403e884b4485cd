"""``python -m testbed.processnode --kubeconfig K --config JSON --workdir D`` (started by testbed.cluster)."""

from __future__ import annotations

import argparse
import json
import logging
import signal
from pathlib import Path

from testbed.processnode.agent import Agent, main_loop
from testbed.processnode.config import ProcessNodeConfig


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m testbed.processnode", description=__doc__)
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--config", default="{}", help="ProcessNodeConfig as JSON")
    parser.add_argument("--workdir", required=True, type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(threadName)s %(message)s")
    from kubernetes import config as kconfig

    agent = Agent(
        kconfig.new_client_from_config(config_file=args.kubeconfig),
        ProcessNodeConfig.from_json(json.loads(args.config)),
        args.workdir,
    )
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.stop.set())
    main_loop(agent)


if __name__ == "__main__":
    main()
