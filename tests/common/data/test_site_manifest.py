"""load_manifest: CSV and class-folder layouts, and errors that name the row and the fix."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.data.site_manifest import ManifestError, load_manifest
from tests.common.data import dicom_factory as factory


def _png(path: Path, value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, dtype=np.uint8)).save(path)
    return path


def _csv(folder: Path, text: str, images: tuple[str, ...] = ("a.png", "b.png", "c.png")) -> Path:
    for name in images:
        _png(folder / name)
    path = folder / "manifest.csv"
    path.write_text(text, encoding="utf-8")
    return path


def _error(path: Path, **kwargs: object) -> str:
    with pytest.raises(ManifestError) as caught:
        load_manifest(path, **kwargs)  # type: ignore[arg-type]
    message = str(caught.value)
    assert str(path) in message
    return message


def test_csv_paths_are_relative_to_the_csv_and_labels_follow_class_names(tmp_path: Path) -> None:
    path = _csv(tmp_path, "path,label,patient_id,age\na.png,finding,p1,61\nb.png,normal,p1,61\nc.png,normal,p2,40\n")
    manifest = load_manifest(path, ["normal", "finding"], ["age"])
    assert [e.path for e in manifest.entries] == [(tmp_path / n).resolve() for n in ("a.png", "b.png", "c.png")]
    assert manifest.labels() == [1, 0, 0]
    assert manifest.patient_ids() == ["p1", "p1", "p2"]
    assert manifest.entries[0].clinical == (61.0,)
    assert manifest.class_counts() == {"normal": 2, "finding": 1}


def test_class_names_default_to_sorted_labels(tmp_path: Path) -> None:
    path = _csv(tmp_path, "path,label,patient_id\na.png,zebra,p1\nb.png,ant,p2\n", ("a.png", "b.png"))
    assert load_manifest(path).class_names == ("ant", "zebra")


def test_semicolon_csv_with_bom_and_decimal_commas_is_accepted(tmp_path: Path) -> None:
    path = _csv(tmp_path, "\ufeffpath;label;patient_id;crp\na.png;x;p1;1,5\n", ("a.png",))
    assert load_manifest(path, ["x"], ["crp"]).entries[0].clinical == (1.5,)


def test_empty_clinical_cell_means_missing(tmp_path: Path) -> None:
    path = _csv(tmp_path, "path,label,patient_id,age\na.png,x,p1,\n", ("a.png",))
    assert math.isnan(load_manifest(path, ["x"], ["age"]).entries[0].clinical[0])


def test_a_missing_file_is_not_a_manifest_error_it_is_skipped_when_the_images_are_read(tmp_path: Path) -> None:
    """One missing file in a manifest of thousands must not stop the site (common.data.site_dataset
    skips it with its row and counts it with the unreadable ones)."""
    path = _csv(tmp_path, "path,label,patient_id\na.png,x,p1\nmissing.png,x,p2\n", ("a.png",))
    manifest = load_manifest(path, ["x"])
    assert [entry.row for entry in manifest.entries] == [2, 3]


def test_unknown_label_lists_the_allowed_ones(tmp_path: Path) -> None:
    path = _csv(tmp_path, "path,label,patient_id\na.png,normal,p1\nb.png,tumour,p2\n", ("a.png", "b.png"))
    message = _error(path, class_names=["normal", "finding"])
    assert "row 3" in message and "'tumour'" in message and "'normal', 'finding'" in message


def test_duplicate_row_names_both_rows(tmp_path: Path) -> None:
    path = _csv(tmp_path, "path,label,patient_id\na.png,x,p1\n./a.png,x,p1\n", ("a.png",))
    message = _error(path, class_names=["x"])
    assert "row 3: duplicate of row 2" in message


def test_non_numeric_clinical_value_is_rejected_without_echoing_it(tmp_path: Path) -> None:
    path = _csv(tmp_path, "path,label,patient_id,age\na.png,x,p1,forty-two\n", ("a.png",))
    message = _error(path, class_names=["x"], clinical_features=["age"])
    assert "row 2" in message and "'age'" in message and "not a number" in message
    assert "forty-two" not in message


def test_missing_column_is_named(tmp_path: Path) -> None:
    path = _csv(tmp_path, "path,label\na.png,x\n", ("a.png",))
    message = _error(path, class_names=["x"])
    assert "missing column(s) patient_id" in message and "line 1" in message


def test_missing_clinical_column_suggests_the_config_fix(tmp_path: Path) -> None:
    path = _csv(tmp_path, "path,label,patient_id\na.png,x,p1\n", ("a.png",))
    message = _error(path, class_names=["x"], clinical_features=["age"])
    assert "age" in message and "clinical_features" in message


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = _csv(tmp_path, "path,label,patient_id\nnope1.png,z,p1\nnope2.png,y,\n", ())
    message = _error(path, class_names=["x"])
    assert "3 problem(s)" in message  # two unknown labels and an empty patient id


def test_patient_ids_never_appear_in_errors(tmp_path: Path) -> None:
    path = _csv(tmp_path, "path,label,patient_id\nnope.png,bad,SECRET-PID-42\n", ())
    assert "SECRET-PID-42" not in _error(path, class_names=["x"])
    manifest_ok = _csv(tmp_path / "ok", "path,label,patient_id\na.png,x,SECRET-PID-42\n", ("a.png",))
    assert "SECRET-PID-42" not in repr(load_manifest(manifest_ok, ["x"]).entries[0])


def test_class_absent_from_the_site_is_allowed_unless_required(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _csv(tmp_path, "path,label,patient_id\na.png,normal,p1\n", ("a.png",))
    with caplog.at_level("WARNING"):
        assert load_manifest(path, ["normal", "finding"]).class_counts()["finding"] == 0
    assert "'finding'" in caplog.text
    message = _error(path, class_names=["normal", "finding"], require_all_classes=True)
    assert "no images" in message


def test_folder_layout_uses_subfolders_as_classes_and_stem_as_patient(tmp_path: Path) -> None:
    _png(tmp_path / "site" / "normal" / "n1.png")
    _png(tmp_path / "site" / "finding" / "f1.png")
    _png(tmp_path / "site" / "finding" / "f2.png")
    manifest = load_manifest(tmp_path / "site", ["normal", "finding"])
    assert manifest.class_counts() == {"normal": 1, "finding": 2}
    assert sorted(manifest.patient_ids()) == ["f1", "f2", "n1"]


def test_folder_layout_takes_the_dicom_patient_id(tmp_path: Path) -> None:
    factory.write_dicom(tmp_path / "site" / "normal" / "img1.dcm", factory.gradient_image(8, 8), patient_id="PAT-9")
    factory.write_dicom(tmp_path / "site" / "normal" / "img2.dcm", factory.gradient_image(8, 8), patient_id="PAT-9")
    manifest = load_manifest(tmp_path / "site")
    assert manifest.patient_ids() == ["PAT-9", "PAT-9"]


def test_empty_class_folder_is_an_error(tmp_path: Path) -> None:
    _png(tmp_path / "site" / "normal" / "n1.png")
    (tmp_path / "site" / "finding").mkdir()
    message = _error(tmp_path / "site", class_names=["normal", "finding"])
    assert "class folder 'finding' is empty" in message


def test_missing_manifest_is_explained(tmp_path: Path) -> None:
    message = _error(tmp_path / "nothing.csv")
    assert "no such manifest" in message
