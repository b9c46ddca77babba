"""Large float32 arrays of rows (one row per image) kept in ``.npy`` files on a site's disk.

Rows are written a batch at a time, so making a file never needs the whole array in memory.
A finished file is opened either into memory or memory-mapped (copy-on-write: the tensor may be
written to, the file never is). A memory-mapped tensor and its slices cost no RAM until read,
and the pages read can be dropped again by the operating system under memory pressure.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from common.atomic_io import fsync_directory


class DamagedRowFile(ValueError):
    """A row file cannot be read back (truncated, not a .npy, wrong shape)."""


class RowFileWriter:
    """Writes ``(rows, *row_shape)`` float32 into a temporary file; :meth:`commit` renames it into place.

    Used as a context manager, an uncommitted file is removed on exit.
    """

    def __init__(self, path: str | Path, rows: int, row_shape: tuple[int, ...]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.close(fd)
        self._tmp = Path(name)
        self._array: np.memmap | None = np.lib.format.open_memmap(
            self._tmp, mode="w+", dtype=np.float32, shape=(rows, *row_shape)
        )

    def write(self, start: int, rows: torch.Tensor | np.ndarray) -> None:
        assert self._array is not None, "file already committed"
        values = rows.detach().cpu().numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows)
        self._array[start : start + len(values)] = values

    def commit(self) -> Path:
        """Flush to disk and atomically replace ``path`` (a reader sees the old file or the whole new one)."""
        assert self._array is not None, "file already committed"
        self._array.flush()
        with open(self._tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        self._array = None
        os.replace(self._tmp, self.path)
        fsync_directory(self.path.parent)
        return self.path

    def __enter__(self) -> RowFileWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._array is not None:
            self._array = None
            self._tmp.unlink(missing_ok=True)


def open_rows(path: str | Path, where: Literal["memory", "disk"], rows: int | None = None) -> torch.Tensor:
    """The float32 array of ``path``: read into memory, or memory-mapped from the disk.

    Raises DamagedRowFile when the file cannot be read or does not hold ``rows`` rows.
    """
    try:
        array = np.load(path, mmap_mode="c" if where == "disk" else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DamagedRowFile(f"{path}: {exc}") from exc
    if array.dtype != np.float32 or array.ndim < 1 or (rows is not None and array.shape[0] != rows):
        raise DamagedRowFile(f"{path}: holds {array.dtype} {array.shape}, expected {rows} float32 rows")
    return torch.from_numpy(array)


def scratch_rows(folder: str | Path, rows: int, row_shape: tuple[int, ...]) -> torch.Tensor:
    """A zeroed, writable, memory-mapped float32 tensor whose file is already unlinked.

    The space it takes on disk is given back when the last tensor viewing it is freed, even if
    the process is killed (POSIX). On systems that cannot unlink an open file, the file stays in
    ``folder`` named ``.scratch-*.npy`` and may be deleted when no site process runs.
    """
    if rows == 0:
        return torch.zeros((0, *row_shape), dtype=torch.float32)
    Path(folder).mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".scratch-", suffix=".npy", dir=folder)
    os.close(fd)
    array = np.lib.format.open_memmap(name, mode="w+", dtype=np.float32, shape=(rows, *row_shape))
    try:
        os.unlink(name)
    except OSError:
        pass
    return torch.from_numpy(array)
