"""Tiny sites of real PNG images for the site-source and pre-flight tests (no training reads them)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image


def write_site(folder: Path, patients: dict[str, tuple[str, int]], *, corrupt: int = 0) -> Path:
    """``folder/manifest.csv`` with ``patients`` = {patient id: (label, images)}; ``corrupt`` more images of the
    first patient are not images at all. Returns the manifest."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(patients))
    rows = []
    for patient, (label, count) in patients.items():
        for view in range(count):
            name = f"images/{patient}_{view}.png"
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(folder / name)
            rows.append([name, label, patient])
    first = next(iter(patients))
    for index in range(corrupt):
        name = f"images/{first}_broken{index}.png"
        (folder / name).write_bytes(b"not a png")
        rows.append([name, patients[first][0], first])
    manifest = folder / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "patient_id"])
        writer.writerows(rows)
    return manifest


def balanced_patients(prefix: str, per_class: int = 4, images: int = 2) -> dict[str, tuple[str, int]]:
    """``per_class`` patients of each class, ``images`` images each."""
    return {f"{prefix}{label[0]}{index}": (label, images)
            for label in ("normal", "finding") for index in range(per_class)}
