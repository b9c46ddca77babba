"""The research loop: does joining the federation beat what each site could do alone?

``run_experiment`` runs the federation through Flower's simulation runtime, its variants (DP off,
random initialisation, the privacy sweep at epsilon 1 and 3) the same way, and the single-site
alternatives and the pooled ceiling on the same data and splits (``simulations.baselines``). Every
row ends with each site fitting its personal head on its own training patients. It writes the
summary (unweighted mean per row, per-site 95% patient-bootstrap intervals, spread over seeds)
into the main run's metrics.json, a report.md table and the plots.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import statistics
from pathlib import Path
from typing import Any, Mapping

from common.atomic_io import atomic_write_json, atomic_write_text
from common.config import FederationConfig
from server.backbone_source import prepare_backbone
from server.report_plots import write_plots
from simulations.baselines import (
    SiteResults,
    evaluate_federated_sites,
    run_local_finetune,
    run_local_linear_probe,
    run_local_only,
    run_pooled,
    run_pooled_ceiling,
    without_dp,
)
from client.site_settings import SiteSettings
from simulations.simulate import SimulationPlan, run_federated
from simulations.site_sources import describe_sites, resolve_sites
from simulations.site_use_report import format_site_use, site_use_section

logger = logging.getLogger(__name__)

SUMMARY_ROWS = (
    "federated", "federated_no_dp", "local_linear_probe", "local_finetune", "pooled_ceiling",
    "local", "pooled", "random_init",
)
ROW_LABELS = {
    "federated": "federated, personal models, DP on",
    "federated_no_dp": "federated, personal models, DP off",
    "local_linear_probe": "local linear probe (each site alone, DP off)",
    "local_finetune": "local fine-tuning (each site alone, DP off)",
    "pooled_ceiling": "pooled ceiling (all sites' data in one place, DP off)",
    "local": "local fine-tuning under the federation's DP budget",
    "pooled": "pooled under DP",
    "random_init": "federated, random init instead of pretrained",
}
PRIVACY_SWEEP = (1.0, 3.0, 8.0)


def final_site_metrics(metrics: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Each site's metrics at the last round it was evaluated."""
    latest: dict[str, dict[str, Any]] = {}
    for record in metrics.get("rounds", []):
        for site, row in record.get("sites", {}).items():
            if isinstance(row.get("balanced_accuracy"), (int, float)):
                latest[site] = row
    return latest


def mean_balanced_accuracy(per_site: Mapping[str, Mapping[str, Any]]) -> float | None:
    """Unweighted mean over sites (every hospital counts once, whatever its size)."""
    values = [float(row["balanced_accuracy"]) for row in per_site.values()
              if isinstance(row.get("balanced_accuracy"), (int, float)) and not math.isnan(row["balanced_accuracy"])]
    return sum(values) / len(values) if values else None


def _with_config(plan: SimulationPlan, config: FederationConfig, folder: str, **changes: Any) -> SimulationPlan:
    return dataclasses.replace(plan, config=config, run_dir=plan.run_dir / "variants" / folder,
                               cache_root=plan.cache_dir, resume=False, **changes)


def _federated_variant(plan: SimulationPlan, variant: SimulationPlan, sites: Mapping[int, Any]) -> SiteResults:
    variant_sites = {i: dataclasses.replace(s, state_dir=variant.run_dir / "sites" / s.site_name)
                     for i, s in sites.items()}
    run_federated(variant, variant_sites)
    backbone = prepare_backbone(variant.config, plan.cache_dir, random_init=variant.random_init)
    return evaluate_federated_sites(variant.config, variant_sites, backbone)


def run_experiment(plan: SimulationPlan, *, baselines: bool = True, privacy_sweep: bool = False,
                   extra_rows: bool = False,
                   seeds: int = 1, sites: Mapping[int, SiteSettings] | None = None) -> dict[str, Any]:
    """Run everything for one report; returns the main run's metrics.json as written.

    ``sites`` (default: ``simulations.site_sources.resolve_sites(plan)``) are used by every row,
    variant and seed; each keeps its state in its own run folder.

    With ``seeds > 1`` the whole comparison runs again for seeds ``seed + 1 ...`` (each in
    ``seeds/seed-N``, same hospitals, other initialisation, sampling and noise) and the summary gains
    each row's mean and spread over seeds.
    """
    sites = dict(sites) if sites is not None else resolve_sites(plan)
    metrics = _run_one_seed(plan, sites, baselines=baselines, privacy_sweep=privacy_sweep, extra_rows=extra_rows)
    if seeds > 1:
        means: dict[str, list[float]] = {name: [v] for name, v in metrics["summary"].items()
                                         if name in SUMMARY_ROWS and isinstance(v, (int, float))}
        for offset in range(1, seeds):
            seed = plan.config.seed + offset
            seeded = dataclasses.replace(plan, config=plan.config.model_copy(update={"seed": seed}),
                                         run_dir=plan.run_dir / "seeds" / f"seed-{seed}", cache_root=plan.cache_dir,
                                         resume=False)
            seeded_sites = {i: dataclasses.replace(s, state_dir=seeded.run_dir / "sites" / s.site_name)
                            for i, s in sites.items()}
            other = _run_one_seed(seeded, seeded_sites, baselines=baselines, privacy_sweep=False,
                                  extra_rows=extra_rows)
            for name, value in other["summary"].items():
                if name in means and isinstance(value, (int, float)):
                    means[name].append(value)
        metrics["summary"]["over_seeds"] = {
            name: {"seeds": len(values), "mean": statistics.fmean(values),
                   "sd": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}
            for name, values in means.items()
        }
        _write(plan, metrics)
    return metrics


