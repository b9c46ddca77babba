"""Row files: written a batch at a time, committed atomically, read into memory or memory-mapped."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest
import torch

from common.data.row_files import DamagedRowFile, RowFileWriter, open_rows, scratch_rows


def test_rows_written_in_batches_read_back_identically_in_memory_and_on_disk(tmp_path: Path) -> None:
    rows = torch.randn(7, 3, 2)
    with RowFileWriter(tmp_path / "f.npy", 7, (3, 2)) as writer:
        writer.write(0, rows[:4])
        writer.write(4, rows[4:])
        writer.commit()
    assert torch.equal(open_rows(tmp_path / "f.npy", "memory", rows=7), rows)
    assert torch.equal(open_rows(tmp_path / "f.npy", "disk", rows=7), rows)


def test_an_uncommitted_file_leaves_nothing_behind(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with RowFileWriter(tmp_path / "f.npy", 2, (1,)) as writer:
            writer.write(0, torch.ones(1, 1))
            raise RuntimeError("killed mid-way")
    assert list(tmp_path.iterdir()) == []


def test_a_short_or_foreign_file_is_reported_as_damaged(tmp_path: Path) -> None:
    with RowFileWriter(tmp_path / "f.npy", 4, (2,)) as writer:
        writer.commit()
    with pytest.raises(DamagedRowFile, match="expected 5 float32 rows"):
        open_rows(tmp_path / "f.npy", "memory", rows=5)
    (tmp_path / "g.npy").write_bytes(b"junk")
    with pytest.raises(DamagedRowFile, match="g.npy"):
        open_rows(tmp_path / "g.npy", "disk")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="unlinking an open file is POSIX")
def test_a_scratch_array_is_writable_and_leaves_no_file_in_its_folder(tmp_path: Path) -> None:
    scratch = scratch_rows(tmp_path, 5, (2, 2))
    scratch[3] = 7.0
    assert scratch.shape == (5, 2, 2) and float(scratch.sum()) == 28.0
    assert list(tmp_path.iterdir()) == []
    del scratch
    gc.collect()
    assert scratch_rows(tmp_path, 0, (2,)).shape == (0, 2)
