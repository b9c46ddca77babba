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
from matplotlib.ticker import MaxNLocator

from common.atomic_io import atomic_write_bytes

logger = logging.getLogger(__name__)

PLOT_FILES = {
    "balanced_accuracy": "balanced_accuracy.png",
    "epsilon": "epsilon.png",
    "train_loss": "training_loss.png",
    "privacy_utility": "privacy_utility.png",
}


def write_plots(
    metrics: Mapping[str, Any], out_dir: str | Path, *, references: Mapping[str, float] | None = None,
) -> list[Path]:
    """Write balanced accuracy and epsilon per site per round, training loss per round and, when the
    summary holds a privacy sweep, the privacy-utility curve.

    Parameters
    ----------
    metrics:
        A metrics.json document (``{"rounds": [...], "summary": {...}}``).
    out_dir:
        Directory for the PNG files (created if missing).
    references:
        Horizontal reference lines for the accuracy plot, label -> value (for example the best
        single-site alternative and the pooled ceiling).

    Returns the written files. Rounds or sites without a value leave gaps, not zeros. The black
    line is the unweighted mean over sites, the same mean as the report's headline table.
    """
    rounds = list(metrics.get("rounds", []))
    out_dir = Path(out_dir)
    accuracy = _per_site_figure(rounds, "balanced_accuracy", "Balanced accuracy per site", "balanced accuracy")
    axes = accuracy.axes[0]
    for (label, value), style in zip((references or {}).items(), ("--", ":", "-.")):
        axes.axhline(value, color="grey", linestyle=style, linewidth=1.5, label=f"{label} ({value:.3f})")
    if references:
        _legend_outside(axes)
    written = [
        _save(accuracy, out_dir / PLOT_FILES["balanced_accuracy"]),
        _save(
            _per_site_figure(rounds, "epsilon", "Privacy spent per site", "epsilon (cumulative)"),
            out_dir / PLOT_FILES["epsilon"],
        ),
        _save(
            _per_site_figure(rounds, "train_loss", "Training loss", "training loss"),
            out_dir / PLOT_FILES["train_loss"],
        ),
    ]
    sweep = metrics.get("summary", {}).get("privacy_utility")
    if sweep:
        written.append(_save(_privacy_utility_figure(sweep, references or {}), out_dir / PLOT_FILES["privacy_utility"]))
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


def _legend_outside(axes: Any) -> None:
    """Legend to the right of the plot, where it hides no line."""
    axes.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.02, 0.5))


def _per_site_figure(rounds: list[Mapping[str, Any]], key: str, title: str, ylabel: str) -> Figure:
    figure = Figure(figsize=(8.0, 4.0), dpi=100)
    axes = figure.add_subplot()
    series = _series(rounds, key)
    for site, (xs, ys) in series.items():
        axes.plot(xs, ys, marker="o", linewidth=1, label=site)
    means = []
    for record in rounds:
        values = [float(entry[key]) for entry in record.get("sites", {}).values()
                  if isinstance(entry.get(key), (int, float)) and entry[key] == entry[key]]
        if values:
            means.append((int(record["round"]), sum(values) / len(values)))
    if means:
        axes.plot(*zip(*means), color="black", linewidth=2, label="mean over sites")
    if not axes.lines:
        axes.text(0.5, 0.5, "no data recorded", ha="center", va="center", transform=axes.transAxes)
    else:
        _legend_outside(axes)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_title(title)
    axes.set_xlabel("round")
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    return figure


def _privacy_utility_figure(sweep: list[Mapping[str, Any]], references: Mapping[str, float]) -> Figure:
    """Mean per-site balanced accuracy against the target epsilon; DP off drawn at the right."""
    figure = Figure(figsize=(6.4, 4.0), dpi=100)
    axes = figure.add_subplot()
    points = sorted((float(p["epsilon"]), float(p["mean"])) for p in sweep
                    if p.get("epsilon") is not None and isinstance(p.get("mean"), (int, float)))
    labels = [f"{eps:g}" for eps, _ in points]
    xs = list(range(len(points)))
    ys = [mean for _, mean in points]
    off = [float(p["mean"]) for p in sweep if p.get("epsilon") is None and isinstance(p.get("mean"), (int, float))]
    if off:
        xs.append(len(points))
        ys.append(off[0])
        labels.append("DP off")
    axes.plot(xs, ys, marker="o", color="black", label="federated, personal models")
    for (label, value), style in zip(references.items(), ("--", ":", "-.")):
        axes.axhline(value, color="grey", linestyle=style, linewidth=1.5, label=f"{label} ({value:.3f})")
    axes.set_xticks(xs, labels)
    axes.set_title("Privacy-utility")
    axes.set_xlabel("target epsilon per site (whole federation)")
    axes.set_ylabel("mean per-site balanced accuracy")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    return figure


def _save(figure: Figure, path: Path) -> Path:
    buffer = io.BytesIO()
    FigureCanvasAgg(figure)
    figure.savefig(buffer, format="png", bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())
    return path
