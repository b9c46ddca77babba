"""Frozen-trunk outputs, computed once per image and reused across epochs and rounds.

When every stage below the first trainable one is frozen and nothing random happens to an
image before it, the trunk's output for that image never changes. We compute it once, keep it
in a file on the site's disk, and train only the tail on it. The key covers the backbone
fingerprint, the preprocessing, the cut point, the image content and the train/test split, so a
new backbone, a new preprocessing or a new split invalidates it. Privacy accounting is
untouched: the same images are sampled with the same probability for the same number of steps.

The cache keeps the few most recently used entries (``KEPT_ENTRIES``: a site may take part in more
than one federation) and deletes older ones, and files of the earlier ``.pt`` format, when it
writes a new one: for a large site one entry can take tens of gigabytes.

The file holds the training rows first, then the test rows, so both splits are plain slices of
one array: read into memory, or memory-mapped when the site's ``storage`` says ``disk`` (or
``auto`` finds the features too big for the memory available). The features are written a
batch at a time, so computing them never holds the whole array in memory either.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from common.models.fed_model import FedModel
from common.data.memory_budget import Storage, resolve_storage
from common.data.row_files import DamagedRowFile, RowFileWriter, open_rows, scratch_rows

logger = logging.getLogger(__name__)

_HASH_ROWS = 1024
KEPT_ENTRIES = 3
"""Feature files kept in a site's cache folder, the most recently used ones."""


@dataclass(frozen=True)
class SplitInputs:
    """The tail's inputs for a site's two splits (slices of one array) and where that array lives."""

    train: torch.Tensor
    test: torch.Tensor
    storage: Literal["memory", "disk"]


def feature_cache_key(
    fingerprint: str, preprocessing_key: str, boundary: int, images: torch.Tensor, order: torch.Tensor
) -> str:
    """Hex key of the trunk features of ``images[order]`` (hashed in chunks: no copy of the whole set)."""
    digest = hashlib.sha256()
    digest.update(f"{fingerprint}|{preprocessing_key}|{boundary}|{tuple(images.shape)}".encode())
    for start in range(0, len(images), _HASH_ROWS):
        digest.update(images[start : start + _HASH_ROWS].detach().cpu().contiguous().numpy().tobytes())
    digest.update(order.numpy().astype("<i8").tobytes())
    return digest.hexdigest()[:32]


@torch.no_grad()
def compute_trunk_features(
    stages_forward: nn.Module | object,
    images: torch.Tensor,
    boundary: int,
    device: torch.device,
    batch_size: int = 128,
) -> torch.Tensor:
    """Run ``model.forward_stages(x, 0, boundary)`` over all images in eval mode, into memory."""
    outputs = [batch for _, batch in _trunk_batches(stages_forward, images, None, boundary, device, batch_size)]
    if not outputs:
        return torch.empty(0)
    return torch.cat(outputs)


