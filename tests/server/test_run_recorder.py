"""Run recorder: per-round, per-site metrics on disk after every round; plots from them."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from server.report_plots import write_plots
from server.run_recorder import (
    AGGREGATE_ROW,
    RunRecorder,
    array_record_nbytes,
    site_name,
)

CONFIG = {"name": "demo", "strategy": {"name": "fedavg"}}
BACKBONE = {"architecture": "resnet18", "fingerprint": "fp1"}


def train_metrics(n: int, loss: float, epsilon: float) -> dict[str, float]:
    return {"num-examples": n, "train-loss": loss, "epsilon": epsilon, "delta": 1e-5}


def eval_metrics(n: int, bacc: float) -> dict[str, float]:
    return {
        "num-examples": n, "loss": 0.5, "accuracy": bacc, "balanced-accuracy": bacc, "auc": math.nan,
        "sensitivity": 0.6, "specificity": 0.7, "epsilon": 1.0, "delta": 1e-5,
    }


def play_round(recorder: RunRecorder, n: int) -> dict:
    recorder.begin_round(n)
    for site, examples, loss, bacc in (("site-1", 10, 1.0, 0.6), ("site-2", 30, 2.0, 0.8)):
        recorder.add_bytes(n, site, sent=1000, received=250)
        recorder.record_train(n, site, "ok", train_metrics(examples, loss, epsilon=0.5 * n))
        recorder.record_evaluate(n, site, "ok", eval_metrics(examples, bacc))
    recorder.add_bytes(n, "site-3", sent=1000)
    recorder.record_train(n, "site-3", "declined-budget", {"epsilon": 8.0, "delta": 1e-5})
    recorder.record_dropped(n, "site-3", "declined: privacy budget spent")
    return recorder.end_round(n)


def test_site_names_come_from_the_node_id() -> None:
    assert site_name(4242) == "site-4242"


def test_bytes_of_records_are_the_serialized_array_lengths() -> None:
    array = Array(np.zeros((4, 4), dtype=np.float32))
    record = ArrayRecord({"a": array, "b": Array(np.zeros(3, dtype=np.int8))})
    expected = len(array.data) + len(record["b"].data)
    assert array_record_nbytes(record) == expected
    assert expected > 4 * 4 * 4  # includes the .npy header, not just raw bytes


def test_metrics_json_follows_the_documented_schema_after_each_round(tmp_path: Path) -> None:
    recorder = RunRecorder(tmp_path, CONFIG, BACKBONE)
    play_round(recorder, 1)
    document = json.loads((tmp_path / "metrics.json").read_text())
    assert document["config"] == CONFIG and document["backbone"] == BACKBONE
    (record,) = document["rounds"]
    assert record["round"] == 1 and record["wall_time_s"] >= 0
    assert record["bytes_sent"] == 3000 and record["bytes_received"] == 500
    site = record["sites"]["site-2"]
    for key in ("epsilon", "delta", "balanced_accuracy", "accuracy", "auc", "loss", "num_examples",
                "status", "bytes_sent", "bytes_received", "train_loss", "eval_num_examples"):
        assert key in site, key
    assert site["num_examples"] == 30 and site["status"] == "ok"
    assert site["auc"] is None  # NaN is stored as null, keeping the file valid JSON
    assert record["sites"]["site-3"]["status"] == "declined-budget"
    assert record["dropped"] == [{"site": "site-3", "reason": "declined: privacy budget spent"}]
    assert document["summary"]["rounds_completed"] == 1


def test_the_aggregate_is_weighted_by_examples_over_sites_that_answered(tmp_path: Path) -> None:
    record = play_round(RunRecorder(tmp_path, CONFIG, BACKBONE), 1)
    aggregate = record["aggregate"]
    assert aggregate["train_loss"] == pytest.approx((10 * 1.0 + 30 * 2.0) / 40)
    assert aggregate["balanced_accuracy"] == pytest.approx((10 * 0.6 + 30 * 0.8) / 40)
    assert aggregate["num_examples"] == 40 and aggregate["sites_trained"] == 2
    assert aggregate["auc"] is None
    assert aggregate["max_epsilon"] == 8.0


def test_metrics_csv_has_a_row_per_site_and_an_aggregate_row_per_round(tmp_path: Path) -> None:
    recorder = RunRecorder(tmp_path, CONFIG, BACKBONE)
    play_round(recorder, 1)
    play_round(recorder, 2)
    with (tmp_path / "metrics.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * 4
    assert [r["site"] for r in rows if r["round"] == "2"] == ["site-1", "site-2", "site-3", AGGREGATE_ROW]
    site2 = next(r for r in rows if r["round"] == "1" and r["site"] == "site-2")
    assert float(site2["balanced_accuracy"]) == pytest.approx(0.8) and site2["bytes_sent"] == "1000"


def test_a_resumed_recorder_keeps_checkpointed_rounds_and_drops_later_ones(tmp_path: Path) -> None:
    first = RunRecorder(tmp_path, CONFIG, BACKBONE)
    for n in (1, 2, 3):
        play_round(first, n)
    resumed = RunRecorder(tmp_path, CONFIG, BACKBONE, resume_after_round=2)
    play_round(resumed, 3)
    play_round(resumed, 4)
    document = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["round"] for r in document["rounds"]] == [1, 2, 3, 4]
    assert document["summary"]["last_round"] == 4
    assert document["summary"]["total_bytes_sent"] == 4 * 3000


def test_a_fresh_recorder_does_not_keep_an_old_run(tmp_path: Path) -> None:
    play_round(RunRecorder(tmp_path, CONFIG, BACKBONE), 1)
    play_round(RunRecorder(tmp_path, CONFIG, BACKBONE), 5)
    document = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["round"] for r in document["rounds"]] == [5]


def test_summary_reports_the_best_round_and_each_sites_epsilon(tmp_path: Path) -> None:
    recorder = RunRecorder(tmp_path, CONFIG, BACKBONE)
    play_round(recorder, 1)
    play_round(recorder, 2)
    summary = recorder.to_dict()["summary"]
    assert summary["best_balanced_accuracy"] == pytest.approx(0.75)
    assert summary["epsilon_by_site"]["site-1"] == pytest.approx(1.0)
    assert summary["epsilon_by_site"]["site-3"] == pytest.approx(8.0)
    assert summary["max_delta"] == pytest.approx(1e-5)  # every site's delta, as the sites reported it
    assert set(summary["delta_by_site"]) >= {"site-3"}


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_plots_are_written_as_png_files(tmp_path: Path) -> None:
    recorder = RunRecorder(tmp_path, CONFIG, BACKBONE)
    play_round(recorder, 1)
    play_round(recorder, 2)
    paths = write_plots(recorder.to_dict(), tmp_path / "plots")
    assert {p.name for p in paths} == {"balanced_accuracy.png", "epsilon.png", "training_loss.png"}
    for path in paths:
        assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_plots_of_a_run_without_rounds_are_still_written(tmp_path: Path) -> None:
    paths = write_plots({"rounds": []}, tmp_path)
    assert len(paths) == 3 and all(p.read_bytes()[:8] == PNG_SIGNATURE for p in paths)
