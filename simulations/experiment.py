"""The research loop: federated vs local vs pooled, with and without DP, pretrained vs random.

``run_experiment`` runs the federation through Flower's simulation runtime, the two federated
variants (DP off, random initialisation) the same way, and the local-only and pooled baselines
on the same data and splits; it then writes the summary into the main run's metrics.json, a
report.md table and the plots.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping

from common.atomic_io import atomic_write_json, atomic_write_text
from server.backbone_source import prepare_backbone
from server.report_plots import write_plots
from simulations.baselines import run_local_only, run_pooled
from simulations.simulate import SimulationPlan, run_federated, synthetic_sites

logger = logging.getLogger(__name__)

SUMMARY_ROWS = ("pooled", "local", "federated", "federated_no_dp", "random_init")
ROW_LABELS = {
    "pooled": "pooled (all sites' data in one place)",
    "local": "local only (each site alone)",
    "federated": "federated",
    "federated_no_dp": "federated, DP off",
    "random_init": "federated, random init instead of pretrained",
}


def final_site_metrics(metrics: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Each site's metrics at the last round it was evaluated."""
    latest: dict[str, dict[str, Any]] = {}
    for record in metrics.get("rounds", []):
        for site, row in record.get("sites", {}).items():
            if isinstance(row.get("balanced_accuracy"), (int, float)):
                latest[site] = row
    return latest


def mean_balanced_accuracy(per_site: Mapping[str, Mapping[str, Any]]) -> float | None:
    values = [float(row["balanced_accuracy"]) for row in per_site.values()
              if isinstance(row.get("balanced_accuracy"), (int, float)) and not math.isnan(row["balanced_accuracy"])]
    return sum(values) / len(values) if values else None


def run_experiment(plan: SimulationPlan, *, baselines: bool = True) -> dict[str, Any]:
    """Run everything for one report; returns the main run's metrics.json as written."""
    sites = synthetic_sites(plan)
    metrics = run_federated(plan, sites)
    per_variant: dict[str, dict[str, dict[str, Any]]] = {"federated": final_site_metrics(metrics)}
    if baselines:
        variants = {
            "federated_no_dp": dataclasses.replace(
                plan, run_dir=plan.run_dir / "variants" / "no-dp", cache_root=plan.cache_dir, resume=False,
                config=plan.config.model_copy(update={"privacy": plan.config.privacy.model_copy(update={"enabled": False})})),
            "random_init": dataclasses.replace(
                plan, run_dir=plan.run_dir / "variants" / "random-init", cache_root=plan.cache_dir, resume=False,
                random_init=True),
        }
        for name, variant in variants.items():
            variant_sites = {i: dataclasses.replace(s, state_dir=variant.run_dir / "sites" / s.site_name)
                             for i, s in sites.items()}
            per_variant[name] = final_site_metrics(run_federated(variant, variant_sites))
        backbone = prepare_backbone(plan.config, plan.cache_dir)
        baseline_dir = plan.run_dir / "baselines"
        per_variant["local"] = run_local_only(plan.config, sites, backbone, baseline_dir)
        per_variant["pooled"] = run_pooled(plan.config, sites, backbone, baseline_dir)
    summary = dict(metrics.get("summary", {}))
    for name in SUMMARY_ROWS:
        if name in per_variant:
            summary[name] = mean_balanced_accuracy(_snake(per_variant[name]))
    metrics["summary"] = summary
    metrics["per_site_final"] = {name: _snake(rows) for name, rows in per_variant.items()}
    atomic_write_json(plan.run_dir / "metrics.json", metrics)
    plots = write_plots(metrics, plan.run_dir / "plots")
    atomic_write_text(plan.run_dir / "report.md", format_report(metrics, plots))
    return metrics


def _snake(rows: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    return {site: {key.replace("-", "_"): value for key, value in row.items()} for site, row in rows.items()}


def format_table(metrics: Mapping[str, Any]) -> str:
    """The headline table: mean per-site test balanced accuracy, and per site."""
    per_site = metrics.get("per_site_final", {})
    sites = sorted({site for rows in per_site.values() for site in rows})
    header = "| setting | mean balanced acc. | " + " | ".join(sites) + " |"
    lines = [header, "|" + "---|" * (len(sites) + 2)]
    for name in SUMMARY_ROWS:
        if name not in per_site:
            continue
        mean = metrics["summary"].get(name)
        cells = []
        for site in sites:
            value = per_site[name].get(site, {}).get("balanced_accuracy")
            cells.append(f"{value:.3f}" if isinstance(value, (int, float)) else "-")
        lines.append(f"| {ROW_LABELS[name]} | {mean:.3f} | " + " | ".join(cells) + " |" if mean is not None
                     else f"| {ROW_LABELS[name]} | - | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_report(metrics: Mapping[str, Any], plots: list[Path]) -> str:
    config = metrics.get("config", {})
    summary = metrics.get("summary", {})
    backbone = metrics.get("backbone", {})
    privacy = config.get("privacy", {})
    dp = (f"DP on: target epsilon {privacy.get('target_epsilon')} per site for the whole federation"
          if privacy.get("enabled") else "DP off")
    lines = [
        f"# fedtl report: {config.get('name', 'run')}",
        "",
        f"- model: {config.get('model', {}).get('architecture')} at {config.get('model', {}).get('image_size')} px, "
        f"strategy {config.get('strategy', {}).get('name')}, {summary.get('rounds_completed')} round(s); {dp}",
        f"- backbone: {backbone.get('source')} (fingerprint {str(backbone.get('fingerprint'))[:16]})",
        f"- largest epsilon spent by a site: {summary.get('max_epsilon')}",
        f"- bytes sent / received by the coordinator: {summary.get('total_bytes_sent')} / "
        f"{summary.get('total_bytes_received')}; wall time {summary.get('total_wall_time_s', 0):.1f} s",
        "",
        "Mean per-site test balanced accuracy (each site's own held-out patients). Local and pooled use the",
        "same backbone, splits and DP settings as the federation.",
        "",
        format_table(metrics),
        "",
        "Plots: " + ", ".join(p.name for p in plots),
        "",
    ]
    return "\n".join(lines)


def load_metrics(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "metrics.json").read_text())
