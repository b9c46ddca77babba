"""Load a site's images as tensors, skipping (never stopping on) unreadable files.

Each image is decoded once and kept in the site's decoded-image cache, so a later epoch,
round or restart only reads small .npy files. A file that cannot be read is skipped with
its reason (``SiteData.skipped``); the reasons name the file and the fix and never carry a
DICOM header value.

The images are held in memory, or, with ``storage="disk"`` (or ``"auto"`` when they would take
more than a quarter of the memory available), in a memory-mapped scratch file on the site's disk
that disappears with the last tensor viewing it (``common.data.row_files``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from common.data.decoded_image_cache import DecodedImageCache
from common.data.dicom_reader import FramePolicy, UnreadableImageError
from common.data.image_preprocessing import Preprocessing
from common.data.memory_budget import Storage, resolve_storage
from common.data.row_files import scratch_rows
from common.data.site_manifest import ManifestError, load_manifest

logger = logging.getLogger(__name__)


class TooManyUnreadableImages(ManifestError):
    """More of a site's rows are missing or unreadable than the federation allows."""


@dataclass
class SiteData:
    """A site's usable images, in manifest order.

    images: (N, C, S, S) float32, normalised (in memory, or memory-mapped: see the module docstring).
    labels: (N,) int64 class indices into ``class_names``.
    clinical: (N, K) float32 clinical values (a missing value is 0, never a statistic of the site's data).
    patient_ids: local patient ids (never logged, never sent; hidden from repr).
    skipped: (file as written in the manifest, reason) for every file that could not be read.
    """

    images: torch.Tensor
    labels: torch.Tensor
    clinical: torch.Tensor
    patient_ids: list[str] = field(repr=False)
    class_names: tuple[str, ...] = ()
    clinical_features: tuple[str, ...] = ()
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __repr__(self) -> str:  # no tensors, no patient ids
        shape = "x".join(str(d) for d in self.images.shape[1:])
        return (
            f"SiteData({len(self)} images of {shape}, classes={list(self.class_names)}, "
            f"clinical={list(self.clinical_features)}, skipped={len(self.skipped)})"
        )

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> SiteData:
        """The rows at `indices` (e.g. a train or test split); `skipped` is carried over."""
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return SiteData(
            images=self.images[idx],
            labels=self.labels[idx],
            clinical=self.clinical[idx],
            patient_ids=[self.patient_ids[i] for i in idx.tolist()],
            class_names=self.class_names,
            clinical_features=self.clinical_features,
            skipped=list(self.skipped),
        )

    def tensor_dataset(self) -> torch.utils.data.TensorDataset:
        """(image, label, clinical) triples for a DataLoader."""
        return torch.utils.data.TensorDataset(self.images, self.labels, self.clinical)


