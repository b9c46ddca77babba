"""Synthetic hospitals: real DICOM files with a learnable task and realistic heterogeneity.

:func:`generate_federation` writes one folder per site, each with a ``manifest.csv``
(``path,label,patient_id,age``) and real DICOM Part 10 files (file meta, SOP class,
modality CR/DX/MR, pixel spacing, bits allocated/stored, photometric interpretation and
made-up patient tags). The task is binary, ``CLASS_NAMES = ("normal", "finding")``: a
finding is a small, subtle ring-shaped lesion on a textured "body" that also carries
larger, smooth distractor blobs and rib-like stripes, so a model must learn a shape, not a
brightness. Each patient has several images (the lesion stays at roughly the same place).

Heterogeneity between sites (cycled when there are more than four sites):

=====  ========  =====  ===========  ==========================  =====  ====  ==========
site   modality  bits   photometric  rescale                     gamma  blur  prevalence
=====  ========  =====  ===========  ==========================  =====  ====  ==========
0      CR        12     MONOCHROME2  slope 1, intercept 0 + VOI  1.0    0.6   0.50
1      DX        16 s   MONOCHROME1  slope 0.5, intercept -1024  0.7    1.2   0.25
2      MR        16     MONOCHROME2  slope 2, intercept 10       1.4    0.3   0.70
3      CR        8      MONOCHROME1  none (half resolution)      1.0    1.0   0.35
=====  ========  =====  ===========  ==========================  =====  ====  ==========

plus site-specific noise and stored matrix sizes (site 1 is portrait, site 2 smaller).
Site sizes default to 400, 120, 60, 40 images (about 10x apart). The optional clinical
column ``age`` is weakly correlated with the label (about +8 years for a finding).

:func:`generate_public_source` writes a larger PNG dataset of a related 4-class task
(disc, ring, square, stripes) to pretrain a backbone on: the stand-in for ImageNet.

Every site folder also holds ``lesions.csv`` (``path,center_row,center_col,radius_rows,radius_cols``):
where each finding image's lesion is, in pixels of the stored matrix (an ellipse of twice the ring's
width, where its contrast has fallen below a fifth of its peak). It is the ground truth that saliency
maps are checked against (the pointing game, ``client.inference.saliency``); writing it draws no random
number, so the images of a seed are the same with or without it.

Everything is deterministic in ``seed``: the same seed gives byte-identical files.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

logger = logging.getLogger(__name__)

CLASS_NAMES: tuple[str, ...] = ("normal", "finding")
PUBLIC_CLASS_NAMES: tuple[str, ...] = ("disc", "ring", "square", "stripes")
CLINICAL_FEATURES: tuple[str, ...] = ("age",)
DEFAULT_SITE_SIZES: tuple[int, ...] = (400, 120, 60, 40)
LESIONS_FILE = "lesions.csv"
LESION_COLUMNS: tuple[str, ...] = ("path", "center_row", "center_col", "radius_rows", "radius_cols")
LESION_EXTENT = 2.0
"""The recorded lesion radius, in units of the ring's Gaussian width (its contrast is below 20% of its peak
beyond it)."""
STUDY_DATE = "20240115"

_SOP_CLASS = {
    "CR": ComputedRadiographyImageStorage,
    "DX": DigitalXRayImageStorageForPresentation,
    "MR": MRImageStorage,
}


@dataclass(frozen=True)
class ScannerProfile:
    """How one site's scanner turns the same anatomy into stored pixels.

    modality: DICOM modality (CR, DX or MR).
    bits_stored: 8, 12 or 16 significant bits.
    signed: store int16 with Pixel Representation 1.
    photometric: MONOCHROME1 (white = low value) or MONOCHROME2.
    rescale: (slope, intercept) written as Rescale Slope/Intercept, or None.
    write_window: also write a Window Center/Width covering the signal range.
    gamma: intensity curve exponent applied to the [0, 1] signal.
    noise: standard deviation of additive noise, in [0, 1] signal units.
    blur: Gaussian blur sigma, in pixels of the stored matrix.
    resolution: acquisition resolution as a share of the stored matrix (0.5 = half).
    matrix: stored (rows, columns) as multiples of image_size.
    prevalence: share of patients with a finding.
    manufacturer: made-up device maker (counted by the local quality report).
    """

    modality: str
    bits_stored: int
    signed: bool
    photometric: str
    rescale: tuple[float, float] | None
    write_window: bool
    gamma: float
    noise: float
    blur: float
    resolution: float
    matrix: tuple[float, float]
    prevalence: float
    manufacturer: str


SCANNER_PROFILES: tuple[ScannerProfile, ...] = (
    ScannerProfile("CR", 12, False, "MONOCHROME2", (1.0, 0.0), True, 1.0, 0.03, 0.6, 1.0, (1.0, 1.0), 0.50, "Acme Radiography"),
    ScannerProfile("DX", 16, True, "MONOCHROME1", (0.5, -1024.0), False, 0.7, 0.05, 1.2, 1.0, (1.25, 1.0), 0.25, "Borealis Medical"),
    ScannerProfile("MR", 16, False, "MONOCHROME2", (2.0, 10.0), False, 1.4, 0.06, 0.3, 1.0, (0.75, 0.75), 0.70, "Cygnus Systems"),
    ScannerProfile("CR", 8, False, "MONOCHROME1", None, False, 1.0, 0.04, 1.0, 0.5, (1.0, 1.0), 0.35, "Dorado Imaging"),
)


def default_site_sizes(num_sites: int) -> list[int]:
    """400, 120, 60, 40 for four sites; otherwise a geometric spread from 400 down to 40."""
    if num_sites == len(DEFAULT_SITE_SIZES):
        return list(DEFAULT_SITE_SIZES)
    if num_sites == 1:
        return [400]
    return [int(round(v)) for v in np.geomspace(400, 40, num_sites)]


def generator_digest() -> str:
    """Eight hex digits of this module's source. Part of the cache key of everything made from its data
    (``simulations.site_sources``, ``server.backbone_source``): files written by another version of the
    generator are never silently reused, so one command gives one table whatever is in the cache."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:8]


