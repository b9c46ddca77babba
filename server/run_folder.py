"""A run folder belongs to one run: refuse to start a new run over an old one unless told to resume or replace it."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)


class RunFolderInUse(RuntimeError):
    """A new run (real or simulated) was asked for in a folder that already holds one."""


_RUN_MARKERS = ("metrics.json", "metrics.csv", "checkpoints", "sites", "partition", "baselines", "variants")


def prepare_run_folder(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Make sure a new run does not inherit an old one's checkpoints, records or simulated hospitals.

    A run folder holds checkpoints that ``--resume`` continues from and, in a simulation, the simulated
    hospitals' state (privacy ledger, local head, global layers) in ``run_dir/sites``, exactly like real
    ones: a second run in the same folder would start with the first run's budget spent. ``--resume``
    continues that run on purpose; otherwise the folder must be new, or ``overwrite`` replaces it (only a
    folder that holds a fedtl run).

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
            f"{run_dir} already holds a run, and its checkpoints (and, in a simulation, its simulated hospitals' spent privacy budget) are there; "
            "pass --resume to continue it, --overwrite to replace it, or --out for a new folder"
        )
    logger.info("replacing the earlier run in %s", run_dir)
    shutil.rmtree(run_dir)
