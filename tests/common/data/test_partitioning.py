"""Cutting one manifest into simulated sites: by a column, IID or Dirichlet, always by patient."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from common.config import PartitionConfig
from common.data.partitioning import PARTITION_FILE, PartitionError, write_partition

CLASSES = ("normal", "finding")


def write_source(folder: Path, patients: int = 60, finding_every: int = 3) -> Path:
    """A manifest of ``patients`` patients with 1-3 images each (empty files: nothing reads pixels here), an
    ``age`` column and a ``hospital`` column (three hospitals)."""
    (folder / "img").mkdir(parents=True)
    rows = []
    for patient in range(patients):
        label = CLASSES[1] if patient % finding_every == 0 else CLASSES[0]
        for view in range(1 + patient % 3):
            name = f"img/p{patient}_{view}.png"
            (folder / name).touch()
            rows.append({"path": name, "label": label, "patient_id": f"P{patient:03d}", "age": str(40 + patient % 30),
                         "hospital": f"H {patient % 3}"})
    manifest = folder / "labels.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def read_sites(out: Path) -> dict[str, list[dict[str, str]]]:
    return {folder.name: list(csv.DictReader((folder / "manifest.csv").open()))
            for folder in sorted(out.iterdir()) if folder.is_dir()}


def patients_of(rows: list[dict[str, str]]) -> set[str]:
    return {row["patient_id"] for row in rows}


@pytest.fixture()
def source(tmp_path: Path) -> Path:
    return write_source(tmp_path / "data")


def test_a_column_names_each_patients_site_and_every_column_is_kept(source: Path, tmp_path: Path) -> None:
    sites = write_partition(source, PartitionConfig(by="column", column="hospital"), CLASSES, tmp_path / "out")
    assert [s.name for s in sites] == ["H-0", "H-1", "H-2"]  # the value as a plain site name
    written = read_sites(tmp_path / "out")
    for name, rows in written.items():
        assert {row["hospital"] for row in rows} == {name.replace("-", " ")}
        assert set(rows[0]) == {"path", "label", "patient_id", "age", "hospital"}
        assert all(Path(row["path"]).is_absolute() and Path(row["path"]).is_file() for row in rows)
    assert sum(len(rows) for rows in written.values()) == len(list(csv.DictReader(source.open())))


def test_a_patient_under_two_column_values_is_refused(source: Path, tmp_path: Path) -> None:
    (source.parent / "img/extra.png").touch()
    with source.open("a", newline="") as handle:
        handle.write("img/extra.png,normal,P001,50,H 2\n")  # P001 is at H 1
    with pytest.raises(PartitionError, match="a patient belongs to one site"):
        write_partition(source, PartitionConfig(by="column", column="hospital"), CLASSES, tmp_path / "out")


def test_iid_deals_patients_evenly_and_spreads_every_class(source: Path, tmp_path: Path) -> None:
    write_partition(source, PartitionConfig(by="iid", num_sites=4, seed=1), CLASSES, tmp_path / "out")
    written = read_sites(tmp_path / "out")
    assert list(written) == ["hospital-0", "hospital-1", "hospital-2", "hospital-3"]
    sizes = [len(patients_of(rows)) for rows in written.values()]
    assert sum(sizes) == 60 and max(sizes) - min(sizes) <= 1
    for rows in written.values():
        findings = {row["patient_id"] for row in rows if row["label"] == "finding"}
        assert len(findings) == 5  # 20 finding patients over 4 sites


def test_no_patient_is_ever_at_two_sites(source: Path, tmp_path: Path) -> None:
    for index, config in enumerate([PartitionConfig(by="iid", num_sites=5),
                                    PartitionConfig(by="dirichlet", num_sites=5, alpha=0.3)]):
        write_partition(source, config, CLASSES, tmp_path / f"out{index}")
        seen: set[str] = set()
        for rows in read_sites(tmp_path / f"out{index}").values():
            assert not patients_of(rows) & seen
            seen |= patients_of(rows)
        assert len(seen) == 60


def test_dirichlet_with_a_fixed_seed_writes_the_same_manifests_and_another_seed_other_ones(
    source: Path, tmp_path: Path
) -> None:
    def cut(seed: int, out: str) -> dict[str, bytes]:
        config = PartitionConfig(by="dirichlet", num_sites=4, alpha=0.3, seed=seed, min_images_per_site=5)
        write_partition(source, config, CLASSES, tmp_path / out)
        return {p.relative_to(tmp_path / out).as_posix(): p.read_bytes() for p in sorted((tmp_path / out).rglob("*.*"))}

    first, again, other = cut(7, "a"), cut(7, "b"), cut(8, "c")
    assert first == again
    assert set(first) == set(other) and first != other


def test_dirichlet_gives_every_site_its_floor_of_each_class_and_skews_the_rest(source: Path, tmp_path: Path) -> None:
    config = PartitionConfig(by="dirichlet", num_sites=4, alpha=0.1, min_patients_per_class=2, seed=3,
                             min_images_per_site=0)
    write_partition(source, config, CLASSES, tmp_path / "out")
    shares = []
    for rows in read_sites(tmp_path / "out").values():
        per_class = {c: len({r["patient_id"] for r in rows if r["label"] == c}) for c in CLASSES}
        assert min(per_class.values()) >= 2
        shares.append(per_class["finding"] / sum(per_class.values()))
    assert max(shares) - min(shares) > 0.3, f"alpha 0.1 should skew the label mix strongly, got {shares}"
    summary = json.loads((tmp_path / "out" / PARTITION_FILE).read_text())
    assert summary["settings"]["alpha"] == 0.1 and set(summary["sites"]) == {f"hospital-{i}" for i in range(4)}


def test_a_partition_that_cannot_be_made_says_what_to_change(source: Path, tmp_path: Path) -> None:
    with pytest.raises(PartitionError, match="lower num_sites or min_patients_per_class"):
        write_partition(source, PartitionConfig(by="dirichlet", num_sites=11, min_patients_per_class=2), CLASSES,
                        tmp_path / "a")
    with pytest.raises(PartitionError, match="min_images_per_site"):
        write_partition(source, PartitionConfig(by="dirichlet", num_sites=4, min_images_per_site=1000), CLASSES,
                        tmp_path / "b")
    with pytest.raises(PartitionError, match="would receive no patient"):
        write_partition(source, PartitionConfig(by="iid", num_sites=61), CLASSES, tmp_path / "c")
    with pytest.raises(PartitionError, match="no column 'site'"):
        write_partition(source, PartitionConfig(by="column", column="site"), CLASSES, tmp_path / "d")
