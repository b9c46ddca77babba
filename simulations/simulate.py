"""Simulate a whole federation (synthetic hospitals or the researcher's own sites) on one machine (Flower simulation on Ray).

One call runs the federated job through Flower's simulation runtime, then the baselines on the
same data and splits (local-only, pooled, random initialisation, DP off) and writes one run
folder: metrics.json, metrics.csv, checkpoints/, plots/ and report.md.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from client.client_app import make_client_app
from client.site_settings import SiteSettings
from server.server_app import make_server_app
from simulations.simulation_plan import SimulationPlan
from simulations.site_sources import resolve_sites, synthetic_sites

logger = logging.getLogger(__name__)


class SimulationIncomplete(RuntimeError):
    """The simulated federation ended before its last round (the server app failed)."""


class RunFolderInUse(RuntimeError):
    """A new simulation was asked for in a folder that already holds a run."""


_RUN_MARKERS = ("metrics.json", "metrics.csv", "checkpoints", "sites", "partition", "baselines", "variants")


def prepare_run_folder(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Make sure a new simulation does not inherit an old one's simulated hospitals.

    The simulated hospitals keep their state (privacy ledger, local head, global layers) in
    ``run_dir/sites``, exactly like real ones, so a second run in the same folder would start
    with the first run's budget spent. ``--resume`` continues that run on purpose; otherwise the
    folder must be new, or ``overwrite`` replaces it (only a folder that holds a fedtl run).

    Raises:
        RunFolderInUse: the folder holds a run and neither ``resume`` nor ``overwrite`` is set,
            or ``overwrite`` is set for a folder that does not look like a fedtl run.
    """
    if resume or not run_dir.exists() or not any(run_dir.iterdir()):
        return
    if not any((run_dir / marker).exists() for marker in _RUN_MARKERS):
        raise RunFolderInUse(
            f"{run_dir} is not empty and holds no fedtl run; choose another folder with --out"
        )
    if not overwrite:
        raise RunFolderInUse(
            f"{run_dir} already holds a run, and its simulated hospitals have spent privacy budget there; "
            "pass --resume to continue it, --overwrite to replace it, or --out for a new folder"
        )
    logger.info("replacing the earlier run in %s", run_dir)
    shutil.rmtree(run_dir)


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


def format_round_line(record: dict[str, Any]) -> str:
    """One line per round for the console table."""
    cells = []
    for site, row in sorted(record.get("sites", {}).items()):
        bacc = row.get("balanced_accuracy")
        eps = row.get("epsilon")
        cells.append(f"{site}: bacc {bacc:.3f} eps {eps:.2f}" if isinstance(bacc, float) and isinstance(eps, float)
                     else f"{site}: {row.get('status', '?')}")
    return f"round {record['round']:>3} | {record.get('wall_time_s') or 0:6.1f} s | " + " | ".join(cells)


__all__ = ["RunFolderInUse", "SimulationIncomplete", "SimulationPlan", "format_round_line", "prepare_run_folder",
           "resolve_sites", "run_federated", "synthetic_sites"]
