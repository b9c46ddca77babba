"""Before anything trains, every site is checked; a site that cannot take part stops the run, by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.site_settings import SiteSettings
from common.config import FederationConfig
from simulations import cli
from simulations.preflight import PreflightRefused, check_site, check_sites, format_checks, refuse_unless_ready
from tests.simulations.site_folders import balanced_patients, write_site


def site(tmp_path: Path, name: str, patients: dict[str, tuple[str, int]], **kwargs: int) -> SiteSettings:
    manifest = write_site(tmp_path / "sites" / name, patients, **kwargs)
    return SiteSettings(site_name=name, manifest=manifest, state_dir=tmp_path / "state" / name)


def refusal(checks: list) -> str:
    with pytest.raises(PreflightRefused) as caught:
        refuse_unless_ready(checks)
    return str(caught.value)


def test_a_sound_site_passes_and_its_summary_counts_images_patients_and_the_split(tmp_path: Path) -> None:
    check = check_site(site(tmp_path, "north", balanced_patients("n", per_class=4), corrupt=1), FederationConfig())
    assert check.problems == ()
    assert (check.images, check.readable, check.patients) == (17, 16, 8)
    assert check.images_per_class == {"normal": 8, "finding": 8}
    assert check.train_patients_per_class == {"normal": 3, "finding": 3}
    assert check.test_patients_per_class == {"normal": 1, "finding": 1}
    table = format_checks([check])
    assert "| north | 17 (16) | 8 |" in table and "normal 3/1, finding 3/1" in table
    assert "broken0.png" in table, "the unreadable file is shown to the researcher, with its reason"
    refuse_unless_ready([check])


def test_a_site_with_no_patient_of_a_class_in_training_is_refused_by_name(tmp_path: Path) -> None:
    only_normal = {f"p{i}": ("normal", 2) for i in range(6)}
    checks = check_sites({0: site(tmp_path, "north", balanced_patients("n")),
                          1: site(tmp_path, "south", only_normal)}, FederationConfig())
    message = refusal(checks)
    assert "site 'south': no 'finding' patient among its training patients" in message
    assert "add patients of that class" in message and "north" not in message


def test_a_site_whose_test_patients_lack_a_class_is_refused_with_what_to_change(tmp_path: Path) -> None:
    one_finding = {**{f"p{i}": ("normal", 2) for i in range(6)}, "f0": ("finding", 3)}
    message = refusal([check_site(site(tmp_path, "east", one_finding), FederationConfig())])
    assert "site 'east': no 'finding' patient among its test patients" in message
    assert "test_fraction" in message


def test_a_site_with_fewer_test_patients_than_the_configured_minimum_is_refused(tmp_path: Path) -> None:
    config = FederationConfig.from_dict({"data": {"min_test_patients": 3}})
    message = refusal([check_site(site(tmp_path, "west", balanced_patients("w", per_class=4)), config)])
    assert "site 'west': 2 test patient(s), fewer than [data] min_test_patients = 3" in message
    assert "raise [data] test_fraction" in message


def test_a_site_with_more_unreadable_images_than_allowed_is_refused(tmp_path: Path) -> None:
    check = check_site(site(tmp_path, "south", balanced_patients("s", per_class=4), corrupt=3), FederationConfig())
    message = refusal([check])
    assert "site 'south': 3 of 19 images are missing or unreadable" in message
    assert "max_unreadable_share = 10%" in message


def test_a_site_whose_manifest_cannot_be_read_is_refused_by_name(tmp_path: Path) -> None:
    broken = site(tmp_path, "north", balanced_patients("n"))
    broken.manifest.write_text("file,diagnosis\nx.png,normal\n")
    message = refusal([check_site(broken, FederationConfig())])
    assert "site 'north': its manifest cannot be used" in message and "missing column(s)" in message


def test_the_command_stops_before_training_and_names_the_site(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_site(tmp_path / "study" / "north", balanced_patients("n"))
    write_site(tmp_path / "study" / "south", {f"p{i}": ("normal", 2) for i in range(6)})
    code = cli.main(["simulate", "--sites-from", str(tmp_path / "study"), "--out", str(tmp_path / "run"),
                     "--no-baselines"])
    out, err = capsys.readouterr()
    assert code == 2
    assert "| north |" in out and "| south |" in out, "the summary of every site is printed first"
    assert "site 'south'" in err and "nothing was trained" in err
    assert not (tmp_path / "run" / "metrics.json").exists() and not (tmp_path / "run" / "sites").exists()
    assert cli.main(["simulate", "--sites-from", str(tmp_path / "study"), "--sites", "3",
                     "--out", str(tmp_path / "other")]) == 2
    assert "remove --sites" in capsys.readouterr().err