def _run_one_seed(plan: SimulationPlan, sites: dict[int, SiteSettings], *, baselines: bool,
                  privacy_sweep: bool, extra_rows: bool = False) -> dict[str, Any]:
    metrics = run_federated(plan, sites)
    backbone = prepare_backbone(plan.config, plan.cache_dir, random_init=plan.random_init)
    per_variant: dict[str, SiteResults] = {"federated": evaluate_federated_sites(plan.config, sites, backbone)}
    sweep: list[dict[str, Any]] = []
    if baselines:
        no_dp = without_dp(plan.config)
        per_variant["federated_no_dp"] = _federated_variant(plan, _with_config(plan, no_dp, "no-dp"), sites)
        baseline_dir = plan.run_dir / "baselines"
        per_variant["local_linear_probe"] = run_local_linear_probe(plan.config, sites, backbone, baseline_dir)
        per_variant["local_finetune"] = run_local_finetune(plan.config, sites, backbone, baseline_dir)
        per_variant["pooled_ceiling"] = run_pooled_ceiling(plan.config, sites, backbone, baseline_dir)
    if baselines and extra_rows:  # three more DP trainings: pretrained vs random init, alone and pooled under DP
        per_variant["random_init"] = _federated_variant(
            plan, _with_config(plan, plan.config, "random-init", random_init=True), sites)
        if plan.config.privacy.enabled:
            per_variant["local"] = run_local_only(plan.config, sites, backbone, baseline_dir)
            per_variant["pooled"] = run_pooled(plan.config, sites, backbone, baseline_dir)
    if baselines and privacy_sweep and plan.config.privacy.enabled:
        sweep = _privacy_sweep(plan, sites, per_variant)
    summary = dict(metrics.get("summary", {}))
    for name in SUMMARY_ROWS:
        if name in per_variant:
            summary[name] = mean_balanced_accuracy(_snake(per_variant[name]))
    summary.update(_targets(summary))
    summary["privacy"] = {"unit": plan.config.privacy.unit, "target_epsilon": plan.config.privacy.target_epsilon,
                          "max_delta": summary.get("max_delta"), "enabled": plan.config.privacy.enabled}
    if sweep:
        summary["privacy_utility"] = sweep
    metrics["summary"] = summary
    metrics["per_site_final"] = {name: _snake(rows) for name, rows in per_variant.items()}
    metrics["sites"] = describe_sites(plan)
    metrics["site_use"] = site_use_section(plan.run_dir, sites)  # each site's operating point and saliency
    _write(plan, metrics)
    return metrics


def _privacy_sweep(plan: SimulationPlan, sites: Mapping[int, Any],
                   per_variant: Mapping[str, SiteResults]) -> list[dict[str, Any]]:
    """Mean per-site balanced accuracy of the federated personal models at epsilon 1, 3, 8 and DP off."""
    points = []
    for epsilon in PRIVACY_SWEEP:
        if epsilon == plan.config.privacy.target_epsilon:
            rows = per_variant["federated"]
        else:
            config = plan.config.model_copy(update={"privacy": plan.config.privacy.model_copy(
                update={"target_epsilon": epsilon})})
            rows = _federated_variant(plan, _with_config(plan, config, f"epsilon-{epsilon:g}"), sites)
        points.append({"epsilon": epsilon, "mean": mean_balanced_accuracy(_snake(rows))})
    points.append({"epsilon": None, "mean": mean_balanced_accuracy(_snake(per_variant["federated_no_dp"]))})
    return points


def _targets(summary: Mapping[str, Any]) -> dict[str, Any]:
    """How the federated personal models compare with the best a site could do alone and the ceiling."""
    alone = [summary.get(k) for k in ("local_linear_probe", "local_finetune") if isinstance(summary.get(k), float)]
    ceiling = summary.get("pooled_ceiling")
    if not alone:
        return {}
    best = max(alone)
    out: dict[str, Any] = {"best_single_site": best}
    for name in ("federated", "federated_no_dp"):
        value = summary.get(name)
        if not isinstance(value, float):
            continue
        out[f"{name}_gain_over_best_single_site"] = value - best
        if isinstance(ceiling, float) and ceiling > best:
            out[f"{name}_share_of_gap_to_ceiling"] = (value - best) / (ceiling - best)
    return out


