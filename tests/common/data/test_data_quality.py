"""quality_report / format_quality_report / main: what a site admin sees about their data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.uid import RLELossless

from common.data.data_quality import format_quality_report, main, quality_report
from tests.common.data import dicom_factory as factory


def _site(tmp_path: Path) -> Path:
    """5 normal images (3 patients), 2 finding images (1 patient), one truncated file, one PNG."""
    site = tmp_path / "site"
    rows = ["path,label,patient_id"]
    plan = [("n0", "normal", "p1"), ("n1", "normal", "p1"), ("n2", "normal", "p2"), ("n3", "normal", "p3"),
            ("f0", "finding", "p4"), ("f1", "finding", "p4")]
    for name, label, patient in plan:
        syntax = RLELossless if name == "n3" else factory.ExplicitVRLittleEndian
        photometric = "MONOCHROME1" if name == "f1" else "MONOCHROME2"
        factory.write_dicom(site / f"{name}.dcm", factory.gradient_image(24, 20), transfer_syntax=syntax,
                            photometric=photometric, modality="CT" if label == "normal" else "OT")
        rows.append(f"{name}.dcm,{label},{patient}")
    broken = factory.write_dicom(site / "broken.dcm", factory.gradient_image(32, 32))
    broken.write_bytes(broken.read_bytes()[:-700])
    rows.append("broken.dcm,normal,p5")
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(site / "photo.png")
    rows.append("photo.png,normal,p6")
    (site / "manifest.csv").write_text("\n".join(rows) + "\n")
    return site / "manifest.csv"


def test_report_counts_images_patients_and_imbalance(tmp_path: Path) -> None:
    report = quality_report(_site(tmp_path), class_names=["normal", "finding"])
    assert report["num_images"] == 8 and report["num_readable"] == 7
    assert report["images_per_class"] == {"normal": 6, "finding": 2}
    assert report["readable_images_per_class"] == {"normal": 5, "finding": 2}
    assert report["patients_per_class"] == {"normal": 5, "finding": 1}
    assert report["num_patients"] == 6
    assert report["class_imbalance_ratio"] == pytest.approx(3.0)
    assert report["images_per_patient"] == {"min": 1, "median": 1, "max": 2}


def test_report_lists_unreadable_files_with_reasons(tmp_path: Path) -> None:
    report = quality_report(_site(tmp_path), class_names=["normal", "finding"])
    assert [u["file"] for u in report["unreadable"]] == ["broken.dcm"]
    assert "truncated or corrupt" in report["unreadable"][0]["reason"]


def test_report_histograms_cover_modality_device_size_and_photometric(tmp_path: Path) -> None:
    histograms = quality_report(_site(tmp_path), class_names=["normal", "finding"])["histograms"]
    assert histograms["modality"] == {"CT": 5, "OT": 2, "non-DICOM image": 1}
    assert histograms["manufacturer"] == {factory.MANUFACTURER: 7}
    assert histograms["photometric"]["MONOCHROME1"] == 1 and histograms["photometric"]["MONOCHROME2"] == 6
    assert histograms["image_size"] == {"24x20": 6, "10x12": 1}
    assert histograms["transfer_syntax"]["RLE Lossless"] == 1


def test_headers_only_mode_does_not_notice_truncated_pixels(tmp_path: Path) -> None:
    report = quality_report(_site(tmp_path), class_names=["normal", "finding"], decode=False)
    assert report["unreadable"] == []  # documented: only decoding finds damaged pixel data


def test_patients_with_mixed_labels_are_counted(tmp_path: Path) -> None:
    site = tmp_path / "s"
    for name in ("a", "b"):
        factory.write_dicom(site / f"{name}.dcm", factory.gradient_image(8, 8))
    (site / "m.csv").write_text("path,label,patient_id\na.dcm,x,p\nb.dcm,y,p\n")
    assert quality_report(site / "m.csv")["patients_with_mixed_labels"] == 1


def test_formatted_report_is_readable_text(tmp_path: Path) -> None:
    text = format_quality_report(quality_report(_site(tmp_path), class_names=["normal", "finding"]))
    assert "LOCAL ONLY" in text
    assert "class imbalance ratio" in text and "3.00" in text
    assert "broken.dcm" in text and "unreadable files (1)" in text


def test_main_prints_the_report_writes_json_and_signals_problems(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report.json"
    code = main([str(_site(tmp_path)), "--class-names", "normal,finding", "--json", str(out)])
    assert code == 1  # unreadable files found
    assert "Data-quality report" in capsys.readouterr().out
    assert json.loads(out.read_text())["num_images"] == 8


def test_main_reports_manifest_errors_with_exit_code_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "m.csv").write_text("path,label\n")
    assert main([str(tmp_path / "m.csv")]) == 2
    assert "missing column(s) patient_id" in capsys.readouterr().err


def test_without_class_names_an_odd_label_is_reported_as_a_likely_typo_not_counted_as_a_class(tmp_path: Path) -> None:
    manifest = _site(tmp_path)
    manifest.write_text(manifest.read_text() + "n0.dcm,finidng,p7\n".replace("n0.dcm", "n1.dcm"))
    manifest.write_text(manifest.read_text().replace("n1.dcm,normal,p1\n", "", 1))

    report = quality_report(manifest)
    text = format_quality_report(report)

    assert not report["classes_checked"] and report["rare_labels"] == ["finidng"]
    assert "label 'finidng' is on only 1 row(s): a typo?" in text and "NOT checked" in text


def test_the_quality_report_with_json_output_imports_no_torch(tmp_path: Path) -> None:
    import subprocess
    import sys

    script = ("import sys; from common.data.data_quality import main; "
              f"code = main([{str(_site(tmp_path))!r}, '--json', {str(tmp_path / 'r.json')!r}]); "
              "assert 'torch' not in sys.modules, 'torch was imported'; print('exit', code)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[3])
    assert "exit 1" in done.stdout, done.stderr[-2000:]
    assert (tmp_path / "r.json").exists()
