"""Smoke test of ``make bench``: tiny sizes, every mode in-process; checks the report, not the speed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from common.config import TrainingConfig

from simulations.benchmarks import benchmark
from simulations.benchmarks.bench_coordinator import linear_fit

TINY = [
    "--image-size", "32", "--batch-size", "8", "--train-images", "16", "--timed-epochs", "1",
    "--plain-steps", "1", "--repeats", "1", "--threads", "1", "--coordinator-sites", "2", "3",
    "--coordinator-encoding", "int8", "--site-scaling-sites", "--storage-images", "64",
    "--in-process", "--predict-images", "6", "--real-rounds", "0", "--patient-unit-images", "12",
]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    benchmark.main(["--out", str(out), *TINY])
    return json.loads(out.read_text()), out


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_bench_json_has_the_headline_ratios_of_issue_7(report: tuple[dict, Path]) -> None:
    data, _ = report
    for key in ("dp_speedup_vs_plain", "dp_fraction_of_nonprivate", "bytes_ratio_vs_full_fedavg",
                "bytes_ratio_vs_full_fedavg_fp32", "bytes_ratio_vs_full_fedavg_fp16", "bytes_ratio_vs_full_fedavg_int8"):
        assert _positive(data[key]), key
    assert set(data["summary"]["targets"]) == {"dp_speedup_vs_plain", "dp_fraction_of_nonprivate",
                                               "bytes_ratio_vs_full_fedavg"}


def test_every_training_mode_reports_positive_throughput_and_memory(report: tuple[dict, Path]) -> None:
    data, _ = report
    assert set(data["training"]) == set(benchmark.THROUGHPUT_MODES)
    for mode, figures in data["training"].items():
        assert _positive(figures["images_per_s"]), mode
        assert figures["samples"] > 0 and figures["seconds"] > 0, mode
        assert _positive(figures["max_rss_mib"]), mode
    fedtl = data["training"]["fedtl_dp"]
    assert _positive(fedtl["trunk_seconds"]) and fedtl["trunk_boundary"] > 0
    assert _positive(data["summary"]["fedtl_dp_images_per_s_amortised"])


def test_predict_throughput_is_measured_on_the_cpu_and_on_a_gpu_only_when_there_is_one(report: tuple[dict, Path]) -> None:
    import torch

    data, _ = report
    cpu = data["predict"]["cpu"]
    assert cpu["device"] == "cpu" and cpu["image_size"] == 32 and cpu["images"] == 6
    assert _positive(cpu["end_to_end_images_per_s"]) and _positive(cpu["model_images_per_s"])
    if torch.cuda.is_available():
        assert data["predict"]["gpu"]["image_size"] == 224
    else:
        assert data["predict"]["gpu"] is None


def test_dp_modes_share_the_noise_multiplier_the_ledger_plans(report: tuple[dict, Path]) -> None:
    data, _ = report
    planned = data["spec"]["noise_multiplier"]
    assert _positive(planned)
    assert data["training"]["fedtl_dp"]["ledger_noise_multiplier"] == pytest.approx(planned)


def test_shipping_ghost_backward_gives_opacus_stock_norms_and_gradients(report: tuple[dict, Path]) -> None:
    data, _ = report
    equivalence = data["training"]["fedtl_dp"]["equivalence"]
    assert equivalence["max_rel_diff_per_sample_norms"] < 1e-5
    assert equivalence["max_rel_diff_clipped_grads"] < 1e-5
    assert data["summary"]["ghost_backward_equivalence"]["max_rel_diff_clipped_grads"] == pytest.approx(
        equivalence["max_rel_diff_clipped_grads"]
    )


def test_dp_step_profile_times_the_stock_and_the_shipping_ghost_backward(report: tuple[dict, Path]) -> None:
    data, _ = report
    profile = data["dp_step_profile"]
    for name in ("nonprivate", "ghost_stock", "ghost_shipping"):
        assert _positive(profile[name]["step_total"]), name
    assert _positive(profile["ghost_stock"]["second_backward"])
    assert _positive(profile["ghost_shipping"]["backward_both_passes"])


def test_fedtl_traffic_is_smaller_than_full_model_fedavg_and_shrinks_with_the_encoding(
    report: tuple[dict, Path],
) -> None:
    data, _ = report
    traffic = data["traffic"]["benchmark_policy"]
    full = traffic["full_model_fedavg_fp32"]["round_bytes"]
    rounds = {enc: f["round_bytes"] for enc, f in traffic["fedtl"]["by_encoding"].items()}
    assert 0 < rounds["int8"] < rounds["fp16"] < rounds["fp32"] < full
    assert data["bytes_encoding"] == TrainingConfig().update_encoding
    assert data["bytes_ratio_vs_full_fedavg"] == pytest.approx(rounds[data["bytes_encoding"]] / full)
    assert data["bytes_ratio_vs_full_fedavg_fp32"] == pytest.approx(rounds["fp32"] / full)
    by_encoding = traffic["fedtl"]["by_encoding"]
    assert all(f["train_message_bytes"] == 0 for f in by_encoding.values()), \
        "a site that evaluated the new version gets no tensors in the next train message"
    assert traffic["fedtl"]["backbone_install_once_bytes"] > 0


def test_coordinator_section_says_it_is_the_coordinators_share_with_a_fit(report: tuple[dict, Path]) -> None:
    data, _ = report
    coordinator = data["coordinator"]
    assert "coordinator" in coordinator["what"]
    assert set(coordinator["seconds_by_sites"]) == {"2", "3"}
    assert all(_positive(s) for s in coordinator["seconds_by_sites"].values())
    assert 0.0 <= coordinator["linear_fit"]["r2"] <= 1.0


def test_report_records_hardware_and_versions(report: tuple[dict, Path]) -> None:
    data, _ = report
    hardware = data["hardware"]
    assert hardware["cpu_count"] >= 1 and hardware["torch_threads"] == 1
    assert hardware["torch"] and hardware["opacus"]


def test_linear_fit_recovers_a_line_exactly() -> None:
    fit = linear_fit([10.0, 25.0, 50.0], [1.5, 3.0, 5.5])
    assert fit["slope_s_per_site"] == pytest.approx(0.1)
    assert fit["intercept_s"] == pytest.approx(0.5)
    assert fit["r2"] == pytest.approx(1.0)


def test_feature_storage_compares_ram_with_memory_mapped_features_on_the_same_epoch(report: tuple[dict, Path]) -> None:
    data, _ = report
    storage = data["feature_storage"]
    if "skipped" in storage:
        pytest.skip(storage["skipped"])
    assert storage["memory"]["storage"] == "memory" and storage["disk"]["storage"] == "disk"
    for mode in ("memory", "disk"):
        assert _positive(storage[mode]["dp_epoch_images_per_s"]), mode
        assert storage[mode]["steps"] == storage["memory"]["steps"] > 0, mode


def test_patient_unit_ghost_norms_train_like_per_image_gradients_summed_per_patient(report: tuple[dict, Path]) -> None:
    section = report[0]["patient_unit"]
    assert set(section["settings"]) == {"patient_ghost", "patient_hooks", "image_ghost"}
    assert all(_positive(figures["seconds_per_step"]) for figures in section["settings"].values())
    assert section["max_rel_diff"] < 1e-3  # the same patient draws, noise and clipping: float rounding only
