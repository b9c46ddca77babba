"""PHI canaries: patient-like strings planted in a site's data, which nothing outside the site may hold.

A corrupt file named after a patient, a readable DICOM whose header names them (name, id, birth date,
institution) and a missing file, as three manifest rows of one patient id. Used by the end-to-end
tests that grep everything a coordinator stores or logs.
"""

from __future__ import annotations

from pathlib import Path

import pydicom

CANARY_FILE = "CANARY-Smith-John-19650203"
CANARIES = (CANARY_FILE, "CANARY^SMITH^JOHN", "CANARY-MRN-4242", "19650203", "CANARY GENERAL")


def plant_canaries(manifest: Path) -> None:
    """Append the three canary rows to ``manifest`` (a fedtl CSV whose first row is a DICOM image)."""
    rows = manifest.read_text().splitlines()
    first = rows[1].split(",")
    source = Path(first[0]) if Path(first[0]).is_absolute() else manifest.parent / first[0]
    images = source.parent
    (images / f"{CANARY_FILE}.dcm").write_bytes(b"not a DICOM file")
    ds = pydicom.dcmread(source)
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "CANARY^SMITH^JOHN", "CANARY-MRN-4242", "19650203"
    ds.InstitutionName = "CANARY GENERAL"
    ds.save_as(images / "scan-7.dcm")
    prefix = Path(first[0]).parent
    rest = ",".join(first[3:])
    extra = [",".join(filter(None, [str(prefix / name), first[1], "CANARY-MRN-4242", rest]))
             for name in (f"{CANARY_FILE}.dcm", "scan-7.dcm", "CANARY-missing-19650203.dcm")]
    manifest.write_text("\n".join(rows + extra) + "\n")


def canary_hits(files: list[Path]) -> list[tuple[Path, str]]:
    """Every (file, canary) pair where the file's bytes hold the canary."""
    return [(path, canary) for path in files for canary in CANARIES if canary.encode() in path.read_bytes()]
