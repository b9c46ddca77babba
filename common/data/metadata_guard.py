"""Keep DICOM header values out of log lines.

The first line of defence is the reader itself: it never formats a header value (patient
name, id, dates, institution, device) into a log message or an error. This module is the
second line: a registry of sensitive strings that the DICOM reader fills with the
identifying values it sees, and a logging filter that masks any of them that still reach
a log record (for example through a third-party library's warning).

The registry lives in process memory only. It is never written to disk, never logged and
never sent anywhere; it is emptied when the process ends.

pydicom's own debug mode (``pydicom.config.debug(True)``) logs every element value while a
file is parsed, before any value can be registered: keep it off at a site.

Typical use at a site::

    from common.data.metadata_guard import install_log_guard
    install_log_guard()          # every log record created from now on is masked
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

MASK = "[masked]"

# Shorter strings would mask ordinary words ("M" for sex, "CT" ...); they identify no one.
MIN_SENSITIVE_LENGTH = 3

# Header keywords whose values identify a patient, a person, a place or a time. Values of
# these elements are registered when the reader opens a file.
SENSITIVE_KEYWORDS: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientBirthDate",
    "PatientBirthName",
    "PatientMotherBirthName",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "IssuerOfPatientID",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "SeriesDate",
    "AcquisitionDate",
    "ContentDate",
    "AcquisitionDateTime",
    "StudyTime",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "NameOfPhysiciansReadingStudy",
    "StationName",
    "DeviceSerialNumber",
    # Device identity: counted in the local quality report, never logged.
    "Manufacturer",
    "ManufacturerModelName",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
)


class SensitiveValueRegistry:
    """A thread-safe, in-memory set of strings that must never appear in a log line."""

    def __init__(self) -> None:
        self._values: set[str] = set()
        self._ordered: tuple[str, ...] = ()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, value: object) -> bool:
        return isinstance(value, str) and value in self._values

    def __repr__(self) -> str:  # never show the values themselves
        return f"SensitiveValueRegistry({len(self._values)} values)"

    def register(self, values: Iterable[str]) -> None:
        """Add strings to mask; values shorter than MIN_SENSITIVE_LENGTH are ignored."""
        fresh = {
            v.strip()
            for v in values
            if isinstance(v, str) and len(v.strip()) >= MIN_SENSITIVE_LENGTH
        }
        with self._lock:
            fresh -= self._values
            if not fresh:
                return
            self._values |= fresh
            # Longest first, so "Zyx^Quorra" is masked whole before "Zyx" is.
            self._ordered = tuple(sorted(self._values, key=len, reverse=True))

    def clear(self) -> None:
        with self._lock:
            self._values.clear()
            self._ordered = ()

    def mask(self, text: str) -> str:
        """Return `text` with every registered value replaced by MASK."""
        ordered = self._ordered
        if not ordered or not text:
            return text
        for value in ordered:
            if value in text:
                text = text.replace(value, MASK)
        return text


REGISTRY = SensitiveValueRegistry()


def register_sensitive(*values: str) -> None:
    """Register extra strings (e.g. a site name) to be masked in every log line."""
    REGISTRY.register(values)


def sensitive_strings_of(dataset: Any) -> list[str]:
    """The identifying strings of a pydicom Dataset, in the forms a message might show.

    Person names are also split into their components; dates are also given in ISO form.
    """
    found: list[str] = []
    for keyword in SENSITIVE_KEYWORDS:
        try:
            value = dataset.get(keyword)
        except Exception:  # a malformed element must not stop reading
            continue
        if value is None or value == "":
            continue
        items = list(value) if _is_multi_value(value) else [value]
        for item in items:
            text = str(item).strip()
            if not text:
                continue
            found.append(text)
            if "^" in text or " " in text:
                found.extend(part for part in text.replace("^", " ").split() if part)
                found.append(" ".join(p for p in text.split("^") if p))
            if len(text) == 8 and text.isdigit():  # DA: YYYYMMDD
                found.append(f"{text[:4]}-{text[4:6]}-{text[6:]}")
    return found


def register_dataset(dataset: Any) -> None:
    """Register the identifying values of a pydicom Dataset (called by the reader).

    Must run before anything else touches those elements: pydicom converts a value on first
    access and its validation warning QUOTES the value ("Invalid value for VR DA: '...'").
    The conversion therefore happens here, with pydicom's warnings silenced; later accesses
    reuse the converted value and warn no more.
    """
    with quiet_pydicom():
        REGISTRY.register(sensitive_strings_of(dataset))


_quiet_lock = threading.RLock()


@contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Silence pydicom's logger and Python warnings (which may quote header values)."""
    pydicom_logger = logging.getLogger("pydicom")
    with _quiet_lock:
        previous = pydicom_logger.disabled
        pydicom_logger.disabled = True
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield
        finally:
            pydicom_logger.disabled = previous


def _is_multi_value(value: Any) -> bool:
    return isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue"


class SensitiveValueFilter(logging.Filter):
    """A logging filter that masks registered sensitive values in the message and traceback.

    Attach it to a handler (``handler.addFilter(SensitiveValueFilter())``) to cover every
    record that handler emits, or use :func:`install_log_guard` to mask records at creation.
    """

    def __init__(self, registry: SensitiveValueRegistry | None = None) -> None:
        super().__init__()
        self.registry = registry or REGISTRY

    def filter(self, record: logging.LogRecord) -> bool:
        mask_record(record, self.registry)
        return True


def mask_record(record: logging.LogRecord, registry: SensitiveValueRegistry | None = None) -> None:
    """Mask a record in place: the formatted message, and the traceback text if any."""
    registry = registry or REGISTRY
    if not len(registry):
        return
    try:
        message = record.getMessage()
    except Exception:  # a broken format string: leave it to logging's own error path
        return
    masked = registry.mask(message)
    if masked != message or record.args:
        record.msg = masked
        record.args = None
    if record.exc_info and not record.exc_text:
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    if record.exc_text:
        record.exc_text = registry.mask(record.exc_text)
    if record.stack_info:
        record.stack_info = registry.mask(record.stack_info)


_factory_lock = threading.Lock()
_installed = False


def install_log_guard() -> None:
    """Mask every log record created in this process from now on (idempotent).

    Works by wrapping the log-record factory, so it covers every logger and every handler,
    including handlers added later (pytest's caplog, Flower's, Ray's).
    """
    global _installed
    with _factory_lock:
        if _installed:
            return
        previous = logging.getLogRecordFactory()

        def guarded_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            mask_record(record)
            return record

        logging.setLogRecordFactory(guarded_factory)
        _installed = True


def log_guard_installed() -> bool:
    return _installed
