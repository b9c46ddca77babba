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
from pathlib import Path
from typing import Any, Mapping

from common.atomic_io import atomic_write_json
from common.config import FederationConfig
from server.backbone_source import prepare_backbone
from server.run_report import (
    GAIN_ROWS,
    SUMMARY_ROWS,
    comparison_targets,
    gain_key,
    mean_balanced_accuracy,
    privacy_summary,
    seed_spread,
    write_report,
)
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

PRIVACY_SWEEP = (1.0, 3.0, 8.0)


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
    ``seeds/seed-N``: same hospitals and patient split; other backbone pretraining, initialisation, sampling
    and noise) and the summary gains each row's mean and spread over seeds, and so does each row's
    difference from the best single-site row (paired: the same seed's run of both).
    """
    sites = dict(sites) if sites is not None else resolve_sites(plan)
    metrics = _run_one_seed(plan, sites, baselines=baselines, privacy_sweep=privacy_sweep, extra_rows=extra_rows)
    if seeds > 1:
        tracked = [*SUMMARY_ROWS, *(gain_key(name) for name in GAIN_ROWS)]
        values: dict[str, list[float]] = {name: [metrics["summary"][name]] for name in tracked
                                          if isinstance(metrics["summary"].get(name), (int, float))}
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
                if name in values and isinstance(value, (int, float)):
                    values[name].append(value)
        metrics["summary"]["over_seeds"] = {name: seed_spread(series) for name, series in values.items()}
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
        if plan.config.training.personal_finetune_epochs:
            per_variant["local_linear_probe_finetune"] = run_local_linear_probe(plan.config, sites, backbone,
                                                                                baseline_dir, finetune=True)
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
    summary.update(comparison_targets(summary))
    summary["privacy"] = privacy_summary(metrics.get("config", {}), summary)
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


def _write(plan: SimulationPlan, metrics: dict[str, Any]) -> None:
    atomic_write_json(plan.run_dir / "metrics.json", metrics)
    write_report(plan.run_dir, metrics, extra_lines=format_site_use(metrics))


def _snake(rows: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    return {site: {key.replace("-", "_"): value for key, value in row.items()} for site, row in rows.items()}


def load_metrics(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "metrics.json").read_text())
