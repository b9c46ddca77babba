"""Simulate a whole federation (synthetic hospitals or the researcher's own sites) on one machine (Flower simulation on Ray).

One call runs the federated job through Flower's simulation runtime, then the baselines on the
same data and splits (local-only, pooled, random initialisation, DP off) and writes one run
folder: metrics.json, metrics.csv, checkpoints/, plots/ and report.md.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from tqdm import tqdm

from client.client_app import make_client_app
from client.site_settings import SiteSettings
from server.run_folder import RunFolderInUse, prepare_run_folder
from server.run_report import format_round_line
from server.server_app import make_server_app
from simulations.simulation_plan import SimulationPlan
from simulations.site_sources import resolve_sites, synthetic_sites

logger = logging.getLogger(__name__)


class SimulationIncomplete(RuntimeError):
    """The simulated federation ended before its last round (the server app failed)."""


def run_federated(plan: SimulationPlan, sites: dict[int, SiteSettings] | None = None) -> dict[str, Any]:
    """Run the federation through Flower's simulation runtime; returns metrics.json as a dict.

    sites: partition id -> site (default: the plan's sites, ``simulations.site_sources.resolve_sites``).
    """
    from flwr.simulation import run_simulation

    sites = sites if sites is not None else resolve_sites(plan)
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    progress = tqdm(total=plan.config.training.rounds, desc=f"{plan.run_dir.name}: rounds", unit="round")

    def on_round(record: dict[str, Any]) -> None:
        progress.update(1)
        progress.write(format_round_line(record))

    server_app = make_server_app(plan.config, plan.run_dir, plan.cache_dir, resume=plan.resume,
                                 random_init=plan.random_init, on_round=on_round)
    client_app = make_client_app(sites)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    started = time.perf_counter()
    init_args: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    if not os.environ.get("RAY_ADDRESS"):
        # A local Ray instance sized so that ``max_parallel_sites`` clients run at once. With
        # RAY_ADDRESS set, Ray joins that cluster instead and its size decides the parallelism.
        init_args["num_cpus"] = int(plan.cpus_per_site * plan.max_parallel_sites)
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=len(sites),
        backend_config={
            "client_resources": {"num_cpus": plan.cpus_per_site, "num_gpus": 0.0},
            "init_args": init_args,
        },
    )
    progress.close()
    metrics_path = plan.run_dir / "metrics.json"
    if not metrics_path.exists():
        raise RuntimeError(f"the simulation wrote no {metrics_path}; see the log above for the server's error")
    metrics = json.loads(metrics_path.read_text())
    completed = [record["round"] for record in metrics.get("rounds", [])]
    if not completed or completed[-1] < plan.config.training.rounds:
        raise SimulationIncomplete(
            f"the federation stopped after round {completed[-1] if completed else 0} of "
            f"{plan.config.training.rounds} (see the server's error above); the completed rounds are checkpointed "
            f"in {plan.run_dir}: rerun with --resume to continue"
        )
    logger.info("federation %s finished in %.1f s", plan.run_dir.name, time.perf_counter() - started)
    return metrics


__all__ = ["RunFolderInUse", "SimulationIncomplete", "SimulationPlan", "format_round_line", "prepare_run_folder",
           "resolve_sites", "run_federated", "synthetic_sites"]
