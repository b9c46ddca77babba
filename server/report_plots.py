"""PNG plots of a run from its ``metrics.json`` document (see ``server.run_recorder``).

Uses matplotlib's object API with the Agg canvas, so no display and no global backend
switch are needed; files are written atomically.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from common.atomic_io import atomic_write_bytes

logger = logging.getLogger(__name__)

PLOT_FILES = {
    "balanced_accuracy": "balanced_accuracy.png",
    "epsilon": "epsilon.png",
    "train_loss": "training_loss.png",
}


def write_plots(metrics: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
    """Write balanced accuracy and epsilon per site per round, and training loss per round.

    Parameters
    ----------
    metrics:
        A metrics.json document (``{"rounds": [...], ...}``).
    out_dir:
        Directory for the PNG files (created if missing).

    Returns the written files. Rounds or sites without a value leave gaps, not zeros.
    """
    rounds = list(metrics.get("rounds", []))
    out_dir = Path(out_dir)
    written = [
        _save(
            _per_site_figure(rounds, "balanced_accuracy", "Balanced accuracy per site", "balanced accuracy"),
            out_dir / PLOT_FILES["balanced_accuracy"],
        ),
        _save(
            _per_site_figure(rounds, "epsilon", "Privacy spent per site", "epsilon (cumulative)"),
            out_dir / PLOT_FILES["epsilon"],
        ),
        _save(
            _per_site_figure(rounds, "train_loss", "Training loss", "training loss"),
            out_dir / PLOT_FILES["train_loss"],
        ),
    ]
    logger.info("wrote %d plots to %s", len(written), out_dir)
    return written


def _series(rounds: list[Mapping[str, Any]], key: str) -> dict[str, tuple[list[int], list[float]]]:
    """Per-site (rounds, values) for ``key``, skipping missing values."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for record in rounds:
        for site, entry in record.get("sites", {}).items():
            value = entry.get(key)
            if isinstance(value, (int, float)):
                xs, ys = series.setdefault(site, ([], []))
                xs.append(int(record["round"]))
                ys.append(float(value))
    return dict(sorted(series.items()))


def _per_site_figure(rounds: list[Mapping[str, Any]], key: str, title: str, ylabel: str) -> Figure:
    figure = Figure(figsize=(6.4, 4.0), dpi=100)
    axes = figure.add_subplot()
    for site, (xs, ys) in _series(rounds, key).items():
        axes.plot(xs, ys, marker="o", linewidth=1, label=site)
    aggregate = [
        (int(r["round"]), float(r["aggregate"][key]))
        for r in rounds
        if isinstance(r.get("aggregate", {}).get(key), (int, float))
    ]
    if aggregate:
        axes.plot(*zip(*aggregate), color="black", linewidth=2, label="weighted mean")
    if not axes.lines:
        axes.text(0.5, 0.5, "no data recorded", ha="center", va="center", transform=axes.transAxes)
    else:
        axes.legend(fontsize="small")
    axes.set_title(title)
    axes.set_xlabel("round")
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    return figure


def _save(figure: Figure, path: Path) -> Path:
    buffer = io.BytesIO()
    FigureCanvasAgg(figure)
    figure.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())
    return path
