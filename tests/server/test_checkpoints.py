"""Coordinator checkpoints: every round is resumable, a crash never loses the previous round."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from common import atomic_io
from common.config import FederationConfig
from server.checkpoints import (
    CheckpointMismatchError,
    CheckpointReadError,
    checkpoint_dir,
    latest_checkpoint,
    save_checkpoint,
)

FINGERPRINT = "fp-resnet18-1"


def weights(value: float) -> dict[str, torch.Tensor]:
    return {"layer4.weight": torch.full((2, 2), value), "fc.bias": torch.full((3,), value)}


def save_round(run_dir: Path, n: int, config: FederationConfig | None = None, keep_last: int = 3) -> Path:
    return save_checkpoint(
        run_dir,
        n,
        weights(float(n)),
        {"step": n, "m": {"fc.bias": torch.ones(3) * n}},
        FINGERPRINT,
        config or FederationConfig(),
        keep_last=keep_last,
    )


def test_a_run_without_checkpoints_has_no_latest_checkpoint(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None


def test_the_latest_checkpoint_holds_everything_a_resumed_round_needs(tmp_path: Path) -> None:
    config = FederationConfig(name="chest-xray")
    save_round(tmp_path, 1, config)
    save_round(tmp_path, 2, config)
    checkpoint = latest_checkpoint(tmp_path, config, FINGERPRINT)
    assert checkpoint is not None
    assert checkpoint.round == 2
    assert torch.equal(checkpoint.global_weights["layer4.weight"], torch.full((2, 2), 2.0))
    assert checkpoint.aggregator_state["step"] == 2
    assert torch.equal(checkpoint.aggregator_state["m"]["fc.bias"], torch.full((3,), 2.0))
    assert checkpoint.backbone_fingerprint == FINGERPRINT
    assert checkpoint.config.name == "chest-xray"
    pointer = json.loads((checkpoint_dir(tmp_path) / "latest.json").read_text())
    assert pointer == {"round": 2, "file": "round-2.pt"}


def test_only_the_last_k_round_files_are_kept(tmp_path: Path) -> None:
    for n in range(1, 6):
        save_round(tmp_path, n, keep_last=2)
    names = sorted(p.name for p in checkpoint_dir(tmp_path).glob("round-*.pt"))
    assert names == ["round-4.pt", "round-5.pt"]


def test_a_crash_while_writing_a_round_leaves_the_previous_round_loadable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_round(tmp_path, 1)
    save_round(tmp_path, 2)

    def killed_before_rename(src: str, dst: str) -> None:
        raise KeyboardInterrupt("process killed mid-write")

    monkeypatch.setattr(atomic_io.os, "replace", killed_before_rename)
    with pytest.raises(KeyboardInterrupt):
        save_round(tmp_path, 3)
    monkeypatch.undo()
    # A kill -9 also leaves the half-written temporary file behind.
    (checkpoint_dir(tmp_path) / ".round-3.pt.abc.tmp").write_bytes(b"PK\x03\x04 half a zip")

    checkpoint = latest_checkpoint(tmp_path, FederationConfig(), FINGERPRINT)
    assert checkpoint is not None and checkpoint.round == 2
    assert torch.equal(checkpoint.global_weights["fc.bias"], torch.full((3,), 2.0))


def test_a_round_file_written_but_never_confirmed_by_latest_json_is_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_round(tmp_path, 1)
    real_replace = os.replace

    def kill_when_pointer_is_replaced(src: str, dst: str) -> None:
        if str(dst).endswith("latest.json"):
            raise KeyboardInterrupt("killed between checkpoint and pointer")
        real_replace(src, dst)

    monkeypatch.setattr(atomic_io.os, "replace", kill_when_pointer_is_replaced)
    with pytest.raises(KeyboardInterrupt):
        save_round(tmp_path, 2)
    monkeypatch.undo()
    assert (checkpoint_dir(tmp_path) / "round-2.pt").exists()
    checkpoint = latest_checkpoint(tmp_path)
    assert checkpoint is not None and checkpoint.round == 1


def test_a_damaged_latest_round_falls_back_to_the_previous_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    save_round(tmp_path, 1)
    damaged = save_round(tmp_path, 2)
    damaged.write_bytes(damaged.read_bytes()[:50])
    with caplog.at_level(logging.WARNING):
        checkpoint = latest_checkpoint(tmp_path)
    assert checkpoint is not None and checkpoint.round == 1
    assert "round-2.pt" in caplog.text


def test_no_readable_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    path = save_round(tmp_path, 1)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointReadError, match="fresh run directory"):
        latest_checkpoint(tmp_path)


def test_resuming_with_another_configuration_names_the_differing_field(tmp_path: Path) -> None:
    save_round(tmp_path, 1, FederationConfig())
    changed = FederationConfig.from_dict({"model": {"architecture": "resnet50"}})
    with pytest.raises(CheckpointMismatchError) as info:
        latest_checkpoint(tmp_path, changed, FINGERPRINT)
    message = str(info.value)
    assert "model.architecture" in message and "resnet18" in message and "resnet50" in message
    assert "the run started with" in message and "fresh run directory" in message  # says what to do


def test_resuming_with_more_rounds_or_another_timeout_is_allowed(tmp_path: Path) -> None:
    save_round(tmp_path, 1, FederationConfig())
    extended = FederationConfig.from_dict(
        {"training": {"rounds": 50}, "strategy": {"round_timeout_s": 30.0}}
    )
    checkpoint = latest_checkpoint(tmp_path, extended, FINGERPRINT)
    assert checkpoint is not None and checkpoint.round == 1


def test_resuming_with_another_backbone_is_refused_naming_both_fingerprints(tmp_path: Path) -> None:
    save_round(tmp_path, 1)
    with pytest.raises(CheckpointMismatchError, match="fp-resnet18-1.*other-backbone"):
        latest_checkpoint(tmp_path, backbone_fingerprint="other-backbone")
