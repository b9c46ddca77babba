"""``fedtl-coordinator run`` checks everything before it submits, and remembers the runs it started."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.ops.coordinator_settings import CoordinatorError, CoordinatorSettings
from server.ops.run_command import RecordedRun, latest_run, prepare_request, record_run, recorded_runs

DEPLOY_TOML = Path(__file__).resolve().parents[2] / "deploy" / "federation.toml"


def test_a_request_has_absolute_paths_the_rounds_of_its_config_and_the_cache_in_the_state_dir(tmp_path: Path) -> None:
    settings = CoordinatorSettings(state_dir=tmp_path / "state")
    request = prepare_request(settings, DEPLOY_TOML, tmp_path / "runs" / "first")

    assert request.out_dir.is_absolute() and request.out_dir.is_dir()
    assert request.cache_dir == (tmp_path / "state").resolve() / "cache"
    assert request.rounds == 3
    assert f'run-dir="{request.out_dir}"' in request.run_config() and "resume=false" in request.run_config()


def test_a_missing_config_an_earlier_run_and_a_reserved_key_are_refused_with_the_fix(tmp_path: Path) -> None:
    settings = CoordinatorSettings(state_dir=tmp_path / "state")
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "metrics.json").write_text("{}")

    with pytest.raises(CoordinatorError, match="no such file"):
        prepare_request(settings, tmp_path / "missing.toml", tmp_path / "out")
    with pytest.raises(CoordinatorError, match="--resume.*--overwrite"):
        prepare_request(settings, DEPLOY_TOML, earlier)
    with pytest.raises(CoordinatorError, match="use --config, --out"):
        prepare_request(settings, DEPLOY_TOML, tmp_path / "out", extra=['run-dir="/elsewhere"'])
    assert prepare_request(settings, DEPLOY_TOML, earlier, resume=True).resume


def test_every_started_run_is_recorded_and_the_newest_is_the_latest(tmp_path: Path) -> None:
    settings = CoordinatorSettings(state_dir=tmp_path)
    record_run(settings, RecordedRun(7, tmp_path / "a", None, 1.0))
    record_run(settings, RecordedRun(9, tmp_path / "b", DEPLOY_TOML, 2.0))

    assert [run.run_id for run in recorded_runs(settings)] == [7, 9]
    latest = latest_run(settings)
    assert latest is not None and latest.run_id == 9 and latest.config_file == DEPLOY_TOML
