"""The report's site-use section: each simulated site's operating point, saliency overlays and pointing game."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from client.site_settings import SiteSettings
from simulations.site_use_report import format_site_use, site_use_section
from tests.client.inference.conftest import make_trained_site


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, SiteSettings]]:
    root = tmp_path_factory.mktemp("site-use")
    site = make_trained_site(root / "build", images=40, seed=6)
    run = root / "run"
    shutil.copytree(site.state_dir, run / "sites" / "hospital-0")
    sites = {0: SiteSettings(site_name="hospital-0", manifest=site.manifest, state_dir=run / "sites" / "hospital-0"),
             1: SiteSettings(site_name="hospital-1", manifest=site.manifest, state_dir=run / "sites" / "hospital-1")}
    (run / "sites" / "hospital-1").mkdir()  # a site that never finished: left out, not a failure
    return run, sites


def test_each_finished_site_shows_its_operating_point_overlays_and_pointing_game(run_dir) -> None:  # noqa: ANN001
    run, sites = run_dir
    section = site_use_section(run, sites)
    assert list(section) == ["hospital-0"]
    row = section["hospital-0"]
    assert row["operating_point"]["rule"] == "youden" and row["operating_point"]["threshold"] is not None
    assert 1 <= len(row["overlays"]) <= 4 and all((run / png).is_file() for png in row["overlays"])
    game = row["pointing_game"]
    assert game["findings"] >= 1 and 0.0 <= game["score"] <= 1.0 and 0.0 < game["random_peak"] < 0.5

    lines = format_site_use({"site_use": section})
    text = "\n".join(lines)
    assert "## Using the model at each site" in text
    assert "| hospital-0 | youden |" in text
    assert f"]({row['overlays'][0]})" in text  # report.md (in the run folder) links the overlays relatively


def test_a_report_without_the_section_shows_nothing_of_it() -> None:
    assert format_site_use({}) == []
