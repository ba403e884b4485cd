"""``python -m qmodel_operator``: parse the settings once, configure logging, run kopf."""

from __future__ import annotations

import logging
import os
import sys

import kopf

from qmodel_operator.settings import Settings, SettingsError


def main() -> int:
    try:
        settings = Settings.from_env(os.environ)
    except SettingsError as e:
        print(f"qmodel-operator: {e}", file=sys.stderr)  # logging is not configured yet
        return 2
    kopf.configure(
        verbose=settings.log_level == "DEBUG",
        quiet=settings.log_level in ("WARNING", "ERROR"),
        log_format=kopf.LogFormat.JSON if settings.log_format == "json" else kopf.LogFormat.FULL,
    )
    if settings.log_level != "DEBUG":
        # kopf logs "Handler 'model_event' succeeded." at INFO for every watch event of every
        # model: thousands of lines that say nothing in a 500-model burst. Warnings still show.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    # Registers the handlers with kopf's default registry (import for the side effect).
    from qmodel_operator import handlers  # noqa: F401

    liveness = f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None
    kopf.run(
        standalone=not settings.peering,
        peering_name=settings.peering or None,
        clusterwide=not settings.namespaces,
        namespaces=settings.namespaces,
        liveness_endpoint=liveness,
        memo=kopf.Memo(config=settings),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
