"""Preprocessing geometry, the decoded-image cache, and site-dataset loading through it."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import common.data.decoded_image_cache as cache_module
from common.data.decoded_image_cache import DecodedImageCache
from common.data.image_preprocessing import Preprocessing
from common.data.site_dataset import load_site_dataset
from tests.common.data import dicom_factory as factory

# ----------------------------------------------------------------------------- preprocessing


def test_preprocess_keeps_aspect_ratio_by_padding_the_short_side() -> None:
    image = np.ones((20, 10), dtype=np.float32)  # portrait, all white
    fitted = Preprocessing(16, 1).fit(image)
    assert fitted.shape == (16, 16, 1)
    columns_white = fitted[..., 0].mean(axis=0)
    assert np.allclose(columns_white[4:12], 1.0) and np.allclose(columns_white[:4], 0.0)
    assert np.allclose(columns_white[12:], 0.0)


def test_preprocess_returns_normalised_channels_first_tensor() -> None:
    prep = Preprocessing(8, 3, mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 0.5))
    tensor = prep.preprocess(np.full((8, 8), 1.0, dtype=np.float32))
    assert tensor.shape == (3, 8, 8) and tensor.dtype == torch.float32
    assert torch.allclose(tensor[0], torch.ones(8, 8)) and torch.allclose(tensor[1], torch.full((8, 8), 2.0))


def test_rgb_becomes_gray_with_luma_weights() -> None:
    rgb = np.zeros((4, 4, 3), dtype=np.float32)
    rgb[..., 1] = 1.0
    fitted = Preprocessing(4, 1).fit(rgb)
    assert np.allclose(fitted, 0.587, atol=1e-6)


def test_preprocessing_key_is_stable_and_names_every_setting() -> None:
    a = Preprocessing(64, 1, (0.5,), (0.25,))
    assert a.key() == Preprocessing(64, 1, (0.5,), (0.25,)).key()
    assert a.key() != Preprocessing(64, 1, (0.4,), (0.25,)).key()
    assert a.key() != Preprocessing(32, 1, (0.5,), (0.25,)).key()
    assert a.geometry_key() == Preprocessing(64, 1, (0.4,), (0.2,)).geometry_key()


def test_preprocessing_rejects_mismatched_statistics() -> None:
    with pytest.raises(ValueError, match="mean needs 1 or 3"):
        Preprocessing(8, 3, mean=(0.5, 0.5), std=(0.2,))


def test_imagenet_preset_for_one_channel_averages_the_rgb_statistics() -> None:
    prep = Preprocessing.imagenet(32, 1)
    assert prep.mean == pytest.approx((0.449,), abs=1e-3)


# ----------------------------------------------------------------------------- cache


def _site(tmp_path: Path, count: int = 4) -> Path:
    rows = ["path,label,patient_id,age"]
    for i in range(count):
        pixels = factory.gradient_image(24, 20) // (i + 1)
        factory.write_dicom(tmp_path / "site" / f"img{i}.dcm", pixels, patient_id=f"P{i // 2}")
        rows.append(f"img{i}.dcm,{'finding' if i % 2 else 'normal'},P{i // 2},{'' if i == 0 else 50 + i}")
    manifest = tmp_path / "site" / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


def _count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    calls: list[Path] = []
    real = cache_module.read_image

    def counting(path: Path, frame_policy: str = "middle") -> np.ndarray:
        calls.append(Path(path))
        return real(path, frame_policy)  # type: ignore[arg-type]

    monkeypatch.setattr(cache_module, "read_image", counting)
    return calls


def test_second_load_is_served_from_the_cache_without_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = factory.write_dicom(tmp_path / "a.dcm", factory.gradient_image(24, 20))
    calls = _count_decodes(monkeypatch)
    prep = Preprocessing(16, 1)
    first = DecodedImageCache(tmp_path / "cache", prep).load(path)
    fresh = DecodedImageCache(tmp_path / "cache", prep)  # a new process / a later round
    second = fresh.load(path)
    assert len(calls) == 1 and fresh.hits == 1 and fresh.misses == 0
    np.testing.assert_array_equal(first, second)
    assert np.abs(first - prep.fit(cache_module.read_image(path))).max() < 1e-4


def test_cache_is_keyed_by_content_not_by_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = factory.write_dicom(tmp_path / "a.dcm", factory.gradient_image(24, 20))
    cache = DecodedImageCache(tmp_path / "cache", Preprocessing(16, 1))
    cache.load(path)
    copy = tmp_path / "renamed.dcm"
    copy.write_bytes(path.read_bytes())
    calls = _count_decodes(monkeypatch)
    cache.load(copy)
    assert calls == []
    factory.write_dicom(path, factory.gradient_image(24, 20, maximum=100))  # edited in place
    cache.load(path)
    assert calls == [path]


def test_different_geometry_or_frame_policy_misses(tmp_path: Path) -> None:
    path = factory.write_dicom(tmp_path / "a.dcm", factory.gradient_image(24, 20))
    DecodedImageCache(tmp_path / "cache", Preprocessing(16, 1)).load(path)
    other_size = DecodedImageCache(tmp_path / "cache", Preprocessing(8, 1))
    other_size.load(path)
    other_frame = DecodedImageCache(tmp_path / "cache", Preprocessing(16, 1), frame_policy="first")
    other_frame.load(path)
    assert other_size.misses == 1 and other_frame.misses == 1
    same_geometry = DecodedImageCache(tmp_path / "cache", Preprocessing(16, 1, (0.1,), (0.9,)))
    same_geometry.load(path)
    assert same_geometry.hits == 1


def test_damaged_cache_file_is_decoded_again(tmp_path: Path) -> None:
    path = factory.write_dicom(tmp_path / "a.dcm", factory.gradient_image(24, 20))
    cache = DecodedImageCache(tmp_path / "cache", Preprocessing(16, 1))
    good = cache.load(path)
    for stored in (tmp_path / "cache").rglob("*.npy"):
        stored.write_bytes(b"half a file")
    again = DecodedImageCache(tmp_path / "cache", Preprocessing(16, 1))
    np.testing.assert_array_equal(again.load(path), good)
    assert again.misses == 1


# ----------------------------------------------------------------------------- site dataset


def test_site_dataset_loads_tensors_and_reuses_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = _site(tmp_path)
    prep = Preprocessing(16, 3)
    kwargs = dict(preprocessing=prep, cache_dir=tmp_path / "cache", class_names=["normal", "finding"],
                  clinical_features=["age"], show_progress=False)
    data = load_site_dataset(manifest, **kwargs)  # type: ignore[arg-type]
    assert data.images.shape == (4, 3, 16, 16) and data.images.dtype == torch.float32
    assert data.labels.tolist() == [0, 1, 0, 1]
    assert data.patient_ids == ["P0", "P0", "P1", "P1"]
    assert data.clinical.shape == (4, 1)
    assert data.clinical[0, 0].item() == 0.0  # missing -> 0, never the site's mean (it would couple patients)
    calls = _count_decodes(monkeypatch)
    again = load_site_dataset(manifest, **kwargs)  # type: ignore[arg-type]
    assert calls == []
    assert torch.equal(again.images, data.images)


@pytest.mark.parametrize("storage", ["disk", "auto"])
def test_site_images_kept_on_disk_equal_the_ones_kept_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, storage: str
) -> None:
    manifest = _site(tmp_path, 3)
    (tmp_path / "site" / "img1.dcm").write_bytes(b"not dicom")
    kwargs = dict(preprocessing=Preprocessing(16, 1), cache_dir=tmp_path / "cache", class_names=["normal", "finding"],
                  show_progress=False)
    in_memory = load_site_dataset(manifest, storage="memory", **kwargs)  # type: ignore[arg-type]
    monkeypatch.setattr("common.data.memory_budget.available_memory_bytes", lambda: 1024)  # 'auto': memory is short
    on_disk = load_site_dataset(manifest, storage=storage, **kwargs)  # type: ignore[arg-type]
    assert torch.equal(on_disk.images, in_memory.images) and len(on_disk) == 2
    assert not any(path.name.startswith(".scratch") for path in (tmp_path / "cache").rglob("*"))
    if sys.platform.startswith("linux"):  # memory-mapped from an unlinked scratch file in the cache folder
        mapped = Path("/proc/self/maps").read_text(encoding="ascii", errors="replace")
        assert f"{tmp_path / 'cache'}" in mapped and ".scratch-" in mapped


def test_unreadable_files_are_skipped_with_their_reason(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    manifest = _site(tmp_path, 3)
    (tmp_path / "site" / "img1.dcm").write_bytes(b"not dicom")
    with caplog.at_level("WARNING"):
        data = load_site_dataset(manifest, preprocessing=Preprocessing(8, 1), cache_dir=tmp_path / "cache",
                                 class_names=["normal", "finding"], show_progress=False)
    assert len(data) == 2 and data.patient_ids == ["P0", "P1"]
    assert [file for file, _ in data.skipped] == ["img1.dcm"]
    assert "skipping row 3 (img1.dcm)" in caplog.text and "1 of 3 images" in caplog.text  # the manifest row


def test_subset_keeps_rows_aligned(tmp_path: Path) -> None:
    data = load_site_dataset(_site(tmp_path), preprocessing=Preprocessing(8, 1), cache_dir=tmp_path / "c",
                             class_names=["normal", "finding"], show_progress=False)
    part = data.subset([3, 0])
    assert part.labels.tolist() == [1, 0] and part.patient_ids == ["P1", "P0"]
    assert torch.equal(part.images[1], data.images[0])
    assert "P1" not in repr(part)


def test_a_missing_file_is_skipped_like_a_corrupt_one_and_too_many_stop_the_site_naming_the_rows(
    tmp_path: Path,
) -> None:
    from common.data.site_dataset import TooManyUnreadableImages

    manifest = _site(tmp_path, 3)
    (tmp_path / "site" / "img1.dcm").unlink()
    kwargs = dict(preprocessing=Preprocessing(16, 1), cache_dir=tmp_path / "cache", class_names=["normal", "finding"],
                  show_progress=False)

    data = load_site_dataset(manifest, max_unreadable_share=0.5, **kwargs)  # type: ignore[arg-type]
    assert len(data) == 2 and "file not found" in data.skipped[0][1]
    with pytest.raises(TooManyUnreadableImages, match=r"1 of 3 images .* more than the 10% allowed .*rows 3\b"):
        load_site_dataset(manifest, max_unreadable_share=0.1, **kwargs)  # type: ignore[arg-type]
