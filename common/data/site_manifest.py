"""A site's list of images: which file, which label, which patient, which clinical values.

Two layouts are accepted:

* a CSV file with the columns ``path`` (relative to the CSV's folder, or absolute),
  ``label`` (a class name), ``patient_id`` and, optionally, numeric clinical columns
  (``age``, ``sex`` coded as a number, lab values ...). An empty clinical cell means
  "missing" and is loaded as NaN (the site dataset sets it to 0, never to a statistic of the site's data);
* a folder with one sub-folder per class; every image file below a class folder is one
  entry. The patient id is the DICOM PatientID when the file has one, else the file stem.
  The PatientID is read locally and only kept in memory.

Every problem found is reported in one :class:`ManifestError` naming the CSV, the row
(the CSV's line number, header = line 1) and the fix. Patient ids are never put into a
message or a log line.

A site may legitimately lack a class (label skew between hospitals); that is a warning,
unless ``require_all_classes=True``. An empty class FOLDER is always an error.
"""

from __future__ import annotations

import csv
import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom

from common.data.dicom_reader import is_dicom_file
from common.data.metadata_guard import register_dataset

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("path", "label", "patient_id")
IMAGE_SUFFIXES = frozenset({".dcm", ".dicom", ".dic", ".ima", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})
MAX_REPORTED_PROBLEMS = 20


class ManifestError(ValueError):
    """The manifest is wrong; the message lists each problem with its row and the fix."""


@dataclass(frozen=True)
class ManifestEntry:
    """One image of the site.

    path: absolute path of the image file.
    label: index into ``SiteManifest.class_names``.
    patient_id: local patient identifier (never logged, never leaves the site; hidden from repr).
    clinical: values of the requested clinical columns, in order (NaN = missing).
    row: CSV line number (header = 1), or 0 for a folder layout.
    """

    path: Path
    label: int
    patient_id: str = field(repr=False)
    clinical: tuple[float, ...] = ()
    row: int = 0


@dataclass(frozen=True)
class SiteManifest:
    """The validated manifest of one site."""

    source: Path
    class_names: tuple[str, ...]
    clinical_features: tuple[str, ...]
    entries: tuple[ManifestEntry, ...]

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def root(self) -> Path:
        """Folder that relative paths are resolved against."""
        source = self.source.resolve()
        return source if source.is_dir() else source.parent

    def labels(self) -> list[int]:
        return [e.label for e in self.entries]

    def patient_ids(self) -> list[str]:
        return [e.patient_id for e in self.entries]

    def class_counts(self) -> dict[str, int]:
        counts = Counter(e.label for e in self.entries)
        return {name: counts.get(i, 0) for i, name in enumerate(self.class_names)}

    def display_path(self, entry: ManifestEntry) -> str:
        """The entry's path as the admin wrote it (relative to the manifest when possible)."""
        try:
            return str(entry.path.relative_to(self.root))
        except ValueError:
            return str(entry.path)


def load_manifest(
    path: str | Path,
    class_names: Sequence[str] | None = None,
    clinical_features: Sequence[str] = (),
    *,
    require_all_classes: bool = False,
) -> SiteManifest:
    """Load and validate a site's manifest.

    path: a CSV file or a folder with one sub-folder per class.
    class_names: the federation's classes in label-index order; ``None`` = the sorted
        distinct labels of this manifest (only sensible for a single site).
    clinical_features: names of numeric CSV columns to load, in order.
    require_all_classes: raise if a class has no image at this site.
    """
    path = Path(path)
    if path.is_dir():
        manifest = _load_folder(path, class_names, clinical_features)
    elif path.is_file():
        manifest = _load_csv(path, class_names, clinical_features)
    else:
        raise ManifestError(f"{path}: no such manifest; give a CSV file or a folder with one sub-folder per class")
    empty = [name for name, count in manifest.class_counts().items() if count == 0]
    if empty:
        message = (
            f"{path}: class(es) {', '.join(repr(n) for n in empty)} have no images at this site"
        )
        if require_all_classes:
            raise ManifestError(message + "; add images of that class or remove it from class_names")
        logger.warning("%s (allowed: sites may lack a class)", message)
    logger.info(
        "manifest %s: %d images, %d patients, %d classes",
        path,
        len(manifest),
        len(set(manifest.patient_ids())),
        len(manifest.class_names),
    )
    return manifest


# ----------------------------------------------------------------------------- CSV