def generate_federation(
    out_dir: str | Path,
    num_sites: int = 4,
    seed: int = 0,
    image_size: int = 64,
    *,
    site_sizes: Sequence[int] | None = None,
    images_per_patient: tuple[int, int] = (2, 4),
    with_clinical: bool = True,
    profiles: Sequence[ScannerProfile] = SCANNER_PROFILES,
) -> list[Path]:
    """Write `num_sites` synthetic hospitals; returns their manifest paths (site order).

    out_dir: parent folder; site k goes to ``out_dir/site_k``.
    seed: fixes every random choice (same seed -> byte-identical files).
    image_size: nominal image side; stored matrices differ per site around it.
    site_sizes: images per site (default :func:`default_site_sizes`).
    images_per_patient: inclusive range of images per patient.
    with_clinical: add the ``age`` column to the manifests.
    profiles: scanner profiles, cycled over the sites.
    """
    sizes = list(site_sizes) if site_sizes is not None else default_site_sizes(num_sites)
    if len(sizes) != num_sites:
        raise ValueError(f"site_sizes has {len(sizes)} entries for {num_sites} sites; give one size per site")
    out = Path(out_dir)
    manifests = []
    for site in range(num_sites):
        profile = profiles[site % len(profiles)]
        manifests.append(
            _write_site(out / f"site_{site}", site, sizes[site], profile, seed, image_size, images_per_patient, with_clinical)
        )
    logger.info("wrote %d synthetic sites (%d images) under %s", num_sites, sum(sizes), out)
    return manifests


