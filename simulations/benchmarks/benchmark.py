"""``make bench``: fedtl's client path against the plain Flower + Opacus recipe (issue 7).

One run measures, on the same model, the same synthetic data and the same DP settings
(noise multiplier planned once for the federation, same clipping bound, Poisson sampling):

* local fine-tuning throughput (images/s) and peak memory of
  (a) the plain recipe (whole model forward every step, Opacus hooks mode),
  (b) fedtl's client path (frozen trunk computed once, shipping ``train_tail`` with ghost
      clipping, fedtl's convolution norm samplers and the pruned ghost backward of
      ``client.dp.ghost_clipping``), steady state and amortised over the planned epochs, with the
      one-off trunk cost and the site's one-off noise plan on their own lines (the round's own
      budget work, reserving steps and recording epsilon, stays timed), and a check that its
      clipped gradients equal those of Opacus' stock ghost backward,
  (c) fedtl non-private (the same path with DP off);
  every mode runs in a fresh process (``simulations.benchmarks.bench_training``) so its memory peak is its
  own, and the mode cycle is repeated (best of ``--repeats``) because other processes add noise;
* where a DP step spends its time, Opacus' stock ghost backward next to the shipping one
  (``simulations.benchmarks.bench_dp_profile``);
* bytes per site per round, full-model fp32 FedAvg against fedtl (fp32/fp16/int8 both ways,
  the downlink a delta from the site's copy, once per round) (``simulations.benchmarks.bench_traffic``),
  for the benchmark policy and the architecture's default;
* the coordinator's share of a round for 10, 25 and 50 sites, with a linear fit
  (``simulations.benchmarks.bench_coordinator``);
* whole simulated rounds (Flower simulation on Ray) of 10, 25 and 50 hospitals, with a linear
  fit (``simulations.benchmarks.bench_site_scaling``);
* real rounds: three hospitals on loopback (coordinator, gate, TLS, SuperNodes, the production apps),
  per-round wall times and where the slowest site's messages spend them, with the long-lived ClientApp
  worker and with Flower's process per message, beside the same federation simulated
  (``simulations.benchmarks.bench_real_rounds``);
* the patient unit's DP step, per-patient ghost norms against per-image gradients summed per patient
  (``simulations.benchmarks.bench_patient_unit``);
* ``fedtl-hospital predict`` throughput (images/s, DICOM to probabilities, and the model alone) on the
  CPU at the demo's size and, when CUDA is available, on the GPU at 224 px
  (``simulations.benchmarks.bench_predict``);
* with ``--gpu-extra`` on CUDA: ResNet-50 at 224x224, top block + head, DP on, and its
  fraction of the non-private rate.

It prints a table and writes ``runs/bench.json`` (keys ``dp_speedup_vs_plain``,
``dp_fraction_of_nonprivate``, ``bytes_ratio_vs_full_fedavg`` and the raw figures).

Run:  .venv/bin/python -m simulations.benchmarks.benchmark --out runs/bench.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from common.config import TrainingConfig
from simulations.benchmarks.bench_training import MODES, RESULT_PREFIX, TrainingBenchSpec

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
TARGETS = {"dp_speedup_vs_plain": 12.0, "dp_fraction_of_nonprivate": 0.5, "bytes_ratio_vs_full_fedavg": 0.2}
"""Issue 7's targets: (b)/(a) at least, (b)/(c) at least, bytes ratio at most."""

DEFAULT_ENCODING: str = TrainingConfig().update_encoding
"""fedtl's default update encoding (``training.update_encoding``), the one the headline bytes ratio uses."""

THROUGHPUT_MODES: tuple[str, ...] = (
    "plain_dp",
    "plain_nonprivate",
    "fedtl_dp",
    "fedtl_nonprivate",
)


class BenchmarkError(RuntimeError):
    """A benchmark worker failed; the message names the mode and carries its error output."""


# ------------------------------------------------------------------------------- environment


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:  # noqa: BLE001 - a missing package is reported as None
        return None


def hardware_info(device: torch.device, threads: int) -> dict[str, Any]:
    """CPU, cores, torch threads, GPU and library versions of this run."""
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": threads,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "opacus": _version("opacus"),
        "flwr": _version("flwr"),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    return info


# ----------------------------------------------------------------------------------- workers


