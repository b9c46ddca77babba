"""Every round's metrics also go to TensorBoard event files in <run>/tensorboard/, one scalar per metric and site."""

from __future__ import annotations

import math
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from server.run_recorder import RunRecorder
from server.tensorboard_log import TENSORBOARD_DIR

CONFIG = {"name": "demo"}
BACKBONE = {"architecture": "resnet18", "fingerprint": "fp1"}


def play_round(recorder: RunRecorder, n: int, bacc: dict[str, float]) -> None:
    recorder.begin_round(n)
    for site, value in bacc.items():
        recorder.add_bytes(n, site, sent=1000, received=250)
        recorder.record_train(n, site, "ok", {"num-examples": 10, "train-loss": 1.0 / n, "epsilon": 0.5 * n,
                                              "delta": 1e-5})
        recorder.record_evaluate(n, site, "ok", {"num-examples": 5, "balanced-accuracy": value, "accuracy": value,
                                                 "auc": math.nan, "loss": 0.4})
    recorder.end_round(n)


def scalars(run_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(run_dir / TENSORBOARD_DIR))
    events.Reload()
    return events


def series(events: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, round(e.value, 6)) for e in events.Scalars(tag)]


def test_each_round_writes_per_site_and_aggregate_scalars_beside_metrics_json(tmp_path: Path) -> None:
    recorder = RunRecorder(tmp_path, CONFIG, BACKBONE)
    play_round(recorder, 1, {"north": 0.6, "south": 0.8})
    play_round(recorder, 2, {"north": 0.7, "south": 0.9})
    assert (tmp_path / "metrics.json").exists()
    events = scalars(tmp_path)
    tags = set(events.Tags()["scalars"])
    assert {"balanced_accuracy/north", "balanced_accuracy/south", "epsilon/north", "train_loss/south",
            "aggregate/balanced_accuracy", "aggregate/max_epsilon", "round/bytes_sent"} <= tags
    assert "auc/north" not in tags, "an undefined metric (NaN) is left out, not drawn as a value"
    assert series(events, "balanced_accuracy/north") == [(1, 0.6), (2, 0.7)]
    assert series(events, "epsilon/south") == [(1, 0.5), (2, 1.0)]
    assert series(events, "aggregate/balanced_accuracy") == [(1, 0.7), (2, 0.8)]
    assert series(events, "round/bytes_sent") == [(1, 2000.0), (2, 2000.0)]


def test_a_resumed_run_replaces_the_rounds_it_redoes(tmp_path: Path) -> None:
    first = RunRecorder(tmp_path, CONFIG, BACKBONE)
    play_round(first, 1, {"north": 0.6})
    play_round(first, 2, {"north": 0.1})  # recorded, but the run died before its checkpoint
    resumed = RunRecorder(tmp_path, CONFIG, BACKBONE, resume_after_round=1)
    play_round(resumed, 2, {"north": 0.7})
    play_round(resumed, 3, {"north": 0.8})
    assert series(scalars(tmp_path), "balanced_accuracy/north") == [(1, 0.6), (2, 0.7), (3, 0.8)]
