"""A new simulation never inherits an earlier run's simulated hospitals (and their spent budgets)."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.run_folder import RunFolderInUse, prepare_run_folder


def earlier_run(run_dir: Path) -> Path:
    ledger = run_dir / "sites" / "hospital-0" / "ledger.json"
    ledger.parent.mkdir(parents=True)
    ledger.write_text("{}")
    (run_dir / "metrics.json").write_text("{}")
    return ledger


def test_a_new_or_empty_folder_is_used_as_it_is(tmp_path: Path) -> None:
    prepare_run_folder(tmp_path / "new", resume=False, overwrite=False)
    (tmp_path / "empty").mkdir()
    prepare_run_folder(tmp_path / "empty", resume=False, overwrite=False)
    assert (tmp_path / "empty").is_dir()


def test_a_folder_holding_a_run_is_refused_with_the_three_ways_out(tmp_path: Path) -> None:
    ledger = earlier_run(tmp_path / "run")
    with pytest.raises(RunFolderInUse, match="--resume.*--overwrite.*--out"):
        prepare_run_folder(tmp_path / "run", resume=False, overwrite=False)
    assert ledger.exists(), "nothing is deleted without --overwrite"


def test_resume_keeps_the_run_and_overwrite_replaces_it(tmp_path: Path) -> None:
    ledger = earlier_run(tmp_path / "run")
    prepare_run_folder(tmp_path / "run", resume=True, overwrite=False)
    assert ledger.exists()
    prepare_run_folder(tmp_path / "run", resume=False, overwrite=True)
    assert not (tmp_path / "run").exists()


def test_overwrite_refuses_a_folder_that_is_not_a_fedtl_run(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderInUse, match="holds no fedtl run"):
        prepare_run_folder(tmp_path, resume=False, overwrite=True)
    assert (tmp_path / "notes.txt").exists()


def test_overwrite_replaces_what_an_interrupted_overwrite_left_behind(tmp_path: Path) -> None:
    """An overwrite killed half-way may leave only metrics.csv, baselines/ and variants/: still a fedtl run."""
    run = tmp_path / "run"
    (run / "baselines").mkdir(parents=True)
    (run / "metrics.csv").write_text("round,site\n")
    prepare_run_folder(run, resume=False, overwrite=True)
    assert not run.exists()
