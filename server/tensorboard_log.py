"""Each round's metrics as TensorBoard event files, beside metrics.json/csv (``<run>/tensorboard/``).

``tensorboard --logdir runs`` then shows every run of a study (and its variants and seeds, in their
own folders) side by side. Scalars, with the round as the step:

* ``<metric>/<site>``: each site's ``balanced_accuracy``, ``accuracy``, ``auc``, ``sensitivity``,
  ``specificity``, ``loss`` (evaluation), ``train_loss`` and cumulative ``epsilon``;
* ``aggregate/<metric>``: the weighted aggregate of those, ``sites_trained`` and ``max_epsilon``;
* ``round/bytes_sent``, ``round/bytes_received``, ``round/wall_time_s``.

Every round is written by a writer opened for it with ``purge_step`` = that round, so a round that is
recorded again after a resume replaces what an interrupted run wrote for it and later rounds.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
SITE_SCALARS = ("balanced_accuracy", "accuracy", "auc", "sensitivity", "specificity", "loss", "train_loss",
                "epsilon")
AGGREGATE_SCALARS = (*SITE_SCALARS[:-1], "sites_trained", "max_epsilon")
ROUND_SCALARS = ("bytes_sent", "bytes_received", "wall_time_s")


def round_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """Tag -> value of one round's record (``server.run_recorder``); undefined values are left out."""
    scalars: dict[str, float] = {}
    for site, row in sorted(record.get("sites", {}).items()):
        for key in SITE_SCALARS:
            _put(scalars, f"{key}/{site}", row.get(key))
    for key in AGGREGATE_SCALARS:
        _put(scalars, f"aggregate/{key}", record.get("aggregate", {}).get(key))
    for key in ROUND_SCALARS:
        _put(scalars, f"round/{key}", record.get(key))
    return scalars


def write_round(run_dir: Path, record: Mapping[str, Any]) -> None:
    """Append one round's scalars to ``run_dir/tensorboard``; a failure is logged, never raised."""
    from torch.utils.tensorboard import SummaryWriter

    step = int(record["round"])
    try:
        with SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR), purge_step=step) as writer:
            for tag, value in round_scalars(record).items():
                writer.add_scalar(tag, value, global_step=step)
    except OSError as exc:
        logger.warning("could not write round %d to TensorBoard in %s: %s", step, run_dir / TENSORBOARD_DIR, exc)


def _put(scalars: dict[str, float], tag: str, value: Any) -> None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
        scalars[tag] = float(value)