def run_worker(mode: str, spec: TrainingBenchSpec, timeout_s: float = 900.0, in_process: bool = False) -> dict[str, Any]:
    """Run one mode in a fresh Python process (or, for tests, in this one) and return its figures.

    Args:
        mode: one of ``simulations.benchmarks.bench_training.MODES``.
        spec: the shared settings.
        timeout_s: how long the worker may run.
        in_process: run here instead (fast, but memory peaks of the modes then overlap).

    Raises:
        BenchmarkError: the worker exited non-zero, timed out or printed no result.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    if in_process:
        from simulations.benchmarks.bench_training import run_mode

        threads = torch.get_num_threads()
        try:
            return run_mode(mode, spec)
        finally:
            torch.set_num_threads(threads)
    command = [sys.executable, "-m", "simulations.benchmarks.bench_training", "--mode", mode, "--spec", spec.to_json()]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    try:
        done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise BenchmarkError(f"benchmark mode {mode} ran past {timeout_s:.0f} s; lower --train-images") from None
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        raise BenchmarkError(
            f"benchmark mode {mode} failed (exit {done.returncode}); its error output ends with:\n"
            + "\n".join(done.stderr.strip().splitlines()[-25:])
        )
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def _plan(spec: TrainingBenchSpec, rounds: int, local_epochs: int) -> TrainingBenchSpec:
    """Fill in the noise multiplier fedtl's ledger plans for these settings (used by every DP mode)."""
    from client.privacy.privacy_plan import default_delta, plan_noise, planned_steps, sample_rate_for

    delta = default_delta(spec.train_images)
    rate = sample_rate_for(spec.train_images, spec.batch_size)
    steps = planned_steps(rounds, local_epochs, rate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus' RDP "optimal order is the largest alpha" note
        sigma = plan_noise(spec.target_epsilon, delta, rate, steps)
    return replace(spec, noise_multiplier=sigma, delta=delta, planned_steps=steps)


def _best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    best = dict(max(runs, key=lambda r: r["images_per_s"]))
    best["images_per_s_all_repeats"] = [round(r["images_per_s"], 2) for r in runs]
    return best


def _memory_mib(figures: dict[str, Any]) -> float | None:
    """The mode's training-phase peak: CUDA peak allocation, or growth of max RSS on CPU."""
    for key in ("train_cuda_peak_mib", "train_peak_rss_growth_mib", "train_max_rss_growth_mib"):
        if key in figures:
            return figures[key]
    return None


def amortised_rate(steady_images_per_s: float, trunk_seconds: float, images: int, epochs: int) -> float:
    """Images/s over ``epochs`` epochs of ``images`` when the trunk is computed once up front.

    Args:
        steady_images_per_s: training throughput on cached trunk features.
        trunk_seconds: the one-off trunk computation time for the ``images``.
        images: images at the site.
        epochs: planned epochs over the whole federation (rounds x local epochs).
    """
    processed = images * epochs
    return processed / (trunk_seconds + processed / steady_images_per_s)


# ---------------------------------------------------------------------------------- sections


def measure_training(spec: TrainingBenchSpec, repeats: int, modes: tuple[str, ...],
                     in_process: bool = False) -> dict[str, Any]:
    """Best-of-``repeats`` figures per mode; modes cycle so that background load hits them alike."""
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    for repeat in range(repeats):
        for mode in modes:
            started = time.perf_counter()
            runs[mode].append(run_worker(mode, spec, in_process=in_process))
            logger.info("repeat %d %s: %.1f images/s (%.0f s)", repeat + 1, mode,
                        runs[mode][-1]["images_per_s"], time.perf_counter() - started)
    return {mode: _best(mode_runs) for mode, mode_runs in runs.items()}


def measure_traffic(spec: TrainingBenchSpec) -> dict[str, Any]:
    """Bytes per round for the benchmark policy and for the architecture's default policy."""
    from common.models.layer_policy import default_policy
    from simulations.benchmarks.bench_traffic import traffic_per_round
    from simulations.benchmarks.bench_training import _model_and_groups

    model, _policy, groups = _model_and_groups(spec)
    figures = {"benchmark_policy": {"shared": list(spec.shared), **traffic_per_round(model, groups)}}
    default = default_policy(spec.architecture)
    if default.shared != spec.shared or default.local != spec.local:
        model, _policy, groups = _model_and_groups(replace(spec, shared=default.shared, local=default.local))
        figures["default_policy"] = {"shared": list(default.shared), **traffic_per_round(model, groups)}
    return figures


def measure_coordinator(spec: TrainingBenchSpec, site_counts: tuple[int, ...], encoding: str) -> dict[str, Any]:
    """The coordinator's per-round cost for ``site_counts`` replying sites (benchmark policy)."""
    from simulations.benchmarks.bench_coordinator import coordinator_scaling
    from simulations.benchmarks.bench_training import _model_and_groups

    model, _policy, groups = _model_and_groups(spec)
    state = model.state_dict()
    shared = {k: state[k] for k in groups.shared}
    del model, state
    return coordinator_scaling(shared, site_counts, encoding)


def measure_gpu_extra(base: TrainingBenchSpec, repeats: int, in_process: bool = False) -> dict[str, Any]:
    """ResNet-50 at 224x224, top block (``stages.layer4.2``) + head, DP on vs off, fedtl path."""
    from common.models.layer_policy import default_policy

    policy = default_policy("resnet50")
    spec = replace(base, architecture="resnet50", image_size=224, shared=policy.shared, local=policy.local,
                   train_images=max(base.train_images, 1024))
    spec = _plan(spec, rounds=base.extra.get("rounds", 5), local_epochs=base.extra.get("local_epochs", 1))
    figures = measure_training(spec, repeats, ("fedtl_dp", "fedtl_nonprivate"), in_process)
    dp, nonprivate = figures["fedtl_dp"], figures["fedtl_nonprivate"]
    return {
        "model": "resnet50 224x224, shared " + ", ".join(spec.shared) + " + local head",
        "spec": asdict(spec),
        "fedtl_dp_images_per_s": dp["images_per_s"],
        "fedtl_nonprivate_images_per_s": nonprivate["images_per_s"],
        "dp_fraction_of_nonprivate": dp["images_per_s"] / nonprivate["images_per_s"],
        "modes": figures,
    }


# -------------------------------------------------------------------------------- summary


def summarise(spec: TrainingBenchSpec, training: dict[str, Any], traffic: dict[str, Any],
              planned_epochs: int) -> dict[str, Any]:
    """The headline ratios of issue 7 and whether each target is met."""
    plain = training["plain_dp"]["images_per_s"]
    dp = training["fedtl_dp"]
    nonprivate = training["fedtl_nonprivate"]
    one_off_dp_s = dp["trunk_seconds"] + dp.get("ledger_plan_seconds", 0.0)  # trunk pass + noise plan
    dp_amortised = amortised_rate(dp["images_per_s"], one_off_dp_s, spec.train_images, planned_epochs)
    nonprivate_amortised = amortised_rate(nonprivate["images_per_s"], nonprivate["trunk_seconds"],
                                          spec.train_images, planned_epochs)
    encodings = traffic["benchmark_policy"]["fedtl"]["by_encoding"]
    summary: dict[str, Any] = {
        "dp_speedup_vs_plain": dp_amortised / plain,
        "dp_speedup_vs_plain_steady_state": dp["images_per_s"] / plain,
        "dp_fraction_of_nonprivate": dp["images_per_s"] / nonprivate["images_per_s"],
        "dp_fraction_of_nonprivate_amortised": dp_amortised / nonprivate_amortised,
        "bytes_ratio_vs_full_fedavg": encodings[DEFAULT_ENCODING]["ratio_vs_full_fedavg"],
        "bytes_encoding": DEFAULT_ENCODING,
        "bytes_ratio_vs_full_fedavg_fp32": encodings["fp32"]["ratio_vs_full_fedavg"],
        "bytes_ratio_vs_full_fedavg_fp16": encodings["fp16"]["ratio_vs_full_fedavg"],
        "bytes_ratio_vs_full_fedavg_int8": encodings["int8"]["ratio_vs_full_fedavg"],
        "fedtl_dp_images_per_s_amortised": dp_amortised,
        "fedtl_nonprivate_images_per_s_amortised": nonprivate_amortised,
        "planned_epochs_for_amortisation": planned_epochs,
        "definitions": {
            "dp_speedup_vs_plain": "fedtl DP images/s amortised over the planned epochs (one-off trunk "
                                   "pass and noise plan included) / plain recipe DP images/s",
            "dp_speedup_vs_plain_steady_state": "fedtl DP images/s on cached trunk features / plain DP",
            "dp_fraction_of_nonprivate": "fedtl DP / fedtl non-private, both steady state on cached features",
            "bytes_ratio_vs_full_fedavg": "fedtl with its default update encoding (bytes_encoding): the "
                                          "global shared layers down once per round as a delta from the "
                                          "site's copy + the encoded update up, over full-model fp32 FedAvg "
                                          "(whole state dict down and up), per site per round in steady state, "
                                          "tensor payload; backbone install and first full copy excluded "
                                          "(once per site)",
        },
    }
    plain_cpu = training["plain_dp"]["images_per_cpu_s"]
    dp_cpu_amortised = amortised_rate(dp["images_per_cpu_s"], dp["trunk_cpu_seconds"], spec.train_images,
                                      planned_epochs)
    summary["cpu_time"] = {
        "why": "images per CPU-second of the worker process: with --threads 1 this does not depend on other "
               "processes' load, unlike wall-clock images/s",
        "dp_speedup_vs_plain": dp_cpu_amortised / plain_cpu,
        "dp_speedup_vs_plain_steady_state": dp["images_per_cpu_s"] / plain_cpu,
        "dp_fraction_of_nonprivate": dp["images_per_cpu_s"] / nonprivate["images_per_cpu_s"],
    }
    if "equivalence" in dp:
        summary["ghost_backward_equivalence"] = {
            "what": "largest relative differences, on one batch, between the shipping ghost backward "
                    "(client.dp.ghost_clipping) and Opacus' stock ghost backward",
            **dp["equivalence"],
        }
    if "default_policy" in traffic:
        default = traffic["default_policy"]
        summary["bytes_ratio_vs_full_fedavg_default_policy"] = {
            encoding: figures["ratio_vs_full_fedavg"]
            for encoding, figures in default["fedtl"]["by_encoding"].items()
        } | {"shared": default["shared"]}
    summary["targets"] = {
        "dp_speedup_vs_plain": {"target": f">= {TARGETS['dp_speedup_vs_plain']}",
                                "met": summary["dp_speedup_vs_plain"] >= TARGETS["dp_speedup_vs_plain"]},
        "dp_fraction_of_nonprivate": {
            "target": f">= {TARGETS['dp_fraction_of_nonprivate']}",
            "met": summary["dp_fraction_of_nonprivate"] >= TARGETS["dp_fraction_of_nonprivate"]},
        "bytes_ratio_vs_full_fedavg": {
            "target": f"<= {TARGETS['bytes_ratio_vs_full_fedavg']}",
            "met": summary["bytes_ratio_vs_full_fedavg"] <= TARGETS["bytes_ratio_vs_full_fedavg"],
            "met_fp32": summary["bytes_ratio_vs_full_fedavg_fp32"] <= TARGETS["bytes_ratio_vs_full_fedavg"],
            "met_int8": summary["bytes_ratio_vs_full_fedavg_int8"] <= TARGETS["bytes_ratio_vs_full_fedavg"]},
    }
    return summary


def _mib(value: float | None) -> str:
    return f"{value:8.0f}" if value is not None else "       -"


def format_table(report: dict[str, Any]) -> str:
    """The human-readable table printed at the end of a run."""
    spec = report["spec"]
    hw = report["hardware"]
    training = report["training"]
    summary = report["summary"]
    plain = training["plain_dp"]["images_per_s"]
    nonprivate = training["fedtl_nonprivate"]["images_per_s"]
    where = hw["gpu"] or f"{hw['cpu_model']}, {hw['cpus_usable']} usable cores"
    lines = [
        f"fedtl benchmark: {spec['architecture']} {spec['image_size']}x{spec['image_size']}x{spec['in_channels']}, "
        f"shared {', '.join(spec['shared'])} + local {', '.join(spec['local'])}, batch {spec['batch_size']}, "
        f"noise {spec['noise_multiplier']:.3f}, clip {spec['max_grad_norm']}",
        f"device {hw['device']} ({where}), torch {hw['torch']} threads {hw['torch_threads']}, "
        f"opacus {hw['opacus']}, load avg at start {hw['load_average_at_start']}",
        "",
        f"{'mode':46s} {'images/s':>9s} {'img/CPU-s':>9s} {'+MiB':>8s} {'peak RSS':>8s} {'x plain DP':>10s} "
        f"{'x fedtl non-priv':>16s}",
    ]

    def row(label: str, rate: float, memory: float | None, peak: float | None = None,
            cpu_rate: float | None = None) -> str:
        cpu = f"{cpu_rate:9.1f}" if cpu_rate is not None else "        -"
        return (f"{label:46s} {rate:9.1f} {cpu} {_mib(memory)} {_mib(peak)} {rate / plain:10.2f} "
                f"{rate / nonprivate:16.2f}")

    labels = {
        "plain_dp": "(a) plain recipe, DP (hooks, full forward)",
        "plain_nonprivate": "    plain recipe, non-private",
        "fedtl_dp": "(b) fedtl DP, steady state (cached trunk)",
        "fedtl_nonprivate": "(c) fedtl non-private, steady state",
    }
    for mode, label in labels.items():
        if mode in training:
            figures = training[mode]
            lines.append(row(label, figures["images_per_s"], _memory_mib(figures), figures.get("train_peak_rss_mib"),
                             figures.get("images_per_cpu_s")))
        if mode == "fedtl_dp":
            lines.append(row(f"    fedtl DP, amortised over {summary['planned_epochs_for_amortisation']} epochs",
                             summary["fedtl_dp_images_per_s_amortised"], None))
            dp = training["fedtl_dp"]
            trunk_memory = _memory_mib({k.replace("trunk_", "train_"): v for k, v in dp.items()
                                        if k.startswith("trunk_")})
            lines.append(f"    one-off trunk pass: {dp['trunk_seconds']:.2f} s for {spec['train_images']} images "
                         f"({dp['trunk_images_per_s']:.0f} images/s), features {dp['trunk_feature_mib']:.1f} MiB, "
                         f"peak {_mib(trunk_memory).strip()} MiB")
            if "ledger_plan_seconds" in dp:
                lines.append(f"    one-off noise plan for the whole federation (site's privacy ledger): "
                             f"{dp['ledger_plan_seconds']:.2f} s")
    lines.append("(+MiB: on CPU the growth of the worker's peak RSS over its RSS when training started (warm-up "
                 "included), on CUDA the peak allocation; peak RSS: the worker's peak, torch and the model included)")
    lines.append("")
    lines.append(f"{'bytes per site per round':46s} {'down MB':>9s} {'up MB':>8s} {'total MB':>10s} {'x full FedAvg':>16s}")
    for policy_name, traffic in report["traffic"].items():
        full = traffic["full_model_fedavg_fp32"]
        fedtl = traffic["fedtl"]
        lines.append(f"{'full-model fp32 FedAvg':46s} {full['down_bytes'] / 1e6:9.2f} {full['up_bytes'] / 1e6:8.2f} "
                     f"{full['round_bytes'] / 1e6:10.2f} {1.0:16.3f}")
        for encoding, figures in fedtl["by_encoding"].items():
            label = f"fedtl {encoding} both ways, shared {','.join(traffic['shared'])}"
            lines.append(f"{label:46s} {figures['down_bytes'] / 1e6:9.2f} {figures['up_bytes'] / 1e6:8.2f} "
                         f"{figures['round_bytes'] / 1e6:10.2f} {figures['ratio_vs_full_fedavg']:16.3f}")
        lines.append(f"    one-off backbone install: {fedtl['backbone_install_once_bytes'] / 1e6:.2f} MB "
                     f"({policy_name.replace('_', ' ')})")
    coordinator = report.get("coordinator")
    if coordinator:
        fit = coordinator["linear_fit"]
        per = ", ".join(f"{sites} sites {seconds:.2f} s" for sites, seconds in coordinator["seconds_by_sites"].items())
        lines += ["", f"coordinator's share of a round ({coordinator['encoding']} replies): {per}; "
                      f"linear fit {1000 * fit['slope_s_per_site']:.1f} ms/site + {fit['intercept_s']:.2f} s, "
                      f"r^2 = {fit['r2']:.4f}",
                  "    CPU time: " + ", ".join(f"{sites} sites {seconds:.2f} s" for sites, seconds
                                               in coordinator["cpu_seconds_by_sites"].items())
                  + f"; fit {1000 * coordinator['linear_fit_cpu_time']['slope_s_per_site']:.1f} ms/site, "
                    f"r^2 = {coordinator['linear_fit_cpu_time']['r2']:.4f}"]
    scaling = report.get("site_scaling")
    if scaling:
        fit = scaling["steady_round_fit"]
        per = ", ".join(f"{run['sites']} sites {run['steady_round_s']:.1f} s" for run in scaling["runs"])
        lines += ["", f"whole simulated round (Flower simulation on Ray, steady state): {per}; linear fit "
                      f"{fit['slope_s_per_site']:.3f} s/site + {fit['intercept_s']:.2f} s, r^2 = {fit['r2']:.4f}; "
                      f"time per site largest/smallest {scaling['per_site_time_largest_over_smallest']:.2f}"]
    profile = report.get("dp_step_profile")
    if profile:
        lines += ["", f"DP step breakdown, one batch of {profile['batch_size']} (median ms):"]
        for name in ("nonprivate", "ghost_stock", "ghost_shipping"):
            phases = profile[name]
            shown = ", ".join(f"{k} {v:.1f}" for k, v in phases.items() if k != "step_total")
            lines.append(f"  {name:22s} total {phases['step_total']:7.1f}: {shown}")
    storage = report.get("feature_storage")
    if storage and "memory" in storage:
        lines += ["", f"Trunk features of {storage['images']} images ({storage['memory']['features_mib']:.0f} MiB), "
                      "RAM vs memory-mapped (one DP epoch):"]
        for mode in ("memory", "disk"):
            row = storage[mode]
            lines.append(f"  {mode:7s} anonymous +{row['anon_mib_after_open']:6.1f} MiB after opening, "
                         f"+{row['anon_mib_after_epoch']:6.1f} MiB after the epoch; file pages "
                         f"+{row['file_mib_after_epoch']:6.1f} MiB; {row['dp_epoch_images_per_s']:6.1f} images/s")
    gpu = report.get("gpu_extra")
    if gpu:
        lines += ["", f"GPU extra ({gpu['model']}): DP {gpu['fedtl_dp_images_per_s']:.0f} images/s, non-private "
                      f"{gpu['fedtl_nonprivate_images_per_s']:.0f} images/s, DP fraction "
                      f"{gpu['dp_fraction_of_nonprivate']:.2f}"]
    targets = summary["targets"]
    lines += [
        "",
        f"dp_speedup_vs_plain        {summary['dp_speedup_vs_plain']:7.2f}  (target {targets['dp_speedup_vs_plain']['target']}: "
        f"{'met' if targets['dp_speedup_vs_plain']['met'] else 'NOT met'}); steady state "
        f"{summary['dp_speedup_vs_plain_steady_state']:.2f}",
        f"dp_fraction_of_nonprivate  {summary['dp_fraction_of_nonprivate']:7.2f}  (target "
        f"{targets['dp_fraction_of_nonprivate']['target']}: "
        f"{'met' if targets['dp_fraction_of_nonprivate']['met'] else 'NOT met'})",
        f"bytes_ratio_vs_full_fedavg {summary['bytes_ratio_vs_full_fedavg']:7.3f}  ({summary['bytes_encoding']}, the "
        f"default; fp32 {summary['bytes_ratio_vs_full_fedavg_fp32']:.3f}, fp16 "
        f"{summary['bytes_ratio_vs_full_fedavg_fp16']:.3f}, int8 {summary['bytes_ratio_vs_full_fedavg_int8']:.3f}; "
        f"target {targets['bytes_ratio_vs_full_fedavg']['target']}: "
        f"{'met' if targets['bytes_ratio_vs_full_fedavg']['met'] else 'NOT met'})",
    ]
    cpu = summary["cpu_time"]
    lines.append(f"by CPU time (robust to other load with --threads 1): dp_speedup_vs_plain "
                 f"{cpu['dp_speedup_vs_plain']:.2f} (steady {cpu['dp_speedup_vs_plain_steady_state']:.2f}), "
                 f"dp_fraction_of_nonprivate {cpu['dp_fraction_of_nonprivate']:.2f}")
    equivalence = summary.get("ghost_backward_equivalence")
    if equivalence:
        lines.append(f"shipping ghost backward vs Opacus' stock one (one batch): per-sample norms max rel diff "
                     f"{equivalence['max_rel_diff_per_sample_norms']:.2e}, clipped gradients max rel diff "
                     f"{equivalence['max_rel_diff_clipped_grads']:.2e}")
    if profile and "ghost_shipping" in profile and "ghost_stock" in profile:
        stock, shipping = profile["ghost_stock"]["step_total"], profile["ghost_shipping"]["step_total"]
        lines.append(f"DP step, shipping ghost backward vs Opacus' stock: {shipping:.1f} ms vs {stock:.1f} ms "
                     f"({stock / shipping:.2f}x)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench.json"), help="where to write the JSON report")
    parser.add_argument("--device", default="cpu", help="'cpu' or 'cuda'")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads per worker (default: usable cores, at most 16)")
    parser.add_argument("--architecture", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--in-channels", type=int, default=1, choices=(1, 3))
    parser.add_argument("--shared", nargs="+", default=["stages.layer4"],
                        help="module prefixes shared with the federation (the trainable top)")
    parser.add_argument("--local", nargs="+", default=["head"], help="module prefixes kept at the site")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--train-images", type=int, default=1024, help="images at the site (fedtl modes)")
    parser.add_argument("--timed-epochs", type=int, default=2, help="epochs in the timed train_tail call")
    parser.add_argument("--plain-steps", type=int, default=5, help="timed steps of the plain recipe")
    parser.add_argument("--plain-warmup-steps", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5, help="planned federation rounds (noise plan, amortisation)")
    parser.add_argument("--local-epochs", type=int, default=1, help="planned local epochs per round")
    parser.add_argument("--target-epsilon", type=float, default=8.0)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=2, help="cycles over the modes; the best figure is kept")
    parser.add_argument("--modes", nargs="+", default=list(THROUGHPUT_MODES), choices=THROUGHPUT_MODES)
    parser.add_argument("--coordinator-sites", nargs="+", type=int, default=[10, 25, 50])
    parser.add_argument("--coordinator-encoding", default="fp32", choices=("fp32", "fp16", "int8"))
    parser.add_argument("--site-scaling-sites", nargs="*", type=int, default=[10, 25, 50],
                        help="federation sizes of the whole-round scaling run (simulations.benchmarks.bench_site_scaling, "
                             "about 4 minutes on 2 cores); give none to skip it")
    parser.add_argument("--storage-images", type=int, default=4096,
                        help="site size of the feature-storage comparison, RAM against memory-mapped "
                             "(simulations.benchmarks.bench_feature_storage, about 45 s on 2 cores); 0 skips it")
    parser.add_argument("--predict-images", type=int, default=256,
                        help="DICOM files of the fedtl-hospital predict throughput run (simulations.benchmarks."
                             "bench_predict: CPU at --image-size, and a GPU at 224 px when CUDA is available); 0 skips it")
    parser.add_argument("--patient-unit-images", type=int, default=192,
                        help="training images of the per-patient DP step comparison, ghost norms against per-image "
                             "gradients (simulations.benchmarks.bench_patient_unit, about 25 s on 2 cores); 0 skips it")
    parser.add_argument("--real-rounds", type=int, default=3,
                        help="rounds of the real loopback federation, once per ClientApp mode, and of its simulation "
                             "(simulations.benchmarks.bench_real_rounds, about 8 minutes on 2 cores); 0 skips it")
    parser.add_argument("--no-profile", action="store_true", help="skip the DP step breakdown")
    parser.add_argument("--in-process", action="store_true",
                        help="run every mode in this process (fast; memory peaks overlap): for tests and debugging")
    parser.add_argument("--gpu-extra", action="store_true",
                        help="on CUDA, also measure ResNet-50 224x224 top block + head, DP on and off")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("common.models.layer_policy", "client.privacy.privacy_budget", "opacus"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    required = {"plain_dp", "fedtl_dp", "fedtl_nonprivate"}
    if not required <= set(args.modes):
        raise SystemExit(f"--modes must include {', '.join(sorted(required))} (the headline ratios need them)")
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = args.threads or min(usable, 16)
    torch.set_num_threads(threads)
    started = time.perf_counter()

    spec = TrainingBenchSpec(
        architecture=args.architecture, image_size=args.image_size, in_channels=args.in_channels,
        shared=tuple(args.shared), local=tuple(args.local), batch_size=args.batch_size,
        train_images=args.train_images, timed_epochs=args.timed_epochs, plain_steps=args.plain_steps,
        plain_warmup_steps=args.plain_warmup_steps, target_epsilon=args.target_epsilon,
        max_grad_norm=args.max_grad_norm, device=args.device, threads=threads,
        extra={"rounds": args.rounds, "local_epochs": args.local_epochs},
    )
    spec = _plan(spec, args.rounds, args.local_epochs)
    report: dict[str, Any] = {"hardware": hardware_info(device, threads), "spec": asdict(spec)}
    modes = tuple(mode for mode in THROUGHPUT_MODES if mode in args.modes)
    report["training"] = measure_training(spec, args.repeats, modes, args.in_process)
    report["memory_separated_per_mode"] = not args.in_process
    if not args.no_profile:
        report["dp_step_profile"] = run_worker("profile_dp_step", spec, in_process=args.in_process)
    report["traffic"] = measure_traffic(spec)
    report["coordinator"] = measure_coordinator(spec, tuple(args.coordinator_sites), args.coordinator_encoding)
    if args.site_scaling_sites:
        from simulations.benchmarks.bench_site_scaling import measure as measure_site_scaling

        report["site_scaling"] = measure_site_scaling(sorted(args.site_scaling_sites))
    if args.storage_images > 0:
        from simulations.benchmarks.bench_feature_storage import measure as measure_feature_storage

        report["feature_storage"] = measure_feature_storage(
            args.storage_images, args.image_size, args.batch_size, in_process=args.in_process
        )
    if args.predict_images > 0:
        from simulations.benchmarks.bench_predict import measure as measure_predict

        report["predict"] = measure_predict(args.predict_images, args.image_size, batch_size=32)
    if args.patient_unit_images > 0:
        from simulations.benchmarks.bench_patient_unit import measure as measure_patient_unit

        report["patient_unit"] = measure_patient_unit(images=args.patient_unit_images,
                                                      batch_size=min(32, args.patient_unit_images))
    if args.real_rounds > 0:
        from simulations.benchmarks.bench_real_rounds import measure as measure_real_rounds

        report["real_rounds"] = measure_real_rounds(args.real_rounds)
    if args.gpu_extra:
        if device.type == "cuda":
            report["gpu_extra"] = measure_gpu_extra(spec, args.repeats, args.in_process)
        else:
            logger.warning("--gpu-extra needs --device cuda; skipped")
    report["summary"] = summarise(spec, report["training"], report["traffic"], args.rounds * args.local_epochs)
    report["hardware"]["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    report["command"] = " ".join([Path(sys.executable).name, "-m", "simulations.benchmarks.benchmark", *(argv or sys.argv[1:])])
    # headline keys at the top level too, as issue 7 asks
    for key in ("dp_speedup_vs_plain", "dp_fraction_of_nonprivate", "bytes_ratio_vs_full_fedavg", "bytes_encoding",
                "bytes_ratio_vs_full_fedavg_fp32", "bytes_ratio_vs_full_fedavg_fp16", "bytes_ratio_vs_full_fedavg_int8"):
        report[key] = report["summary"][key]

    from common.atomic_io import atomic_write_json

    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, report)
    print(format_table(report))
    if "predict" in report:
        from simulations.benchmarks.bench_predict import format_lines as predict_lines

        print("\n" + "\n".join(predict_lines(report["predict"])))
    if "patient_unit" in report:
        from simulations.benchmarks.bench_patient_unit import format_lines as patient_unit_lines

        print("\n" + "\n".join(patient_unit_lines(report["patient_unit"])))
    if "real_rounds" in report:
        from simulations.benchmarks.bench_real_rounds import format_lines as real_round_lines

        print("\n" + "\n".join(real_round_lines(report["real_rounds"])))
    print(f"\nwrote {args.out} in {report['wall_seconds']:.0f} s")
    return report


if __name__ == "__main__":
    main()