def split_trunk_features(
    model: FedModel,
    images: torch.Tensor,
    *,
    train_idx: Sequence[int],
    test_idx: Sequence[int],
    boundary: int,
    fingerprint: str,
    preprocessing_key: str,
    cache_dir: Path,
    device: torch.device,
    storage: Storage = "auto",
    available_memory: int | None = None,
) -> SplitInputs:
    """The inputs of ``model.tail(boundary)`` for the train and test images, from the disk cache when the key matches.

    With ``boundary == 0`` there is no frozen trunk: the inputs are the images themselves
    (copied into the split order, in memory or in a scratch file that is not kept).
    """
    order = torch.as_tensor([*train_idx, *test_idx], dtype=torch.long)
    n_train = len(train_idx)
    if len(order) == 0:
        empty = torch.zeros((0, *images.shape[1:]), dtype=torch.float32)
        return SplitInputs(train=empty, test=empty, storage="memory")
    row_shape = _trunk_output_shape(model, images[order[:1]], boundary, device)
    nbytes = len(order) * math.prod(row_shape) * 4
    where = resolve_storage(storage, nbytes, "trunk features" if boundary else "training images", available_memory)

    if boundary == 0:
        if where == "memory":
            rows = images[order]
        else:
            rows = scratch_rows(cache_dir, len(order), row_shape)
            for start, batch in _trunk_batches(model, images, order, 0, device):
                rows[start : start + len(batch)] = batch
        return _split(rows, n_train, where)

    path = cache_dir / f"{feature_cache_key(fingerprint, preprocessing_key, boundary, images, order)}.npy"
    if path.exists():
        try:
            rows = open_rows(path, where, rows=len(order))
            logger.debug("trunk features from cache %s (%s)", path.name, where)
            _touch(path)  # most recently used: the last to be pruned
            return _split(rows, n_train, where)
        except DamagedRowFile:  # a damaged cache entry is recomputed, never fatal
            logger.warning("trunk-feature cache entry %s is damaged; recomputing it", path.name)
    with RowFileWriter(path, len(order), row_shape) as writer:
        for start, batch in _trunk_batches(model, images, order, boundary, device):
            writer.write(start, batch)
        writer.commit()
    prune_feature_cache(cache_dir, keep=KEPT_ENTRIES)
    return _split(open_rows(path, where, rows=len(order)), n_train, where)


def _split(rows: torch.Tensor, n_train: int, where: Literal["memory", "disk"]) -> SplitInputs:
    """Training rows first, then test rows: two views of one array, no copy."""
    return SplitInputs(train=rows[:n_train], test=rows[n_train:], storage=where)


def prune_feature_cache(cache_dir: Path, keep: int = KEPT_ENTRIES) -> list[Path]:
    """Delete all but the ``keep`` most recently used feature files, and earlier-format ``.pt`` files.

    A process still reading a deleted file keeps its data (POSIX); a later session recomputes it.
    Returns the deleted files.
    """
    entries = sorted(cache_dir.glob("*.npy"), key=_last_used, reverse=True)
    stale = entries[keep:] + sorted(cache_dir.glob("*.pt"))
    for entry in stale:
        try:
            entry.unlink(missing_ok=True)
        except OSError as exc:  # a cache that cannot be tidied still works
            logger.warning("trunk-feature cache: could not remove %s: %s", entry.name, exc)
            continue
        logger.info("trunk-feature cache: removed %s (not used recently)", entry.name)
    return stale


def _last_used(entry: Path) -> int:
    try:
        return entry.stat().st_mtime_ns
    except OSError:  # removed meanwhile by another process of the same site
        return 0


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass  # a read-only cache still serves hits; it is only pruned in write order


@torch.no_grad()
def _trunk_output_shape(model: nn.Module | object, one_image: torch.Tensor, boundary: int, device: torch.device) -> tuple[int, ...]:
    if boundary == 0:
        return tuple(one_image.shape[1:])
    for _, batch in _trunk_batches(model, one_image, None, boundary, device):
        return tuple(batch.shape[1:])
    raise ValueError("no image to probe the trunk with")


@torch.no_grad()
def _trunk_batches(
    model: nn.Module | object,
    images: torch.Tensor,
    order: torch.Tensor | None,
    boundary: int,
    device: torch.device,
    batch_size: int = 128,
) -> Iterator[tuple[int, torch.Tensor]]:
    """(row offset, float32 CPU trunk output) for ``images[order]`` a batch at a time, in eval mode."""
    count = len(images) if order is None else len(order)
    was_training = model.training  # type: ignore[union-attr]
    model.eval()  # type: ignore[union-attr]
    try:
        for start in range(0, count, batch_size):
            if order is None:
                batch = images[start : start + batch_size]
            else:
                batch = images[order[start : start + batch_size]]
            if boundary:
                batch = model.forward_stages(batch.to(device), 0, boundary)  # type: ignore[union-attr]
            yield start, batch.float().cpu()
    finally:
        model.train(was_training)  # type: ignore[union-attr]

