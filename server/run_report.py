"""The one report writer: ``report.md``, the plots and the console lines of a run, real or simulated.

A run folder's ``metrics.json`` (``server.run_recorder``) is the single source. A real federation
(``fedtl-coordinator run``) and a simulation (``fedtl simulate``) both end here:

* :func:`format_round_line` is the line printed per completed round (sites trained, declined and
  dropped with the reason, the unweighted mean balanced accuracy, the largest epsilon, bytes, time);
* :func:`write_report` writes ``plots/`` and ``report.md`` from the document: the headline table (every
  row of ``summary`` named in :data:`SUMMARY_ROWS`, each site's value with its 95% interval where the
  row has one), the privacy guarantee (unit, epsilon, delta), traffic and time;
* :func:`summarize_federated_run` fills a real run's ``summary``/``per_site_final`` from its last
  evaluations: the federated row only (a real federation runs no baselines, and a site sends aggregate
  metrics, never per-patient results, so its cells carry no bootstrap interval).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from common.atomic_io import atomic_write_json, atomic_write_text
from server.report_plots import write_plots

REPORT_FILE = "report.md"
METRICS_FILE = "metrics.json"

SUMMARY_ROWS = (
    "federated", "federated_no_dp", "local_linear_probe", "local_linear_probe_finetune", "local_finetune",
    "pooled_ceiling",
    "local", "pooled", "random_init",
)
SINGLE_SITE_ROWS = ("local_linear_probe", "local_linear_probe_finetune", "local_finetune")
"""The rows of what a site could do alone (DP off: nothing leaves it); the best of them is the bar."""
GAIN_ROWS = ("federated", "federated_no_dp", "pooled_ceiling")
"""The rows whose difference from the best single-site row is reported (the ceiling's: the headroom)."""
ROW_LABELS = {
    "federated": "federated, personal models, DP on",
    "federated_no_dp": "federated, personal models, DP off",
    "local_linear_probe": "local linear probe (each site alone, DP off)",
    "local_linear_probe_finetune": "local linear probe, then its fine-tune (LP-FT, each site alone, DP off)",
    "local_finetune": "local fine-tuning (each site alone, DP off)",
    "pooled_ceiling": "pooled ceiling (all sites' data in one place, DP off)",
    "local": "local fine-tuning under the federation's DP budget",
    "pooled": "pooled under DP",
    "random_init": "federated, random init instead of pretrained",
}


# ------------------------------------------------------------------------------ figures
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


def comparison_targets(summary: Mapping[str, Any]) -> dict[str, Any]:
    """How the federated personal models compare with the best a site could do alone and the ceiling."""
    alone = [summary.get(k) for k in SINGLE_SITE_ROWS if isinstance(summary.get(k), float)]
    ceiling = summary.get("pooled_ceiling")
    if not alone:
        return {}
    best = max(alone)
    out: dict[str, Any] = {"best_single_site": best}
    for name in GAIN_ROWS:
        value = summary.get(name)
        if not isinstance(value, float):
            continue
        out[gain_key(name)] = value - best
        if name != "pooled_ceiling" and isinstance(ceiling, float) and ceiling > best:
            out[f"{name}_share_of_gap_to_ceiling"] = (value - best) / (ceiling - best)
    return out


def gain_key(row: str) -> str:
    """The summary key of ``row`` minus the best single-site row (a paired difference: same seed, same patients)."""
    return f"{row}_gain_over_best_single_site"


def seed_spread(values: Sequence[float]) -> dict[str, Any]:
    """A value's mean, sample standard deviation and every seed's value (``summary.over_seeds``)."""
    return {"seeds": len(values), "mean": statistics.fmean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else 0.0, "values": list(values)}


def privacy_summary(config: Mapping[str, Any], summary: Mapping[str, Any]) -> dict[str, Any]:
    """The guarantee a report states: unit, target epsilon, the largest delta the sites reported."""
    privacy = config.get("privacy", {})
    return {"unit": privacy.get("unit", "image"), "target_epsilon": privacy.get("target_epsilon"),
            "max_delta": summary.get("max_delta"), "enabled": bool(privacy.get("enabled"))}


def summarize_federated_run(metrics: dict[str, Any]) -> dict[str, Any]:
    """A real run's report rows: each site's last evaluation of its personal model is the federated row."""
    per_site = {site: dict(row) for site, row in final_site_metrics(metrics).items()}
    summary = dict(metrics.get("summary", {}))
    summary["federated"] = mean_balanced_accuracy(per_site)
    summary["privacy"] = privacy_summary(metrics.get("config", {}), summary)
    metrics["summary"] = summary
    metrics["per_site_final"] = {"federated": per_site}
    return metrics


# ----------------------------------------------------------------------------- console
def _round_mean(record: Mapping[str, Any]) -> float | None:
    return mean_balanced_accuracy({site: row for site, row in record.get("sites", {}).items()
                                   if row.get("eval_status", "ok") == "ok"})


def format_round_line(record: Mapping[str, Any]) -> str:
    """One line per completed round: what trained, what did not and why, accuracy, privacy, traffic, time."""
    sites = record.get("sites", {})
    trained = sorted(site for site, row in sites.items() if row.get("status") == "ok"
                     and site not in {d.get("site") for d in record.get("dropped", [])})
    declined = sorted(f"{site} ({row['status']})" for site, row in sites.items()
                      if str(row.get("status", "")).startswith("declined"))
    dropped = [f"{d.get('site')}: {d.get('reason')}" for d in record.get("dropped", [])]
    mean = _round_mean(record)
    epsilons = [row["epsilon"] for row in sites.values() if isinstance(row.get("epsilon"), (int, float))]
    sent, received = int(record.get("bytes_sent") or 0), int(record.get("bytes_received") or 0)
    parts = [
        f"round {record.get('round', '?'):>3}",
        f"{len(trained)} trained" + (f" ({', '.join(trained)})" if trained else ""),
        f"declined {', '.join(declined)}" if declined else "none declined",
        f"dropped {len(dropped)}" + (f" [{'; '.join(dropped)}]" if dropped else ""),
        *([f"clipped {', '.join(str(c.get('site')) for c in record['clipped'])}"] if record.get("clipped") else []),
        f"mean balanced acc. {mean:.3f}" if mean is not None else "mean balanced acc. -",
        f"max epsilon {max(epsilons):.2f}" if epsilons else "max epsilon -",
        f"{_megabytes(sent)} out / {_megabytes(received)} in",
        f"{float(record.get('wall_time_s') or 0.0):.1f} s",
    ]
    return " | ".join(parts)


def _megabytes(count: int) -> str:
    return f"{count / 1e6:.1f} MB"


# ------------------------------------------------------------------------------ report
def _cell(row: Mapping[str, Any] | None) -> str:
    if not row or not isinstance(row.get("balanced_accuracy"), (int, float)):
        return "-"
    low, high = row.get("ci_low"), row.get("ci_high")
    if isinstance(low, (int, float)) and isinstance(high, (int, float)) and not math.isnan(low):
        return f"{row['balanced_accuracy']:.3f} [{low:.2f}, {high:.2f}]"
    return f"{row['balanced_accuracy']:.3f}"


def _row_label(name: str, metrics: Mapping[str, Any]) -> str:
    if name == "federated" and not metrics.get("config", {}).get("privacy", {}).get("enabled", True):
        return "federated, personal models, DP off"  # the headline run itself had DP off
    return ROW_LABELS[name]


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
        lines.append(f"| {_row_label(name, metrics)} | {shown} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _gains_over_seeds(over_seeds: Mapping[str, Any]) -> list[str]:
    """One line per row: its difference from the best single-site row at every seed.

    The hospitals and test patients are the same at every seed, so this spread is the seed's (training and
    the synthetic-public backbone's pretraining); the test set's uncertainty is in the per-site intervals."""
    lines = []
    for name in GAIN_ROWS:
        spread = over_seeds.get(gain_key(name))
        if not spread:
            continue
        shown = ", ".join(f"{value:+.3f}" for value in spread["values"])
        lines.append(f"- {ROW_LABELS[name]} minus the best alone, over {spread['seeds']} seeds: {shown} "
                     f"(mean {spread['mean']:+.3f} ± {spread['sd']:.3f})")
    return lines


def _format_delta(delta: Any) -> str:
    return f"{delta:.3g}" if isinstance(delta, (int, float)) else "(not reported)"


def _has_intervals(metrics: Mapping[str, Any]) -> bool:
    return any(isinstance(row.get("ci_low"), (int, float))
               for rows in metrics.get("per_site_final", {}).values() for row in rows.values())


def format_report(metrics: Mapping[str, Any], plots: Sequence[Path], extra_lines: Iterable[str] = ()) -> str:
    """``report.md`` of a run: settings, privacy guarantee, traffic, the headline table, comparisons."""
    config = metrics.get("config", {})
    summary = metrics.get("summary", {})
    backbone = metrics.get("backbone", {})
    privacy = config.get("privacy", {})
    unit = ("one patient (all of a patient's images)" if privacy.get("unit", "image") == "patient"
            else "one image (a patient with k images: about k x epsilon)")
    dp = (f"DP on: target epsilon {privacy.get('target_epsilon')} per site for the whole federation, "
          f"unit of privacy {unit}, delta at most {_format_delta(summary.get('max_delta'))}"
          if privacy.get("enabled") else "DP off")
    intervals = ("with each site's 95% bootstrap interval over its test patients" if _has_intervals(metrics) else
                 "(no intervals: a site sends its test metrics, never per-patient results)")
    lines = [
        f"# fedtl report: {config.get('name', 'run')}",
        "",
        f"- model: {config.get('model', {}).get('architecture')} at {config.get('model', {}).get('image_size')} px, "
        f"strategy {config.get('strategy', {}).get('name')}, {summary.get('rounds_completed')} round(s); {dp}",
        f"- sites: {metrics.get('sites', 'the hospitals that took part')}",
        f"- backbone: {backbone.get('source')} (fingerprint {str(backbone.get('fingerprint'))[:16]})",
        f"- largest epsilon spent by a site: {summary.get('max_epsilon')}",
        f"- bytes sent / received by the coordinator: {summary.get('total_bytes_sent')} / "
        f"{summary.get('total_bytes_received')}; wall time {summary.get('total_wall_time_s', 0):.1f} s",
        "",
        "Mean per-site test balanced accuracy (each site's own held-out patients; every site counts once),",
        f"{intervals}. Every row ends with each site fitting its own personal head (a class-balanced",
        "linear probe) on its own training patients.",
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
        lines += _gains_over_seeds(summary.get("over_seeds", {}))
    sweep = summary.get("privacy_utility")
    if sweep:
        shown = ", ".join(f"{'DP off' if p['epsilon'] is None else 'epsilon ' + format(p['epsilon'], 'g')}: "
                          f"{p['mean']:.3f}" for p in sweep if isinstance(p.get("mean"), (int, float)))
        lines.append(f"- privacy-utility (federated personal models, mean): {shown}")
    dropped = [(record.get("round"), d) for record in metrics.get("rounds", []) for d in record.get("dropped", [])]
    if dropped:
        lines += ["", "Updates left out (round, site: reason):", ""]
        lines += [f"- round {r}, {d.get('site')}: {d.get('reason')}" for r, d in dropped]
    lines += ["", *extra_lines, "Plots: " + ", ".join(p.name for p in plots), ""]
    return "\n".join(lines)


def write_report(run_dir: Path, metrics: Mapping[str, Any], extra_lines: Iterable[str] = ()) -> Path:
    """Write ``run_dir/plots/*.png`` and ``run_dir/report.md`` from a metrics document; returns the report."""
    summary = metrics.get("summary", {})
    references = {}
    if isinstance(summary.get("best_single_site"), float):
        references["best single site alone"] = summary["best_single_site"]
    if isinstance(summary.get("pooled_ceiling"), float):
        references["pooled ceiling"] = summary["pooled_ceiling"]
    plots = write_plots(metrics, run_dir / "plots", references=references)
    path = run_dir / REPORT_FILE
    atomic_write_text(path, format_report(metrics, plots, extra_lines))
    return path


def write_federated_run_report(run_dir: Path) -> Path:
    """After a real run's round: add the federated row to ``metrics.json`` and rewrite the report and plots."""
    path = run_dir / METRICS_FILE
    metrics = summarize_federated_run(json.loads(path.read_text(encoding="utf-8")))
    atomic_write_json(path, metrics)
    return write_report(run_dir, metrics)