def _write_site(
    folder: Path,
    site: int,
    size: int,
    profile: ScannerProfile,
    seed: int,
    image_size: int,
    images_per_patient: tuple[int, int],
    with_clinical: bool,
) -> Path:
    rng = np.random.default_rng([seed, site, 7919])
    rows = max(8, int(round(image_size * profile.matrix[0])))
    cols = max(8, int(round(image_size * profile.matrix[1])))
    low, high = images_per_patient
    counts: list[int] = []
    while sum(counts) < size:
        counts.append(int(rng.integers(low, high + 1)))
    counts[-1] -= sum(counts) - size
    if counts[-1] <= 0:
        counts.pop()
    labels = (rng.random(len(counts)) < profile.prevalence).astype(int)
    # every site sees both classes; from 4 patients on, at least 2 of each, so that a patient split has
    # each class on both sides (a site whose test patients lack a class is refused before a simulation)
    floor = 2 if len(counts) >= 4 else 1 if len(counts) >= 2 else 0
    for wanted in (1, 0):
        for patient in range(len(labels)):
            if int((labels == wanted).sum()) >= floor:
                break
            if labels[patient] != wanted and int((labels == labels[patient]).sum()) > floor:
                labels[patient] = wanted

    (folder / "images").mkdir(parents=True, exist_ok=True)
    records: list[list[str]] = []
    lesions: list[list[str]] = []
    header = ["path", "label", "patient_id"] + (list(CLINICAL_FEATURES) if with_clinical else [])
    for patient, (count, label) in enumerate(zip(counts, labels, strict=True)):
        patient_id = f"S{site}-P{patient:04d}"
        age = int(np.clip(round(rng.normal(52 + 8 * label, 14)), 18, 95))
        anatomy = _PatientAnatomy.draw(rng, rows, cols, bool(label))
        for view in range(count):
            signal, lesion = anatomy.render_view(rng, rows, cols)
            stored = _acquire(signal, profile, rng)
            relative = f"images/{patient_id}_{view}.dcm"
            _write_dicom(folder / relative, stored, profile, seed, site, patient, view, patient_id, age, label)
            records.append([relative, CLASS_NAMES[label], patient_id] + ([str(age)] if with_clinical else []))
            if lesion is not None:
                lesions.append([relative, *(f"{value:.3f}" for value in lesion.in_pixels(rows, cols))])
    manifest = folder / "manifest.csv"
    with manifest.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(records)
    with (folder / LESIONS_FILE).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(LESION_COLUMNS)
        writer.writerows(lesions)
    return manifest


@dataclass(frozen=True)
class LesionPlace:
    """Where one view's lesion is: centre (y, x) and the ring's width ``r``, as fractions of the matrix."""

    center_y: float
    center_x: float
    width: float

    def in_pixels(self, rows: int, cols: int) -> tuple[float, float, float, float]:
        """``(center_row, center_col, radius_rows, radius_cols)`` in pixels of a (rows, cols) matrix."""
        radius = LESION_EXTENT * self.width
        return self.center_y * rows, self.center_x * cols, radius * rows, radius * cols


