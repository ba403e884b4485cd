"""``python -m qmodel_runtime.serve --artifact URI [--port 8000] ...`` (see ``--help``).

The HTTP server starts at once (liveness answers while the artifact downloads and loads);
/health/ready turns 200 after the weights are loaded and a warm-up generation ran.

SIGTERM (Kubernetes stopping the pod): readiness turns 503 and new requests get 503, requests
in flight run on for up to ``--shutdown-grace`` seconds and are then cut off (their streams end
with finish_reason "abort"), and the process exits 0.
"""

from __future__ import annotations

import logging
import sys
import threading

import uvicorn

from qmodel_runtime.serve.app import build_app
from qmodel_runtime.serve.config import ServeConfig, parse_args
from qmodel_runtime.serve.metrics import Metrics
from qmodel_runtime.serve.startup import ServerState, start_loading

log = logging.getLogger("qmodel_runtime.serve")


class GracefulServer(uvicorn.Server):
    """uvicorn, with the engine drained before the listener closes."""

    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self.state = state
        self._drain: threading.Thread | None = None

    def handle_exit(self, sig, frame) -> None:
        engine = self.state.engine
        if self._drain is None and engine is not None:
            log.info(
                "signal %s: no new requests; in-flight ones get %.0fs to finish",
                sig,
                self.state.config.shutdown_grace,
            )
            engine.begin_drain()
            self._drain = threading.Thread(target=self._finish, name="qmodel-drain", daemon=True)
            self._drain.start()
        super().handle_exit(sig, frame)

    def _finish(self) -> None:
        clean = self.state.engine.shutdown(self.state.config.shutdown_grace)
        log.info(
            "engine stopped (%s)",
            "all requests finished" if clean else "requests past the grace were cut off",
        )


def serve(config: ServeConfig) -> int:
    state = ServerState(config, Metrics(config.model_name()))
    app = build_app(state)
    server = GracefulServer(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_level=config.log_level,
            timeout_graceful_shutdown=int(config.shutdown_grace) + 5,
            log_config=None,
        ),
        state,
    )
    state.stop = lambda: setattr(server, "should_exit", True)  # --termination-log: exit on failure
    start_loading(state)
    server.run()
    if server._drain is not None:
        server._drain.join(timeout=config.shutdown_grace + 10)
    return 1 if state.status == "failed" and config.termination_log is not None else 0


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    logging.basicConfig(
        level=config.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return serve(config)


if __name__ == "__main__":
    raise SystemExit(main())
