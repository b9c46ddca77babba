"""Synthetic hospitals: real DICOM, heterogeneous sites, deterministic from the seed."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from common.data.dicom_reader import read_image
from common.data.image_preprocessing import Preprocessing
from common.data.site_dataset import load_site_dataset
from common.data.site_manifest import load_manifest
from common.data.synthetic_hospitals import (
    CLASS_NAMES,
    LESIONS_FILE,
    PUBLIC_CLASS_NAMES,
    _PatientAnatomy,
    default_site_sizes,
    generate_federation,
    generate_public_source,
)

SIZES = [16, 8, 8, 6]


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return generate_federation(tmp_path_factory.mktemp("fed"), num_sites=4, seed=3, image_size=32, site_sizes=SIZES)


def _rows(manifest: Path) -> list[dict[str, str]]:
    with manifest.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_one_valid_manifest_per_site_with_the_requested_sizes(federation: list[Path]) -> None:
    assert [m.parent.name for m in federation] == ["site_0", "site_1", "site_2", "site_3"]
    for manifest, size in zip(federation, SIZES, strict=True):
        loaded = load_manifest(manifest, list(CLASS_NAMES), ["age"])
        assert len(loaded) == size
        assert all(count > 0 for count in loaded.class_counts().values())  # both classes at every site


def test_patients_have_several_images_with_one_label(federation: list[Path]) -> None:
    rows = _rows(federation[0])
    by_patient: dict[str, set[str]] = {}
    for row in rows:
        by_patient.setdefault(row["patient_id"], set()).add(row["label"])
    assert len(by_patient) < len(rows)
    assert all(len(labels) == 1 for labels in by_patient.values())


def test_files_are_real_dicom_with_the_sites_scanner_properties(federation: list[Path]) -> None:
    seen = []
    for manifest in federation:
        ds = dcmread(manifest.parent / _rows(manifest)[0]["path"])
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
        assert ds.file_meta.TransferSyntaxUID.is_little_endian
        assert ds.Modality in ("CR", "DX", "MR") and "PixelSpacing" in ds
        assert ds.PatientID == _rows(manifest)[0]["patient_id"] and str(ds.PatientName).startswith("Synthetic")
        seen.append((ds.Modality, int(ds.BitsStored), ds.PhotometricInterpretation, int(ds.PixelRepresentation),
                     ds.get("RescaleSlope"), (int(ds.Rows), int(ds.Columns))))
    assert {s[0] for s in seen} == {"CR", "DX", "MR"}
    assert {s[1] for s in seen} == {8, 12, 16}
    assert {s[2] for s in seen} == {"MONOCHROME1", "MONOCHROME2"}
    assert 1 in {s[3] for s in seen}  # one site stores signed pixels
    assert {float(s[4]) for s in seen if s[4] is not None} >= {0.5, 2.0}
    assert len({s[5] for s in seen}) >= 3  # different matrix sizes, one of them portrait


def test_every_image_loads_and_sites_look_different(federation: list[Path], tmp_path: Path) -> None:
    stats = []
    for index, manifest in enumerate(federation):
        data = load_site_dataset(manifest, preprocessing=Preprocessing(32, 1), cache_dir=tmp_path / str(index),
                                 class_names=CLASS_NAMES, clinical_features=["age"], show_progress=False)
        assert data.skipped == [] and len(data) == SIZES[index]
        assert ((data.clinical >= 18) & (data.clinical <= 95)).all()
        raw = np.stack([dcmread(manifest.parent / r["path"]).pixel_array.astype(float).mean() for r in _rows(manifest)])
        stats.append(raw.mean())
    assert len({round(s) for s in stats}) == 4  # stored intensity scales differ per scanner


def test_monochrome1_sites_are_displayed_with_a_bright_body(federation: list[Path]) -> None:
    for manifest in federation:
        path = manifest.parent / _rows(manifest)[0]["path"]
        image = read_image(path)
        h, w = image.shape
        centre = image[h // 3 : 2 * h // 3, w // 3 : 2 * w // 3].mean()
        corner = np.concatenate([image[:3, :3].ravel(), image[-3:, -3:].ravel()]).mean()
        assert centre > corner, f"{manifest.parent.name}: the body should be brighter than the air"


def test_same_seed_gives_byte_identical_files_and_another_seed_does_not(tmp_path: Path) -> None:
    a = generate_federation(tmp_path / "a", num_sites=2, seed=5, image_size=24, site_sizes=[5, 4])
    b = generate_federation(tmp_path / "b", num_sites=2, seed=5, image_size=24, site_sizes=[5, 4])
    c = generate_federation(tmp_path / "c", num_sites=2, seed=6, image_size=24, site_sizes=[5, 4])
    for ma, mb, mc in zip(a, b, c, strict=True):
        assert ma.read_bytes() == mb.read_bytes()
        files = sorted(p.relative_to(ma.parent) for p in ma.parent.rglob("*.dcm"))
        assert files and all((ma.parent / f).read_bytes() == (mb.parent / f).read_bytes() for f in files)
        first = files[0]
        if (mc.parent / first).exists():
            assert dcmread(ma.parent / first).PixelData != dcmread(mc.parent / first).PixelData


def test_finding_is_a_subtle_local_lesion() -> None:
    rng = np.random.default_rng(0)
    anatomy = _PatientAnatomy.draw(rng, 64, 64, finding=True)
    assert anatomy.lesion is not None
    with_lesion = anatomy.render(np.random.default_rng(1), 64, 64)
    without = replace(anatomy, lesion=None).render(np.random.default_rng(1), 64, 64)
    difference = np.abs(with_lesion - without)
    assert 0.05 < difference.max() < 0.3  # subtle: well below the body's contrast
    assert (difference > 0.02).mean() < 0.20  # and local (a fifth of the image at most)


def test_every_finding_image_has_its_lesion_recorded_and_no_other_image_does(federation: list[Path]) -> None:
    for manifest in federation:
        with (manifest.parent / LESIONS_FILE).open(newline="") as handle:
            lesions = {row["path"]: row for row in csv.DictReader(handle)}
        assert set(lesions) == {row["path"] for row in _rows(manifest) if row["label"] == "finding"}


def test_the_recorded_lesion_is_where_the_lesion_was_drawn() -> None:
    anatomy = _PatientAnatomy.draw(np.random.default_rng(2), 48, 40, finding=True)
    with_lesion, place = anatomy.render_view(np.random.default_rng(1), 48, 40)
    without = replace(anatomy, lesion=None).render(np.random.default_rng(1), 48, 40)
    assert place is not None
    row, col, radius_rows, radius_cols = place.in_pixels(48, 40)
    yy, xx = np.mgrid[0:48, 0:40]
    inside = ((yy - row) / radius_rows) ** 2 + ((xx - col) / radius_cols) ** 2 <= 1.0
    difference = np.abs(with_lesion - without)
    assert inside[np.unravel_index(difference.argmax(), difference.shape)]
    assert difference[~inside].max() < 0.25 * difference.max()  # the ellipse holds the lesion's contrast


def test_recording_lesions_draws_nothing_from_the_generator() -> None:
    anatomy = _PatientAnatomy.draw(np.random.default_rng(2), 32, 32, finding=True)
    first, second = np.random.default_rng(7), np.random.default_rng(7)
    assert np.array_equal(anatomy.render(first, 32, 32), anatomy.render_view(second, 32, 32)[0])
    assert first.random() == second.random()


def test_default_site_sizes_differ_about_tenfold() -> None:
    sizes = default_site_sizes(4)
    assert sizes == [400, 120, 60, 40] and max(sizes) / min(sizes) == 10
    assert max(default_site_sizes(6)) / min(default_site_sizes(6)) == pytest.approx(10, rel=0.05)


def test_site_sizes_must_match_the_number_of_sites(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="one size per site"):
        generate_federation(tmp_path, num_sites=3, site_sizes=[4, 4])


def test_public_source_is_a_balanced_four_class_png_dataset(tmp_path: Path) -> None:
    manifest = generate_public_source(tmp_path / "pub", num_images=12, seed=0, image_size=24)
    loaded = load_manifest(manifest, list(PUBLIC_CLASS_NAMES))
    assert loaded.class_counts() == {name: 3 for name in PUBLIC_CLASS_NAMES}
    assert read_image(loaded.entries[0].path).shape == (24, 24)
    again = generate_public_source(tmp_path / "pub2", num_images=12, seed=0, image_size=24)
    assert (manifest.parent / "images" / "00005.png").read_bytes() == (again.parent / "images" / "00005.png").read_bytes()


def test_even_a_small_site_has_two_patients_of_each_class_so_both_sides_of_its_split_see_both(
    tmp_path: Path,
) -> None:
    manifests = generate_federation(tmp_path, num_sites=8, seed=0, image_size=16, site_sizes=[16] * 8)  # 4 or more patients each
    for manifest in manifests:
        patients_of: dict[str, set[str]] = {}
        for row in _rows(manifest):
            patients_of.setdefault(row["label"], set()).add(row["patient_id"])
        assert min(len(patients_of.get(name, ())) for name in CLASS_NAMES) >= 2, manifest.parent.name