@dataclass(frozen=True)
class _PatientAnatomy:
    body: tuple[float, float, float, float]  # centre y, x, radius y, x (fractions)
    lesion: tuple[float, float, float, float] | None  # centre y, x, radius (fraction), amplitude
    stripe_phase: float
    stripe_freq: float

    @classmethod
    def draw(cls, rng: np.random.Generator, rows: int, cols: int, finding: bool) -> _PatientAnatomy:
        body = (0.5 + rng.normal(0, 0.03), 0.5 + rng.normal(0, 0.03), rng.uniform(0.34, 0.44), rng.uniform(0.30, 0.42))
        lesion = None
        if finding:
            angle, dist = rng.uniform(0, 2 * np.pi), rng.uniform(0.0, 0.6)
            lesion = (
                body[0] + dist * body[2] * np.sin(angle),
                body[1] + dist * body[3] * np.cos(angle),
                rng.uniform(0.06, 0.10),
                rng.uniform(0.22, 0.32),
            )
        return cls(body, lesion, rng.uniform(0, 2 * np.pi), rng.uniform(5.0, 8.0))

    def render(self, rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
        """One view of the patient: [0, 1] signal, (rows, cols) float64."""
        return self.render_view(rng, rows, cols)[0]

    def render_view(self, rng: np.random.Generator, rows: int, cols: int) -> tuple[np.ndarray, LesionPlace | None]:
        """One view of the patient and where its lesion is (``None`` without a finding)."""
        yy, xx = np.mgrid[0:rows, 0:cols]
        y, x = yy / rows, xx / cols
        cy, cx, ry, rx = self.body
        cy, cx = cy + rng.normal(0, 0.015), cx + rng.normal(0, 0.015)
        radius = np.sqrt(((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2)
        signal = 0.10 + 0.35 / (1.0 + np.exp((radius - 1.0) * 12.0))
        stripes = 0.05 * np.sin(2 * np.pi * self.stripe_freq * y + self.stripe_phase) * (radius < 1.0)
        texture = _gaussian_blur(rng.normal(0, 1, (rows, cols)), max(rows, cols) / 14)
        texture *= 0.05 / (texture.std() + 1e-9)
        signal = signal + stripes + texture
        for _ in range(int(rng.integers(0, 3))):  # smooth distractor blobs, both classes
            by, bx = cy + rng.normal(0, 0.18), cx + rng.normal(0, 0.18)
            r = rng.uniform(0.08, 0.14)
            signal += rng.uniform(0.05, 0.10) * np.exp(-((y - by) ** 2 + (x - bx) ** 2) / (2 * r * r))
        place = None
        if self.lesion is not None:
            ly, lx, r, amplitude = self.lesion
            ly, lx = ly + rng.normal(0, 0.02), lx + rng.normal(0, 0.02)
            d2 = (y - ly) ** 2 + (x - lx) ** 2
            ring = np.exp(-d2 / (2 * r * r)) - 0.6 * np.exp(-d2 / (2 * (0.45 * r) ** 2))
            signal += amplitude * rng.uniform(0.8, 1.2) * ring / 0.6
            place = LesionPlace(float(ly), float(lx), float(r))
        return np.clip(signal, 0.0, 1.0), place


def _acquire(signal: np.ndarray, profile: ScannerProfile, rng: np.random.Generator) -> np.ndarray:
    """Scanner effects, then quantisation to the stored integer values of the profile."""
    rows, cols = signal.shape
    if profile.resolution < 1.0:
        small = (max(4, int(cols * profile.resolution)), max(4, int(rows * profile.resolution)))
        image = Image.fromarray(signal.astype(np.float32))
        signal = np.asarray(image.resize(small, Image.Resampling.BOX).resize((cols, rows), Image.Resampling.BILINEAR))
        signal = signal.astype(np.float64)
    if profile.blur > 0:
        signal = _gaussian_blur(signal, profile.blur)
    signal = np.clip(signal, 0.0, 1.0) ** profile.gamma
    signal = np.clip(signal + rng.normal(0, profile.noise, signal.shape), 0.0, 1.0)
    if profile.photometric == "MONOCHROME1":
        signal = 1.0 - signal
    levels = 2**profile.bits_stored - 1
    stored = np.round(signal * levels * 0.94 + levels * 0.03)
    if profile.signed:
        return (stored - 2 ** (profile.bits_stored - 1)).astype(np.int16)
    return stored.astype(np.uint8 if profile.bits_stored <= 8 else np.uint16)


def _write_dicom(
    path: Path,
    stored: np.ndarray,
    profile: ScannerProfile,
    seed: int,
    site: int,
    patient: int,
    view: int,
    patient_id: str,
    age: int,
    label: int,
) -> None:
    sop_class = _SOP_CLASS[profile.modality]
    entropy = [f"fedtl-synthetic-{seed}-{site}"]
    study_uid = generate_uid(entropy_srcs=[*entropy, f"study-{patient}"])
    series_uid = generate_uid(entropy_srcs=[*entropy, f"series-{patient}"])
    instance_uid = generate_uid(entropy_srcs=[*entropy, f"instance-{patient}-{view}"])

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = instance_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = instance_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = profile.modality
    ds.Manufacturer = profile.manufacturer
    ds.InstitutionName = f"Synthetic Hospital {site}"
    ds.PatientName = f"Synthetic^S{site}P{patient:04d}"
    ds.PatientID = patient_id
    ds.PatientSex = "F" if (patient + site) % 2 else "M"
    ds.PatientAge = f"{age:03d}Y"
    ds.PatientBirthDate = f"{int(STUDY_DATE[:4]) - age}0101"
    ds.StudyDate = STUDY_DATE
    ds.SeriesDate = STUDY_DATE
    ds.StudyID = f"{patient:04d}"
    ds.AccessionNumber = f"A{site}{patient:05d}"
    ds.SeriesNumber = 1
    ds.InstanceNumber = view + 1
    ds.ImageComments = "synthetic image; finding" if label else "synthetic image"
    ds.set_pixel_data(stored, profile.photometric, profile.bits_stored, generate_instance_uid=False)
    spacing = f"{0.2 * 64 / max(stored.shape):.4f}"
    if profile.modality == "MR":
        ds.PixelSpacing = [spacing, spacing]
        ds.SliceThickness = "3.0"
    else:
        ds.ImagerPixelSpacing = [spacing, spacing]
        ds.PixelSpacing = [spacing, spacing]
    if profile.rescale is not None:
        slope, intercept = profile.rescale
        ds.RescaleSlope = f"{slope:g}"
        ds.RescaleIntercept = f"{intercept:g}"
        ds.RescaleType = "US"
    if profile.write_window:
        # A site-wide preset covering the body's signal range (5% .. 75% of full scale).
        slope, intercept = profile.rescale or (1.0, 0.0)
        levels = 2**profile.bits_stored - 1
        lo = (levels * (0.03 + 0.94 * 0.05)) * slope + intercept
        hi = (levels * (0.03 + 0.94 * 0.75)) * slope + intercept
        ds.WindowCenter = f"{(lo + hi) / 2:.1f}"
        ds.WindowWidth = f"{hi - lo:.1f}"
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    path.write_bytes(buffer.getvalue())


@lru_cache(maxsize=64)
def _blur_matrix(length: int, sigma: float) -> np.ndarray:
    """(length, length) matrix that applies a 1-D Gaussian blur with reflected borders."""
    radius = max(1, int(np.ceil(3 * sigma)))
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-(offsets**2) / (2 * sigma * sigma))
    kernel /= kernel.sum()
    matrix = np.zeros((length, length))
    for i in range(length):
        for offset, weight in zip(offsets, kernel, strict=True):
            j = i + offset
            j = -j - 1 if j < 0 else (2 * length - j - 1 if j >= length else j)
            matrix[i, min(max(j, 0), length - 1)] += weight
    return matrix


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return image
    rows, cols = image.shape
    return _blur_matrix(rows, round(float(sigma), 3)) @ image @ _blur_matrix(cols, round(float(sigma), 3)).T


# ----------------------------------------------------------------------------- public source


def generate_public_source(
    out_dir: str | Path,
    num_images: int = 800,
    seed: int = 0,
    image_size: int = 64,
) -> Path:
    """Write a 4-class shapes/texture PNG dataset (pretraining stand-in); returns its manifest.

    Classes: PUBLIC_CLASS_NAMES (disc, ring, square, stripes), balanced, each shape at a random
    place, scale and contrast on a textured background. Every image is its own "patient".
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 104729])
    records = []
    yy, xx = np.mgrid[0:image_size, 0:image_size] / image_size
    for index in range(num_images):
        label = index % len(PUBLIC_CLASS_NAMES)
        background = 0.3 + 0.1 * rng.random()
        texture = _gaussian_blur(rng.normal(0, 1, (image_size, image_size)), image_size / 12)
        image = background + texture * (0.06 / (texture.std() + 1e-9))
        cy, cx = rng.uniform(0.3, 0.7, 2)
        r = rng.uniform(0.1, 0.22)
        contrast = rng.uniform(0.15, 0.4) * rng.choice([-1.0, 1.0])
        d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        if label == 0:
            mask = d < r
        elif label == 1:
            mask = np.abs(d - r) < r * 0.25
        elif label == 2:
            mask = (np.abs(yy - cy) < r * 0.85) & (np.abs(xx - cx) < r * 0.85)
        else:
            angle = rng.uniform(0, np.pi)
            wave = np.sin(2 * np.pi * rng.uniform(4, 7) * (np.cos(angle) * yy + np.sin(angle) * xx))
            mask = (wave > 0) & (d < r * 1.3)
        image = image + contrast * _gaussian_blur(mask.astype(np.float64), 0.7)
        image = image + rng.normal(0, 0.02, image.shape)
        pixels = np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
        relative = f"images/{index:05d}.png"
        Image.fromarray(pixels).save(out / relative, format="PNG", optimize=False)
        records.append([relative, PUBLIC_CLASS_NAMES[label], f"public-{index:05d}"])
    manifest = out / "manifest.csv"
    with manifest.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "patient_id"])
        writer.writerows(records)
    return manifest