def _load_csv(path: Path, class_names: Sequence[str] | None, clinical_features: Sequence[str]) -> SiteManifest:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ManifestError(f"{path}: not UTF-8 text; save the CSV as UTF-8") from None
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise ManifestError(f"{path}: empty file; the first line must be the header {','.join(REQUIRED_COLUMNS)}")
    delimiter = ";" if lines[0].count(";") > lines[0].count(",") else ","
    reader = csv.DictReader(lines, delimiter=delimiter)
    header = [h.strip() for h in (reader.fieldnames or [])]
    reader.fieldnames = header
    missing = [c for c in (*REQUIRED_COLUMNS, *clinical_features) if c not in header]
    if missing:
        raise ManifestError(
            f"{path}: missing column(s) {', '.join(missing)} in the header (line 1); the header has "
            f"{', '.join(header) or 'nothing'}. Add the column(s)"
            + (" or remove them from model.clinical_features" if set(missing) & set(clinical_features) else "")
        )

    rows: list[tuple[int, dict[str, str]]] = []
    for offset, raw in enumerate(reader):
        line = offset + 2
        row = {k: (v or "").strip() for k, v in raw.items() if k is not None}
        if not any(row.values()):
            continue  # blank line
        rows.append((line, row))

    names = list(class_names) if class_names is not None else sorted({r["label"] for _, r in rows if r["label"]})
    if len(set(names)) != len(names):
        raise ManifestError(f"{path}: class_names has duplicates ({names}); list every class once")
    index_of = {name: i for i, name in enumerate(names)}

    problems: list[str] = []
    entries: list[ManifestEntry] = []
    first_row_of: dict[Path, int] = {}
    root = path.parent
    for line, row in rows:
        rel = row["path"]
        if not rel:
            problems.append(f"row {line}: empty 'path'; fill in the image file or delete the row")
            continue
        image_path = (root / rel).resolve() if not Path(rel).is_absolute() else Path(rel)
        if image_path in first_row_of:
            problems.append(
                f"row {line}: duplicate of row {first_row_of[image_path]} (same file {rel!r}); delete one of them"
            )
            continue
        first_row_of[image_path] = line
        # A missing file is not a manifest problem: it is skipped when the images are read and
        # counted with the unreadable ones (common.data.site_dataset), like a corrupt file.
        label = row["label"]
        if label not in index_of:
            problems.append(
                f"row {line}: unknown label {label!r}; allowed labels are {', '.join(map(repr, names))}: "
                "fix the label or add the class to model.num_classes/class_names"
            )
        patient = row["patient_id"]
        if not patient:
            problems.append(f"row {line}: empty 'patient_id'; every image needs its patient (used to split by patient)")
        clinical: list[float] = []
        for feature in clinical_features:
            cell = row.get(feature, "")
            if cell == "" or cell.lower() in ("na", "nan"):
                clinical.append(math.nan)
                continue
            try:
                value = float(cell.replace(",", ".")) if delimiter == ";" else float(cell)
            except ValueError:
                problems.append(
                    f"row {line}: column {feature!r} is not a number (the value is not shown: it is patient data); write a number "
                    "(code categories as numbers, e.g. sex 0/1) or leave the cell empty for 'missing'"
                )
                continue
            if not math.isfinite(value):
                problems.append(f"row {line}: column {feature!r} is not finite; write a number or leave it empty")
                continue
            clinical.append(value)
        if label in index_of and patient and len(clinical) == len(clinical_features):
            entries.append(ManifestEntry(image_path, index_of[label], patient, tuple(clinical), line))

    if problems:
        _raise(path, problems)
    if not entries:
        raise ManifestError(f"{path}: no image rows; add one row per image below the header")
    return SiteManifest(path, tuple(names), tuple(clinical_features), tuple(entries))


def _raise(path: Path, problems: list[str]) -> None:
    shown = problems[:MAX_REPORTED_PROBLEMS]
    more = len(problems) - len(shown)
    tail = f"\n  ... and {more} more" if more > 0 else ""
    raise ManifestError(f"{path}: {len(problems)} problem(s):\n  " + "\n  ".join(shown) + tail)


# ----------------------------------------------------------------------------- folders


def _load_folder(root: Path, class_names: Sequence[str] | None, clinical_features: Sequence[str]) -> SiteManifest:
    if clinical_features:
        raise ManifestError(
            f"{root}: a folder manifest has no clinical columns ({', '.join(clinical_features)} requested); "
            "write a CSV manifest or set model.clinical_features = []"
        )
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    names = list(class_names) if class_names is not None else [p.name for p in folders]
    if not names:
        raise ManifestError(f"{root}: no class sub-folders; make one folder per class holding its images")
    folder_names = {p.name for p in folders}
    problems = [
        f"folder {name!r} is missing; create {root / name} with the images of that class"
        for name in names
        if name not in folder_names
    ]
    extra = sorted(folder_names - set(names))
    if extra:
        problems.append(
            f"sub-folder(s) {', '.join(map(repr, extra))} are not classes ({', '.join(map(repr, names))}); "
            "move them out or add them to class_names"
        )
    entries: list[ManifestEntry] = []
    for label, name in enumerate(names):
        folder = root / name
        if not folder.is_dir():
            continue
        files = sorted(
            p for p in folder.rglob("*")
            if p.is_file() and not p.name.startswith(".") and (p.suffix.lower() in IMAGE_SUFFIXES or p.suffix == "")
        )
        if not files:
            problems.append(f"class folder {name!r} is empty; put its images in {folder} or remove the class")
            continue
        for file in files:
            entries.append(ManifestEntry(file.resolve(), label, _patient_id_of(file), (), 0))
    if problems:
        _raise(root, problems)
    return SiteManifest(root, tuple(names), (), tuple(entries))


def _patient_id_of(file: Path) -> str:
    """DICOM PatientID when the file has one (read locally, kept in memory), else the file stem."""
    if is_dicom_file(file):
        try:
            ds = pydicom.dcmread(file, stop_before_pixels=True, specific_tags=["PatientID", "PatientName"])
            register_dataset(ds)
            patient = str(ds.get("PatientID", "") or "").strip()
            if patient:
                return patient
        except Exception:
            logger.debug("could not read a PatientID from %s; using the file name", file)
    return file.stem
