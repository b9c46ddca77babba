"""No DICOM header value reaches a log line; the local report shows device categories only.

Decision (documented in common.data.data_quality): the quality report is LOCAL. It may count
manufacturers and modalities of the site's own data for the admin; it must never contain
patient names, ids, dates, institutions, accession numbers or physicians; and no log line
may contain any header value at all, manufacturer included.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import JPEGLSLossless

from common.data.data_quality import format_quality_report, quality_report
from common.data.image_preprocessing import Preprocessing
from common.data.metadata_guard import (
    MASK,
    REGISTRY,
    SensitiveValueFilter,
    SensitiveValueRegistry,
    install_log_guard,
    register_sensitive,
)
from common.data.site_dataset import load_site_dataset
from common.data.site_manifest import load_manifest
from tests.common.data import dicom_factory as factory

INVALID_DATE = "Qx-Birth-1947"  # an invalid DA value: pydicom's validation would quote it
LONG_ID = "LONGPID-" + "9" * 70  # longer than LO allows: pydicom warns about it


def _hospital(tmp_path: Path) -> Path:
    """A CSV site and a folder site whose files carry the distinctive identifying values."""
    site = tmp_path / "site"
    rows = ["path,label,patient_id"]
    for i in range(4):
        header = {"PatientBirthDate": INVALID_DATE} if i == 3 else None
        patient = LONG_ID if i == 2 else factory.PATIENT_ID
        with warnings.catch_warnings():  # pydicom rightly complains while WRITING these values
            warnings.simplefilter("ignore")
            factory.write_dicom(site / f"img{i}.dcm", factory.gradient_image(20, 20) // (i + 1),
                                header=header, patient_id=patient)
        # The CSV's own patient id column uses a pseudonym, as sites should.
        rows.append(f"img{i}.dcm,{'finding' if i % 2 else 'normal'},pseudo-{i}")
    broken = factory.write_dicom(site / "broken.dcm", factory.gradient_image(40, 40))
    broken.write_bytes(broken.read_bytes()[:-900])
    factory.write_dicom(site / "lossless.dcm", factory.gradient_image(20, 20), transfer_syntax=JPEGLSLossless)
    rows += ["broken.dcm,normal,pseudo-9", "lossless.dcm,normal,pseudo-8"]
    (site / "manifest.csv").write_text("\n".join(rows) + "\n")
    for name in ("normal", "finding"):
        factory.write_dicom(tmp_path / "folder" / name / f"{name}.dcm", factory.gradient_image(20, 20))
    return site / "manifest.csv"


def _assert_clean(text: str, *, allow_manufacturer: bool = False) -> None:
    forbidden = [*factory.IDENTIFYING_VALUES, INVALID_DATE, LONG_ID, "Synthetic Hospital"]
    if not allow_manufacturer:
        forbidden.append(factory.MANUFACTURER)
    leaks = [value for value in forbidden if value in text]
    assert not leaks, f"identifying values leaked: {leaks}"


def test_no_header_value_reaches_logs_or_the_report(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first line of defence must hold alone: switch off the masking log guard.
    import common.data.metadata_guard as guard

    monkeypatch.setattr(guard, "mask_record", lambda *args, **kwargs: None)
    manifest = _hospital(tmp_path)
    caplog.clear()  # writing the test files makes pydicom warn; only reading is under test
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_manifest(manifest, ["normal", "finding"])
        load_manifest(tmp_path / "folder", ["normal", "finding"])  # reads PatientID from the files
        data = load_site_dataset(manifest, preprocessing=Preprocessing(16, 1), cache_dir=tmp_path / "cache",
                                 class_names=["normal", "finding"], show_progress=False)
        report = quality_report(manifest, class_names=["normal", "finding"])
        text = format_quality_report(report)
    assert len(data) == 5 and len(data.skipped) == 1  # the broken file was skipped, not fatal
    log_text = "\n".join(record.getMessage() for record in caplog.records)
    log_text += "\n".join(str(w.message) for w in caught)
    assert caplog.records, "the pipeline should log something, or this test proves nothing"
    _assert_clean(log_text)
    _assert_clean(json.dumps(report), allow_manufacturer=True)
    _assert_clean(text, allow_manufacturer=True)
    _assert_clean(repr(data))
    # What the report is allowed to do: count the site's devices, for the local admin.
    assert report["histograms"]["manufacturer"] == {factory.MANUFACTURER: 6}  # broken file's header too
    assert report["local_only"] is True


def test_reader_registers_identifying_values_it_sees(tmp_path: Path) -> None:
    REGISTRY.clear()
    from common.data.dicom_reader import read_image

    read_image(factory.write_dicom(tmp_path / "a.dcm", factory.gradient_image(8, 8)))
    for value in (factory.PATIENT_NAME, "Quorra", factory.PATIENT_ID, factory.INSTITUTION,
                  factory.STUDY_DATE, "2023-09-17", factory.MANUFACTURER):
        assert value in REGISTRY
    assert factory.PATIENT_ID not in repr(REGISTRY)


def test_filter_masks_registered_values_in_messages_and_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    registry = SensitiveValueRegistry()
    registry.register(["Zyx^Quorra", "Zyx", "Quorra", "PID-7731", "M"])
    handler_filter = SensitiveValueFilter(registry)
    logger = logging.getLogger("tests.guard.filter")
    caplog.handler.addFilter(handler_filter)
    try:
        with caplog.at_level(logging.INFO, logger="tests.guard.filter"):
            logger.info("patient %s with id %s", "Zyx^Quorra", "PID-7731")
            try:
                raise ValueError("bad PID-7731")
            except ValueError:
                logger.exception("failed for M")
    finally:
        caplog.handler.removeFilter(handler_filter)
    assert caplog.records[0].getMessage() == f"patient {MASK} with id {MASK}"
    assert "PID-7731" not in caplog.text and "Quorra" not in caplog.text
    assert "failed for M" in caplog.text  # one-letter values are never masked


def test_installed_guard_masks_records_from_any_logger(caplog: pytest.LogCaptureFixture) -> None:
    install_log_guard()
    install_log_guard()  # idempotent
    register_sensitive("Vexmoor-Clinic-77")
    with caplog.at_level(logging.WARNING):
        logging.getLogger("some.third.party").warning("opened study at Vexmoor-Clinic-77")
    assert "Vexmoor-Clinic-77" not in caplog.text and MASK in caplog.text


def test_registry_ignores_short_strings_and_masks_longest_first() -> None:
    registry = SensitiveValueRegistry()
    registry.register(["ab", "Zyx", "Zyx^Quorra"])
    assert len(registry) == 2
    assert registry.mask("x Zyx^Quorra y Zyx") == f"x {MASK} y {MASK}"


def test_patient_ids_are_not_in_site_data_repr(tmp_path: Path) -> None:
    manifest = _hospital(tmp_path)
    data = load_site_dataset(manifest, preprocessing=Preprocessing(8, 1), cache_dir=tmp_path / "c",
                             class_names=["normal", "finding"], show_progress=False)
    assert "pseudo-" not in repr(data)
    assert np.isfinite(data.images.numpy()).all()
