"""Decoded, resized images kept on the site's disk so DICOM is decoded once, not every epoch.

Layout (one small file per image, written atomically with ``common.atomic_io``)::

    <cache_dir>/<geometry key>-f<frame policy>-r<reader version>/<sha[:2]>/<sha>.npy
    <cache_dir>/<same folder>/index.json      # path -> (size, mtime_ns, sha), a speed-up only

The key of an image is the SHA-256 of the file's CONTENT plus the geometry of the
preprocessing (size, channels), the frame policy and the reader version; renaming or
copying a file still hits, editing it misses. Stored values are the geometry step's output
(before normalisation), quantised to uint16 (resolution 1/65535, finer than any 12- or
16-bit window maps to), so changing mean/std does not invalidate the cache.

``index.json`` remembers each path's size and modification time with its hash so that a
later epoch need not even re-read and hash the file; when size or mtime differ the file is
hashed again. A damaged cache file (power cut, disk full) reads as a miss and is rewritten.
Failures are never cached: installing a missing decoder plugin takes effect at once.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path

import numpy as np

from common.atomic_io import atomic_write_bytes, atomic_write_text
from common.data.dicom_reader import READER_VERSION, FramePolicy, UnreadableImageError, read_image
from common.data.image_preprocessing import Preprocessing

logger = logging.getLogger(__name__)

QUANT = 65535.0
_HASH_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's content."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class DecodedImageCache:
    """Returns the geometry-step output (S, S, C) float32 for an image file, decoding on a miss.

    cache_dir: the site's cache folder (created if needed).
    preprocessing: only its geometry (size, channels) matters for the cache key.
    frame_policy: which frame of a multi-frame DICOM ("middle" or "first").
    """

    def __init__(self, cache_dir: str | Path, preprocessing: Preprocessing, frame_policy: FramePolicy = "middle") -> None:
        self.preprocessing = preprocessing
        self.frame_policy: FramePolicy = frame_policy
        self.folder = Path(cache_dir) / f"{preprocessing.geometry_key()}-f{frame_policy}-r{READER_VERSION}"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0
        self._index_path = self.folder / "index.json"
        self._index: dict[str, list] = self._read_index()
        self._index_dirty = False

    def load(self, path: str | Path) -> np.ndarray:
        """The fitted image for `path`; raises UnreadableImageError if it cannot be decoded."""
        path = Path(path)
        if not path.is_file():
            raise UnreadableImageError(path, "file not found; fix its path in the manifest (paths are relative to "
                                             "the manifest's folder) or delete the row")
        digest = self._content_hash(path)
        target = self.folder / digest[:2] / f"{digest}.npy"
        if target.is_file():
            try:
                stored = np.load(target, allow_pickle=False)
                self.hits += 1
                return stored.astype(np.float32) / QUANT
            except (OSError, ValueError, EOFError):
                logger.debug("cache file %s is damaged; decoding again", target)
        self.misses += 1
        quantised = quantise(self.preprocessing.fit(read_image(path, self.frame_policy)))
        buffer = io.BytesIO()
        np.save(buffer, quantised, allow_pickle=False)
        atomic_write_bytes(target, buffer.getvalue())
        return quantised.astype(np.float32) / QUANT

    def flush(self) -> None:
        """Persist the path -> hash index (call once after a pass over the site's files)."""
        if self._index_dirty:
            atomic_write_text(self._index_path, json.dumps(self._index, sort_keys=True))
            self._index_dirty = False

    def _content_hash(self, path: Path) -> str:
        stat = path.stat()
        key = str(path.resolve())
        known = self._index.get(key)
        if known and known[0] == stat.st_size and known[1] == stat.st_mtime_ns:
            return str(known[2])
        digest = file_sha256(path)
        self._index[key] = [stat.st_size, stat.st_mtime_ns, digest]
        self._index_dirty = True
        return digest

    def _read_index(self) -> dict[str, list]:
        try:
            loaded = json.loads(self._index_path.read_text(encoding="utf-8"))
            return loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            return {}


def quantise(fitted: np.ndarray) -> np.ndarray:
    """The geometry step's output as the cache stores it: uint16, steps of 1/65535.

    ``quantise(fitted).astype(np.float32) / QUANT`` is exactly what training reads, so prediction on a
    new study (``client.inference.predict``) sees the same pixels as training did.
    """
    return np.round(np.clip(fitted, 0.0, 1.0) * QUANT).astype(np.uint16)


def cache_size_bytes(cache_dir: str | Path) -> int:
    """Total size of a cache folder (for the site's status output)."""
    total = 0
    for root, _dirs, files in os.walk(cache_dir):
        total += sum((Path(root) / f).stat().st_size for f in files)
    return total
