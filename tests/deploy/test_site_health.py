"""fedtl-hospital health: connection, cached backbone and privacy budget, without touching site state."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from client.privacy.privacy_budget import PrivacyLedger
from client.site_health import check_site, main, render


def _ledger_with_a_reserved_round(state_dir: Path) -> Path:
    path = state_dir / "ledger.json"
    ledger = PrivacyLedger.load_or_create(
        path, target_epsilon=8.0, delta=1e-4, sample_rate=0.05, planned_steps=200, unit="patient"
    )
    ledger.reserve(40)  # a round in progress: its steps count as spent
    return path


def test_site_that_never_started_is_reported_not_connected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--state-dir", str(tmp_path)])

    out = capsys.readouterr().out
    assert code == 1
    assert "NOT CONNECTED" in out
    assert "fedtl-hospital start" in out


def test_dead_supernode_pid_is_not_connected_even_if_the_pid_is_reused(tmp_path: Path) -> None:
    # Our own pid is alive but is not a flower-supernode.
    (tmp_path / "supernode.json").write_text(
        json.dumps({"pid": os.getpid(), "superlink": "127.0.0.1:9", "ca_cert": str(tmp_path / "ca.crt")})
    )

    health = check_site(tmp_path)

    assert not health.supernode_alive
    assert not health.superlink_reachable
    assert not health.connected


def test_newest_cached_backbone_is_listed_first(tmp_path: Path) -> None:
    backbones = tmp_path / "backbones"
    backbones.mkdir()
    (backbones / "aaa111.pt").write_bytes(b"old")
    (backbones / "bbb222.pt").write_bytes(b"new")
    past = time.time() - 3600
    os.utime(backbones / "aaa111.pt", (past, past))

    health = check_site(tmp_path)

    assert health.backbone_fingerprints == ["bbb222", "aaa111"]
    assert "bbb222 (+1 older cached)" in render(health)


def test_privacy_budget_is_read_from_the_ledger_without_rewriting_it(tmp_path: Path) -> None:
    ledger_path = _ledger_with_a_reserved_round(tmp_path)
    before = ledger_path.read_bytes()

    privacy = check_site(tmp_path).privacy

    assert privacy.error is None
    assert privacy.target_epsilon == pytest.approx(8.0)
    assert 0 < privacy.spent_epsilon < 8.0
    assert privacy.remaining_epsilon == pytest.approx(8.0 - privacy.spent_epsilon)
    assert (privacy.delta, privacy.unit) == (pytest.approx(1e-4), "patient")
    assert "(delta 0.0001; unit: one patient)" in render(check_site(tmp_path))
    assert ledger_path.read_bytes() == before


def test_damaged_ledger_is_reported_with_its_target_instead_of_crashing(tmp_path: Path) -> None:
    ledger_path = _ledger_with_a_reserved_round(tmp_path)
    document = json.loads(ledger_path.read_text())
    document["ledger"]["rounds_done"] = 99  # checksum no longer matches
    ledger_path.write_text(json.dumps(document))

    privacy = check_site(tmp_path).privacy

    assert privacy.spent_epsilon is None
    assert privacy.target_epsilon == pytest.approx(8.0)
    assert "checksum" in (privacy.error or "")


def test_health_is_reachable_through_the_hospital_command(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "client.hospital_daemon", "health", "--state-dir", str(tmp_path), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )

    assert result.returncode == 1
    assert json.loads(result.stdout)["connected"] is False


def test_a_ledger_that_spent_less_than_the_sites_own_round_records_is_reported_as_reset(tmp_path: Path) -> None:
    from client.site_state import SiteState

    SiteState(tmp_path).record_round(1, "ok", epsilon=5.0, delta=1e-4, num_examples=10, steps=4)
    _ledger_with_a_reserved_round(tmp_path)  # a fresh ledger: it spent far less than 5.0

    health = check_site(tmp_path)

    assert health.privacy.warning is not None and "reset" in health.privacy.warning
    assert "WARNING" in render(health) and "records 5.000" in render(health)
