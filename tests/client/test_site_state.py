"""Specification of a site's state directory: atomic, crash-safe, and loud about damage."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from client.privacy.privacy_budget import LedgerCorruptError, PrivacyLedger
from client.site_state import BackboneCacheError, SiteState, SiteStateError, tensor_fingerprint
from common.wire_contract import STATUS_DECLINED_BUDGET, STATUS_OK

REPO_ROOT = Path(__file__).resolve().parents[2]
LEDGER_PLAN = {
    "target_epsilon": 3.0,
    "delta": 1e-3,
    "sample_rate": 0.25,
    "planned_steps": 12,
    "accountant": "rdp",
}


def _head(value: float) -> dict[str, torch.Tensor]:
    return {"fc.weight": torch.full((2, 8), value), "fc.bias": torch.full((2,), value)}


def _backbone(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(4, 1, 3, 3, generator=generator),
        "bn.running_mean": torch.randn(4, generator=generator),
        "bn.num_batches_tracked": torch.tensor(7),
    }


def test_state_directory_has_the_documented_layout(tmp_path: Path) -> None:
    state = SiteState(tmp_path / "site")
    assert state.ledger_path == tmp_path / "site" / "ledger.json"
    assert state.local_head_path == tmp_path / "site" / "local_head.pt"
    assert state.rounds_path == tmp_path / "site" / "rounds.json"
    for directory in ("backbones", "features", "decoded"):
        assert (tmp_path / "site" / directory).is_dir()
    assert state.features_dir_for("abc123") == tmp_path / "site" / "features" / "abc123"


def test_local_head_round_trips_through_disk(tmp_path: Path) -> None:
    SiteState(tmp_path).save_local_head(_head(1.5), backbone_fingerprint="fp1")
    loaded = SiteState(tmp_path).load_local_head(backbone_fingerprint="fp1")
    assert loaded is not None
    assert torch.equal(loaded["fc.weight"], _head(1.5)["fc.weight"])


def test_missing_local_head_means_initialise_a_new_one(tmp_path: Path) -> None:
    assert SiteState(tmp_path).load_local_head() is None


def test_local_head_for_another_backbone_is_not_loaded(tmp_path: Path) -> None:
    state = SiteState(tmp_path)
    state.save_local_head(_head(1.0), backbone_fingerprint="old")
    assert state.load_local_head(backbone_fingerprint="new") is None
    assert state.load_local_head() is not None


def test_truncated_local_head_falls_back_to_reinitialise_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = SiteState(tmp_path)
    state.save_local_head(_head(1.0))
    state.local_head_path.write_bytes(state.local_head_path.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="client.site_state"):
        assert state.load_local_head() is None
    assert str(state.local_head_path) in caplog.text
    assert "re-initialised" in caplog.text


def test_backbone_is_cached_by_fingerprint_and_verified_on_load(tmp_path: Path) -> None:
    state = SiteState(tmp_path)
    tensors = _backbone()
    fingerprint = tensor_fingerprint(tensors)
    assert not state.has_backbone(fingerprint)
    assert state.load_backbone(fingerprint) is None

    path = state.store_backbone(fingerprint, tensors, {"architecture": "resnet18"})
    assert path == tmp_path / "backbones" / f"{fingerprint}.pt"
    assert state.has_backbone(fingerprint)
    assert state.cached_backbones() == [fingerprint]
    loaded = SiteState(tmp_path).load_backbone(fingerprint)
    assert loaded is not None
    loaded_tensors, meta = loaded
    assert meta == {"architecture": "resnet18"}
    assert set(loaded_tensors) == set(tensors)
    assert all(torch.equal(loaded_tensors[name], tensors[name]) for name in tensors)


def test_backbone_that_does_not_match_its_announced_fingerprint_is_not_cached(
    tmp_path: Path,
) -> None:
    state = SiteState(tmp_path)
    with pytest.raises(BackboneCacheError, match="send the backbone again"):
        state.store_backbone(tensor_fingerprint(_backbone(1)), _backbone(2))
    assert state.cached_backbones() == []


def test_truncated_backbone_file_names_the_file_and_says_delete_it(tmp_path: Path) -> None:
    state = SiteState(tmp_path)
    fingerprint = tensor_fingerprint(_backbone())
    path = state.store_backbone(fingerprint, _backbone())
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(BackboneCacheError) as raised:
        state.load_backbone(fingerprint)
    assert str(path) in str(raised.value)
    assert "Delete" in str(raised.value)


def test_backbone_file_with_other_content_fails_the_fingerprint_check(tmp_path: Path) -> None:
    state = SiteState(tmp_path)
    fingerprint = tensor_fingerprint(_backbone(1))
    path = state.store_backbone(fingerprint, _backbone(1))
    other = state.store_backbone(tensor_fingerprint(_backbone(2)), _backbone(2))
    path.write_bytes(other.read_bytes())
    with pytest.raises(BackboneCacheError, match="fingerprint"):
        state.load_backbone(fingerprint)


@pytest.mark.parametrize("fingerprint", ["../ledger", "a/b", ".hidden", "", "x" * 200])
def test_fingerprint_from_the_network_can_not_escape_the_cache_directory(
    tmp_path: Path, fingerprint: str
) -> None:
    with pytest.raises(ValueError, match="plain name"):
        SiteState(tmp_path).backbone_path(fingerprint)


def test_round_bookkeeping_survives_a_restart(tmp_path: Path) -> None:
    state = SiteState(tmp_path)
    assert state.last_trained_round() is None
    state.record_round(1, STATUS_OK, epsilon=1.2, delta=1e-3, num_examples=64, steps=4)
    state.record_round(2, STATUS_DECLINED_BUDGET, epsilon=1.2, delta=1e-3)
    restarted = SiteState(tmp_path)
    assert restarted.last_trained_round() == 1
    assert [entry["status"] for entry in restarted.round_history()] == [
        STATUS_OK,
        STATUS_DECLINED_BUDGET,
    ]
    with pytest.raises(ValueError, match="status"):
        restarted.record_round(3, "maybe")


def test_corrupt_round_bookkeeping_names_the_file(tmp_path: Path) -> None:
    state = SiteState(tmp_path)
    state.rounds_path.write_text("{not json")
    with pytest.raises(SiteStateError, match="rounds.json"):
        state.last_trained_round()


def test_deleted_ledger_after_spending_privacy_refuses_to_start_a_new_budget(
    tmp_path: Path,
) -> None:
    state = SiteState(tmp_path)
    ledger = state.open_ledger(**LEDGER_PLAN)
    ledger.reserve(4)
    epsilon = PrivacyLedger.load(state.ledger_path).spent_epsilon()
    state.record_round(1, STATUS_OK, epsilon=epsilon, delta=ledger.delta)
    state.ledger_path.unlink()
    with pytest.raises(LedgerCorruptError, match="missing"):
        state.open_ledger(**LEDGER_PLAN)
    assert not state.ledger_path.exists()


def test_corrupt_ledger_refuses_to_train(tmp_path: Path) -> None:
    state = SiteState(tmp_path)
    state.open_ledger(**LEDGER_PLAN)
    state.ledger_path.write_text('{"ledger": {"history": [')
    with pytest.raises(LedgerCorruptError, match="refuses to train"):
        state.open_ledger(**LEDGER_PLAN)


@pytest.mark.parametrize("failing_call", ["replace", "fsync"])
def test_crash_during_a_write_leaves_the_previous_file_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing_call: str
) -> None:
    state = SiteState(tmp_path)
    fingerprint = tensor_fingerprint(_backbone())
    state.save_local_head(_head(1.0))
    state.store_backbone(fingerprint, _backbone(), {"version": 1})
    state.record_round(1, STATUS_OK, epsilon=0.5)

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError(f"simulated power loss in os.{failing_call}")

    monkeypatch.setattr(os, failing_call, crash)
    with pytest.raises(OSError, match="power loss"):
        state.save_local_head(_head(2.0))
    with pytest.raises(OSError, match="power loss"):
        state.store_backbone(fingerprint, _backbone(), {"version": 2})
    with pytest.raises(OSError, match="power loss"):
        state.record_round(2, STATUS_OK, epsilon=0.9)
    monkeypatch.undo()

    head = state.load_local_head()
    assert head is not None and torch.equal(head["fc.bias"], _head(1.0)["fc.bias"])
    backbone = state.load_backbone(fingerprint)
    assert backbone is not None and backbone[1] == {"version": 1}
    assert state.last_trained_round() == 1
    assert not [path for path in tmp_path.rglob("*.tmp")]


def test_process_killed_while_writing_leaves_a_loadable_local_head(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import sys, torch
        from client.site_state import SiteState
        state = SiteState(sys.argv[1])
        version = 0
        while True:
            version += 1
            state.save_local_head({"w": torch.full((1_000_000,), float(version))})
            print(version, flush=True)
        """
    )
    writer = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout is not None
        completed = [int(writer.stdout.readline()) for _ in range(3)]
        time.sleep(0.05)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)

    head = SiteState(tmp_path).load_local_head()
    assert head is not None, "the last complete version must survive the kill"
    values = head["w"].unique()
    assert values.numel() == 1, "a reader must never see a half-written file"
    assert values.item() >= completed[-1]


def test_the_global_layers_survive_a_restart_and_a_damaged_file_means_asking_again(tmp_path) -> None:
    state = SiteState(tmp_path)
    assert state.load_global_layers() is None
    tensors = {"conv.weight": torch.randn(4, 2, 3, 3)}
    state.store_global_layers("ab" * 32, tensors)
    version_id, loaded = SiteState(tmp_path).load_global_layers()
    assert version_id == "ab" * 32 and torch.equal(loaded["conv.weight"], tensors["conv.weight"])
    state.global_layers_path.write_bytes(b"not a torch file")
    assert SiteState(tmp_path).load_global_layers() is None