def _write(plan: SimulationPlan, metrics: dict[str, Any]) -> None:
    atomic_write_json(plan.run_dir / "metrics.json", metrics)
    summary = metrics["summary"]
    references = {}
    if isinstance(summary.get("best_single_site"), float):
        references["best single site alone"] = summary["best_single_site"]
    if isinstance(summary.get("pooled_ceiling"), float):
        references["pooled ceiling"] = summary["pooled_ceiling"]
    plots = write_plots(metrics, plan.run_dir / "plots", references=references)
    atomic_write_text(plan.run_dir / "report.md", format_report(metrics, plots))


def _snake(rows: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    return {site: {key.replace("-", "_"): value for key, value in row.items()} for site, row in rows.items()}


def _cell(row: Mapping[str, Any] | None) -> str:
    if not row or not isinstance(row.get("balanced_accuracy"), (int, float)):
        return "-"
    low, high = row.get("ci_low"), row.get("ci_high")
    if isinstance(low, (int, float)) and isinstance(high, (int, float)) and not math.isnan(low):
        return f"{row['balanced_accuracy']:.3f} [{low:.2f}, {high:.2f}]"
    return f"{row['balanced_accuracy']:.3f}"


def format_table(metrics: Mapping[str, Any]) -> str:
    """The headline table: mean per-site test balanced accuracy, and per site with its 95% interval."""
    per_site = metrics.get("per_site_final", {})
    summary = metrics.get("summary", {})
    over_seeds = summary.get("over_seeds", {})
    sites = sorted({site for rows in per_site.values() for site in rows})
    header = "| setting | mean balanced acc. | " + " | ".join(sites) + " |"
    lines = [header, "|" + "---|" * (len(sites) + 2)]
    for name in SUMMARY_ROWS:
        if name not in per_site:
            continue
        mean = summary.get(name)
        shown = f"{mean:.3f}" if isinstance(mean, (int, float)) else "-"
        if name in over_seeds:
            spread = over_seeds[name]
            shown += f" (over {spread['seeds']} seeds: {spread['mean']:.3f} ± {spread['sd']:.3f})"
        cells = [_cell(per_site[name].get(site)) for site in sites]
        lines.append(f"| {ROW_LABELS[name]} | {shown} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _format_delta(delta: Any) -> str:
    return f"{delta:.3g}" if isinstance(delta, (int, float)) else "(not reported)"


def format_report(metrics: Mapping[str, Any], plots: list[Path]) -> str:
    config = metrics.get("config", {})
    summary = metrics.get("summary", {})
    backbone = metrics.get("backbone", {})
    privacy = config.get("privacy", {})
    unit = ("one patient (all of a patient's images)" if privacy.get("unit", "image") == "patient"
            else "one image (a patient with k images: about k x epsilon)")
    dp = (f"DP on: target epsilon {privacy.get('target_epsilon')} per site for the whole federation, "
          f"unit of privacy {unit}, delta at most {_format_delta(summary.get('max_delta'))}"
          if privacy.get("enabled") else "DP off")
    lines = [
        f"# fedtl report: {config.get('name', 'run')}",
        "",
        f"- model: {config.get('model', {}).get('architecture')} at {config.get('model', {}).get('image_size')} px, "
        f"strategy {config.get('strategy', {}).get('name')}, {summary.get('rounds_completed')} round(s); {dp}",
        f"- sites: {metrics.get('sites', 'synthetic hospitals')}",
        f"- backbone: {backbone.get('source')} (fingerprint {str(backbone.get('fingerprint'))[:16]})",
        f"- largest epsilon spent by a site: {summary.get('max_epsilon')}",
        f"- bytes sent / received by the coordinator: {summary.get('total_bytes_sent')} / "
        f"{summary.get('total_bytes_received')}; wall time {summary.get('total_wall_time_s', 0):.1f} s",
        "",
        "Mean per-site test balanced accuracy (each site's own held-out patients; every site counts once),",
        "with each site's 95% bootstrap interval over its test patients. Every row ends with each site",
        "fitting its own personal head (a class-balanced linear probe) on its own training patients.",
        "",
        format_table(metrics),
        "",
    ]
    if isinstance(summary.get("best_single_site"), float):
        gain = summary.get("federated_gain_over_best_single_site")
        share = summary.get("federated_share_of_gap_to_ceiling")
        lines.append(f"- best a site could do alone (the larger of linear probe and fine-tuning): "
                     f"{summary['best_single_site']:.3f}; federated (DP on) "
                     f"{'-' if gain is None else f'{gain:+.3f}'} against it"
                     + (f", {share:.0%} of the way to the pooled ceiling" if isinstance(share, float) else ""))
    sweep = summary.get("privacy_utility")
    if sweep:
        shown = ", ".join(f"{'DP off' if p['epsilon'] is None else 'epsilon ' + format(p['epsilon'], 'g')}: "
                          f"{p['mean']:.3f}" for p in sweep if isinstance(p.get("mean"), (int, float)))
        lines.append(f"- privacy-utility (federated personal models, mean): {shown}")
    lines += ["", *format_site_use(metrics), "Plots: " + ", ".join(p.name for p in plots), ""]
    return "\n".join(lines)


def load_metrics(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "metrics.json").read_text())
