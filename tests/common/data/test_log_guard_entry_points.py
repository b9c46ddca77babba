"""The log guard (masking of DICOM header values) is on in every process that can read site data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
CHECK = "from common.data.metadata_guard import log_guard_installed; assert log_guard_installed(), 'guard off'"


@pytest.mark.parametrize(
    "entry",
    [
        "import client.client_app",  # every ClientApp process and simulation worker
        "import common.data.dicom_reader",  # anything else that reads a DICOM header
        "from common.daemon_setup import configure_logging; configure_logging()",  # fedtl-hospital, coordinator
        "import simulations.cli as cli; cli.main(['quality-report', '/nonexistent/manifest.csv'])",  # fedtl
        "from client.hospital_daemon import main; main(['quality-report', '/nonexistent/manifest.csv'])",
    ],
    ids=["clientapp", "dicom-reader", "daemons", "fedtl-cli", "fedtl-hospital"],
)
def test_the_log_guard_is_on_in_every_entry_point(entry: str) -> None:
    done = subprocess.run([sys.executable, "-c", f"{entry}\n{CHECK}"], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_a_header_value_read_from_a_file_is_masked_in_any_later_log_line(tmp_path: Path) -> None:
    from tests.common.data import dicom_factory as factory

    path = factory.write_dicom(tmp_path / "a.dcm", factory.gradient_image(8, 8))
    script = (
        "import logging, io, pydicom\n"
        f"ds = pydicom.dcmread({str(path)!r}); ds.PatientName = 'CANARY^PATIENT'; ds.PatientID = 'CANARY-ID-77'\n"
        f"ds.save_as({str(path)!r})\n"
        "from common.data.dicom_reader import read_image\n"
        f"read_image({str(path)!r})\n"
        "stream = io.StringIO(); logging.basicConfig(stream=stream, level=logging.INFO)\n"
        "logging.getLogger('anything').warning('patient %s id %s', 'CANARY^PATIENT', 'CANARY-ID-77')\n"
        "print(stream.getvalue())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "patient" in done.stdout and "CANARY" not in done.stdout
