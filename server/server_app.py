"""The coordinator's Flower ServerApp.

In deployment (``flwr run``) the run config names the federation TOML and the run folder:
``config-file``, ``run-dir``, ``resume`` and ``cache-dir`` (pyproject ``[tool.flwr.app.config]``).
The simulation builds the same app in-process with ``make_server_app``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import FederationConfig
from server.backbone_source import prepare_backbone
from server.federation_loop import run_federation
from server.run_report import format_round_line, write_federated_run_report

logger = logging.getLogger(__name__)


def make_server_app(config: FederationConfig, run_dir: Path, cache_dir: Path, *, resume: bool = False,
                    random_init: bool = False,
                    on_round: Callable[[dict[str, Any]], None] | None = None) -> ServerApp:
    """A ServerApp bound to one federation configuration and run folder."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        backbone = prepare_backbone(config, cache_dir, random_init=random_init)
        logger.info("backbone %s (%s)", backbone.fingerprint[:12], backbone.source)
        run_federation(grid, config, backbone, run_dir, resume=resume, on_round=on_round)

    return app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Deployment entry: read the federation TOML named in the run config."""
    run_config = context.run_config
    config_file = str(run_config.get("config-file", ""))
    config = FederationConfig.from_toml(config_file) if config_file else FederationConfig()
    run_dir = Path(str(run_config.get("run-dir", "runs/federation")))
    cache_dir = Path(str(run_config.get("cache-dir", "") or run_dir / "cache"))
    resume = bool(run_config.get("resume", False))
    backbone = prepare_backbone(config, cache_dir)
    logger.info("backbone %s (%s)", backbone.fingerprint[:12], backbone.source)

    def report_round(record: dict[str, Any]) -> None:
        logger.info("%s", format_round_line(record))
        write_federated_run_report(run_dir)  # report.md and plots are current after every round

    run_federation(grid, config, backbone, run_dir, resume=resume, on_round=report_round)
    logger.info("report: %s", run_dir / "report.md")