def load_site_dataset(
    manifest_path: str | Path,
    *,
    preprocessing: Preprocessing,
    cache_dir: str | Path,
    class_names: Sequence[str] | None = None,
    clinical_features: Sequence[str] = (),
    frame_policy: FramePolicy = "middle",
    show_progress: bool = True,
    storage: Storage = "memory",
    max_unreadable_share: float = 1.0,
) -> SiteData:
    """Read every image of a site's manifest.

    manifest_path: the site's CSV or class-folder root (see ``common.data.site_manifest``).
    preprocessing: image size, channels and normalisation of the model.
    cache_dir: the site's decoded-image cache folder.
    class_names: the federation's classes in label order (None: from the manifest).
    clinical_features: numeric manifest columns to load, in order.
    frame_policy: which frame of multi-frame DICOM files ("middle" or "first").
    show_progress: draw a tqdm bar while decoding.
    storage: "memory", "disk" (a memory-mapped scratch file under ``cache_dir``) or "auto".
    max_unreadable_share: the largest share of rows that may be missing or unreadable; above it
        the site refuses to start (``TooManyUnreadableImages``, naming the rows).

    Raises ManifestError for a wrong manifest; an unreadable image is skipped (one log line with
    its manifest row), never raised, unless there are more than ``max_unreadable_share`` of them.
    """
    manifest = load_manifest(manifest_path, class_names, clinical_features)
    cache = DecodedImageCache(cache_dir, preprocessing, frame_policy)
    size, channels = preprocessing.image_size, preprocessing.in_channels
    row_shape = (channels, size, size)
    nbytes = len(manifest) * channels * size * size * 4
    where = resolve_storage(storage, nbytes, f"the {len(manifest)} decoded images")
    if where == "disk":
        images = scratch_rows(cache.folder, len(manifest), row_shape)
    else:
        images = torch.empty((len(manifest), *row_shape), dtype=torch.float32)
    kept = []
    skipped: list[tuple[str, str]] = []
    bar = tqdm(manifest.entries, desc="decoding images", unit="img", disable=not show_progress, leave=False)
    for entry in bar:
        shown = manifest.display_path(entry)
        row_label = f"row {entry.row} ({shown})" if entry.row else shown
        try:
            images[len(kept)] = preprocessing.normalise(cache.load(entry.path))
        except UnreadableImageError as exc:
            skipped.append((shown, exc.reason))
            logger.warning("skipping %s: %s", row_label, exc.reason)
            continue
        except Exception as exc:  # a bug in a decoder plugin must not stop the site
            reason = f"unexpected {type(exc).__name__} while reading; remove the file or report the problem"
            skipped.append((shown, reason))
            logger.warning("skipping %s: %s", row_label, reason)
            continue
        kept.append(entry)
    bar.close()
    cache.flush()
    if len(skipped) > max_unreadable_share * len(manifest):
        rows = [e.row for e in manifest.entries if manifest.display_path(e) in {s for s, _ in skipped}]
        listed = ", ".join(str(r) for r in rows[:20]) + (f" and {len(rows) - 20} more" if len(rows) > 20 else "")
        raise TooManyUnreadableImages(
            f"{manifest_path}: {len(skipped)} of {len(manifest)} images are missing or unreadable, more than the "
            f"{max_unreadable_share:.0%} allowed (data.max_unreadable_share); rows {listed}. Fix or delete those "
            "rows (the reasons are in the log and in 'fedtl-hospital quality-report'), or raise the limit"
        )
    if skipped:
        logger.warning(
            "%d of %d images of %s could not be read and were skipped (see the quality report)",
            len(skipped),
            len(manifest),
            manifest_path,
        )
    logger.info(
        "site data: %d images loaded (%d from the decoded-image cache, %d decoded)",
        len(kept),
        cache.hits,
        cache.misses,
    )

    if len(kept) < len(images):
        images = images[: len(kept)] if where == "disk" else images[: len(kept)].clone()
    clinical = _clinical_matrix([e.clinical for e in kept], len(manifest.clinical_features))
    return SiteData(
        images=images,
        labels=torch.tensor([e.label for e in kept], dtype=torch.int64),
        clinical=clinical,
        patient_ids=[e.patient_id for e in kept],
        class_names=manifest.class_names,
        clinical_features=manifest.clinical_features,
        skipped=skipped,
    )


def _clinical_matrix(rows: list[tuple[float, ...]], width: int) -> torch.Tensor:
    """Rows of clinical values -> (N, K) float32, a missing value (NaN) replaced by 0.

    Never by a statistic of the site's own values (a column mean): that would make every
    patient's input depend on every other patient's record, which DP-SGD's per-patient clipping
    does not bound. Code the columns so that 0 is a neutral value (e.g. centred age).
    """
    matrix = np.asarray(rows, dtype=np.float64).reshape(len(rows), width)
    missing = np.isnan(matrix)
    if missing.any():
        logger.info("clinical values: %d missing value(s) set to 0", int(missing.sum()))
        matrix[missing] = 0.0
    return torch.from_numpy(matrix.astype(np.float32))
