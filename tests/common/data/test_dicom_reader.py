"""read_image: every DICOM case a real archive holds, written by the tests themselves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from common.data.dicom_reader import UnreadableImageError, read_header_summary, read_image
from tests.common.data import dicom_factory as factory


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1])


def _minmax(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    return (a - a.min()) / (a.max() - a.min())


# ----------------------------------------------------------------------------- basics


def test_uncompressed_8bit_is_float32_in_unit_range_with_original_shape(tmp_path: Path) -> None:
    pixels = factory.gradient_image(24, 20)
    image = read_image(factory.write_dicom(tmp_path / "a.dcm", pixels))
    assert image.dtype == np.float32 and image.shape == (24, 20)
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert _correlation(image, pixels) > 0.99


def test_percentile_window_ignores_a_few_extreme_pixels(tmp_path: Path) -> None:
    pixels = factory.gradient_image(40, 40, maximum=1000, dtype=np.uint16)
    pixels[0, 0] = 4095  # a burnt-in marker must not squash the rest of the image
    image = read_image(factory.write_dicom(tmp_path / "a.dcm", pixels, bits_stored=12))
    body = np.ones_like(pixels, dtype=bool)
    body[0, 0] = False
    assert image[body].max() > 0.95  # the anatomy still spans the whole range
    assert image[0, 0] == 1.0


def test_12_bit_in_16_allocated(tmp_path: Path) -> None:
    pixels = factory.gradient_image(20, 20, maximum=4095, dtype=np.uint16)
    image = read_image(factory.write_dicom(tmp_path / "a.dcm", pixels, bits_stored=12))
    assert _correlation(image, pixels) > 0.99


def test_signed_16_bit_pixels_keep_their_order(tmp_path: Path) -> None:
    pixels = (factory.gradient_image(20, 20, maximum=4000, dtype=np.int32) - 2000).astype(np.int16)
    path = factory.write_dicom(tmp_path / "a.dcm", pixels, bits_stored=16)
    assert dcmread(path).PixelRepresentation == 1
    image = read_image(path)
    assert _correlation(image, pixels) > 0.99
    assert image[pixels == pixels.min()].max() < 0.05


def test_rescale_slope_and_intercept_are_applied_before_the_window(tmp_path: Path) -> None:
    pixels = factory.gradient_image(20, 20, maximum=1000, dtype=np.uint16)
    # Window 0..100 in rescaled units = stored 0..50 with slope 2: everything above is white.
    header = {"RescaleSlope": 2, "RescaleIntercept": 0, "WindowCenter": 50, "WindowWidth": 100}
    image = read_image(factory.write_dicom(tmp_path / "a.dcm", pixels, bits_stored=16, header=header))
    assert np.all(image[pixels >= 51] == 1.0)
    assert np.all(image[pixels == 0] == 0.0)


def test_negative_rescale_intercept_like_ct_hounsfield(tmp_path: Path) -> None:
    pixels = factory.gradient_image(20, 20, maximum=2000, dtype=np.uint16)
    header = {"RescaleSlope": 1, "RescaleIntercept": -1024, "WindowCenter": 40, "WindowWidth": 400}
    image = read_image(factory.write_dicom(tmp_path / "a.dcm", pixels, bits_stored=12, header=header))
    hu = pixels.astype(np.float64) - 1024
    assert np.all(image[hu <= -160] == 0.0)
    assert np.all(image[hu > 240] == 1.0)
    inside = (hu > -150) & (hu < 230)
    assert inside.any() and 0.0 < image[inside].mean() < 1.0


def test_window_centre_and_width_are_used_when_present(tmp_path: Path) -> None:
    pixels = factory.gradient_image(20, 20)
    header = {"WindowCenter": 64, "WindowWidth": 64}  # 32..96 -> 0..1
    image = read_image(factory.write_dicom(tmp_path / "a.dcm", pixels, header=header))
    assert np.all(image[pixels <= 31] == 0.0)
    assert np.all(image[pixels >= 97] == 1.0)
    mid = pixels == 64
    if mid.any():
        assert abs(float(image[mid].mean()) - 0.5) < 0.05


def test_voi_lut_sequence_is_used_when_present(tmp_path: Path) -> None:
    pixels = factory.gradient_image(20, 20)
    item = Dataset()
    item.LUTDescriptor = [256, 0, 8]
    item.add_new(0x00283006, "US", [255 - v for v in range(256)])  # LUT Data; inverting makes it visible
    header = {"VOILUTSequence": Sequence([item])}
    image = read_image(factory.write_dicom(tmp_path / "a.dcm", pixels, header=header))
    assert _correlation(image, pixels) < -0.99


def test_unusable_window_falls_back_to_the_percentile_window(tmp_path: Path) -> None:
    pixels = factory.gradient_image(20, 20)
    header = {"WindowCenter": 64, "WindowWidth": 0}  # width < 1 is invalid for LINEAR
    image = read_image(factory.write_dicom(tmp_path / "a.dcm", pixels, header=header))
    assert _correlation(image, pixels) > 0.99 and image.max() == 1.0


def test_monochrome1_is_inverted_so_bright_means_high_signal(tmp_path: Path) -> None:
    pixels = factory.gradient_image(20, 20)
    mono2 = read_image(factory.write_dicom(tmp_path / "m2.dcm", pixels))
    mono1 = read_image(factory.write_dicom(tmp_path / "m1.dcm", 255 - pixels, photometric="MONOCHROME1"))
    np.testing.assert_allclose(mono1, mono2, atol=1e-5)


def test_presentation_lut_shape_inverse_is_inverted(tmp_path: Path) -> None:
    pixels = factory.gradient_image(20, 20)
    image = read_image(factory.write_dicom(tmp_path / "a.dcm", pixels, header={"PresentationLUTShape": "INVERSE"}))
    assert _correlation(image, pixels) < -0.99


def test_multi_frame_policy_selects_middle_or_first_frame(tmp_path: Path) -> None:
    frames = [np.full((10, 12), value, dtype=np.uint8) for value in (10, 20, 30, 40, 50)]
    for index, frame in enumerate(frames):
        frame[index, :] = 200  # a distinct row per frame identifies it
    path = factory.write_dicom(tmp_path / "cine.dcm", factory.multi_frame(frames))
    assert int(dcmread(path).NumberOfFrames) == 5
    middle = read_image(path, frame_policy="middle")
    first = read_image(path, frame_policy="first")
    assert middle.shape == (10, 12)
    assert np.argmax(middle.mean(axis=1)) == 2
    assert np.argmax(first.mean(axis=1)) == 0


def test_unknown_frame_policy_is_rejected(tmp_path: Path) -> None:
    path = factory.write_dicom(tmp_path / "a.dcm", factory.gradient_image(8, 8))
    with pytest.raises(ValueError, match="frame_policy"):
        read_image(path, frame_policy="last")  # type: ignore[arg-type]


def test_rgb_dicom_gives_three_channels(tmp_path: Path) -> None:
    gray = factory.gradient_image(16, 16)
    rgb = np.stack([gray, 255 - gray, np.full_like(gray, 128)], axis=-1)
    image = read_image(factory.write_dicom(tmp_path / "rgb.dcm", rgb, photometric="RGB"))
    assert image.shape == (16, 16, 3)
    np.testing.assert_allclose(image, rgb / 255.0, atol=1e-6)


def test_ybr_full_dicom_is_converted_to_rgb(tmp_path: Path) -> None:
    from pydicom.pixels import convert_color_space

    gray = factory.gradient_image(16, 16)
    rgb = np.stack([gray, 255 - gray, np.full_like(gray, 60)], axis=-1)
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    image = read_image(factory.write_dicom(tmp_path / "ybr.dcm", ybr, photometric="YBR_FULL"))
    assert np.abs(image - rgb / 255.0).max() < 0.03


def test_implicit_vr_and_deflated_transfer_syntaxes(tmp_path: Path) -> None:
    pixels = factory.gradient_image(20, 20)
    expected = read_image(factory.write_dicom(tmp_path / "explicit.dcm", pixels))
    for syntax in (ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
        ds = factory.make_dataset(pixels)
        ds.file_meta.TransferSyntaxUID = syntax
        path = factory.save(ds, tmp_path / f"{syntax.name[:8]}.dcm")
        np.testing.assert_allclose(read_image(path), expected, atol=1e-6)


def test_file_without_preamble_is_still_read(tmp_path: Path) -> None:
    pixels = factory.gradient_image(12, 12)
    ds = factory.make_dataset(pixels)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    path = tmp_path / "raw"
    ds.save_as(path, enforce_file_format=False)
    assert path.read_bytes()[128:132] != b"DICM"
    assert _correlation(read_image(path), pixels) > 0.99


def test_palette_colour_is_expanded_to_rgb(tmp_path: Path) -> None:
    indices = (np.arange(64, dtype=np.uint8).reshape(8, 8) % 4).astype(np.uint8)
    ds = factory.make_dataset(indices, photometric="PALETTE COLOR")
    ds.RedPaletteColorLookupTableDescriptor = [4, 0, 16]
    ds.GreenPaletteColorLookupTableDescriptor = [4, 0, 16]
    ds.BluePaletteColorLookupTableDescriptor = [4, 0, 16]
    ds.RedPaletteColorLookupTableData = np.array([0, 65535, 0, 0], "<u2").tobytes()
    ds.GreenPaletteColorLookupTableData = np.array([0, 0, 65535, 0], "<u2").tobytes()
    ds.BluePaletteColorLookupTableData = np.array([0, 0, 0, 65535], "<u2").tobytes()
    image = read_image(factory.save(ds, tmp_path / "palette.dcm"))
    assert image.shape == (8, 8, 3)
    assert np.allclose(image[indices == 1], [1, 0, 0]) and np.allclose(image[indices == 3], [0, 0, 1])


def _palette_file_with_8_bit_entries_in_16_bit_words(path: Path, big_endian: bool) -> Path:
    """What scanners and pydicom-data's palette samples do: descriptor says 8 bits, the LUT data is OW."""
    from pydicom.dataelem import DataElement
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian

    indices = np.arange(256, dtype=np.uint8).reshape(16, 16)
    ds = factory.make_dataset(indices, photometric="PALETTE COLOR")
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian if big_endian else ExplicitVRLittleEndian
    ramp = np.arange(256, dtype=np.uint16).astype(">u2" if big_endian else "<u2").tobytes()
    for tag, colour in ((0x00281201, "Red"), (0x00281202, "Green"), (0x00281203, "Blue")):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 8])
        ds[tag] = DataElement(tag, "OW", ramp)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("big_endian", [False, True], ids=["little-endian", "big-endian"])
def test_palette_colour_is_scaled_by_the_lookup_tables_own_bit_depth(tmp_path: Path, big_endian: bool) -> None:
    image = read_image(_palette_file_with_8_bit_entries_in_16_bit_words(tmp_path / "palette.dcm", big_endian))

    assert image.shape == (16, 16, 3)
    assert image.max() == pytest.approx(1.0) and image.mean() == pytest.approx(0.5, abs=0.01)  # not black
    assert np.allclose(image[..., 0].flatten(), np.arange(256) / 255, atol=1e-6)


# ----------------------------------------------------------------------------- compressed syntaxes

LOSSLESS = [RLELossless, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless]


@pytest.mark.parametrize("syntax", LOSSLESS, ids=lambda s: s.name)
@pytest.mark.parametrize("bits", [8, 12, 16])
def test_lossless_compressed_syntaxes_decode_exactly(tmp_path: Path, syntax: str, bits: int) -> None:
    dtype = np.uint8 if bits == 8 else np.uint16
    pixels = factory.gradient_image(36, 40, maximum=2**bits - 1, dtype=dtype)
    pixels[5:9, 5:30] = pixels[5, 5]  # a flat run (JPEG-LS run mode)
    reference = read_image(factory.write_dicom(tmp_path / "native.dcm", pixels, bits_stored=bits))
    path = factory.write_dicom(tmp_path / "c.dcm", pixels, transfer_syntax=syntax, bits_stored=bits)
    assert dcmread(path).file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(read_image(path), reference)


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLosslessSV1, JPEGLSLossless, JPEG2000Lossless], ids=lambda s: s.name)
def test_compressed_multi_frame_decodes_the_chosen_frame(tmp_path: Path, syntax: str) -> None:
    frames = [factory.gradient_image(32, 32) // (i + 1) for i in range(3)]
    for index, frame in enumerate(frames):
        frame[index * 4 : index * 4 + 2, :] = 255
    path = factory.write_dicom(tmp_path / "mf.dcm", factory.multi_frame(frames), transfer_syntax=syntax)
    middle = read_image(path, "middle")
    assert np.argmax(middle.mean(axis=1)) in (4, 5)
    assert np.argmax(read_image(path, "first").mean(axis=1)) in (0, 1)


def test_jpeg_baseline_grayscale_decodes_close_to_original(tmp_path: Path) -> None:
    pixels = factory.gradient_image(32, 32)
    path = factory.write_dicom(tmp_path / "j.dcm", pixels, transfer_syntax=JPEGBaseline8Bit)
    image = read_image(path)
    assert np.abs(image - _minmax(pixels)).max() < 0.08


def test_jpeg_extended_process_decodes_close_to_original(tmp_path: Path) -> None:
    pixels = factory.gradient_image(32, 32)
    path = factory.write_dicom(tmp_path / "j.dcm", pixels, transfer_syntax=JPEGExtended12Bit)
    assert dcmread(path).file_meta.TransferSyntaxUID == JPEGExtended12Bit
    assert np.abs(read_image(path) - _minmax(pixels)).max() < 0.08


def test_jpeg_baseline_colour_ybr_is_converted_to_rgb(tmp_path: Path) -> None:
    gray = factory.gradient_image(32, 32)
    rgb = np.stack([gray, 255 - gray, np.full_like(gray, 60)], axis=-1)
    path = factory.write_dicom(tmp_path / "c.dcm", rgb, photometric="RGB", transfer_syntax=JPEGBaseline8Bit)
    assert dcmread(path).PhotometricInterpretation == "YBR_FULL"
    image = read_image(path)
    assert image.shape == (32, 32, 3)
    assert np.abs(image - rgb / 255.0).mean() < 0.03


def test_jpeg_2000_lossy_decodes_close_to_original(tmp_path: Path) -> None:
    pixels = factory.gradient_image(40, 40, maximum=4095, dtype=np.uint16)
    path = factory.write_dicom(tmp_path / "j2k.dcm", pixels, bits_stored=12, transfer_syntax=JPEG2000)
    assert np.abs(read_image(path) - _minmax(pixels)).mean() < 0.03


# ----------------------------------------------------------------------------- ordinary images


def test_png_and_jpeg_files_are_read_with_pillow(tmp_path: Path) -> None:
    pixels = factory.gradient_image(20, 30)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    Image.fromarray(np.stack([pixels] * 3, -1)).save(tmp_path / "b.jpg", quality=95)
    png = read_image(tmp_path / "a.png")
    jpg = read_image(tmp_path / "b.jpg")
    np.testing.assert_allclose(png, pixels / 255.0, atol=1e-6)
    assert jpg.shape == (20, 30, 3) and np.abs(jpg[..., 0] - pixels / 255.0).max() < 0.1


def test_png_without_a_suffix_is_recognised_by_its_content(tmp_path: Path) -> None:
    pixels = factory.gradient_image(10, 10)
    Image.fromarray(pixels).save(tmp_path / "export", format="PNG")
    np.testing.assert_allclose(read_image(tmp_path / "export"), pixels / 255.0, atol=1e-6)


def test_16_bit_png_gets_the_percentile_window(tmp_path: Path) -> None:
    pixels = factory.gradient_image(20, 20, maximum=3000, dtype=np.uint16)
    Image.fromarray(pixels).save(tmp_path / "deep.png")
    image = read_image(tmp_path / "deep.png")
    assert image.max() == 1.0 and _correlation(image, pixels) > 0.99


# ----------------------------------------------------------------------------- broken files


def _reason(path: Path, **kwargs: object) -> str:
    with pytest.raises(UnreadableImageError) as caught:
        read_image(path, **kwargs)  # type: ignore[arg-type]
    assert caught.value.path == path
    assert str(path) in str(caught.value)
    return caught.value.reason


def test_missing_file_is_reported(tmp_path: Path) -> None:
    assert "not found" in _reason(tmp_path / "nope.dcm")


def test_garbage_file_is_unreadable_with_a_fix(tmp_path: Path) -> None:
    path = tmp_path / "garbage.dcm"
    path.write_bytes(b"this is not an image at all" * 10)
    reason = _reason(path)
    assert "remove" in reason


def test_truncated_uncompressed_file_is_unreadable(tmp_path: Path) -> None:
    path = factory.write_dicom(tmp_path / "t.dcm", factory.gradient_image(64, 64))
    path.write_bytes(path.read_bytes()[:-1500])
    assert "truncated or corrupt" in _reason(path)


def test_truncated_header_is_unreadable(tmp_path: Path) -> None:
    path = factory.write_dicom(tmp_path / "t.dcm", factory.gradient_image(64, 64))
    path.write_bytes(path.read_bytes()[:200])
    assert "truncated" in _reason(path)


@pytest.mark.parametrize("syntax", [JPEGBaseline8Bit, JPEGLSLossless, JPEG2000Lossless, RLELossless], ids=lambda s: s.name)
def test_truncated_compressed_file_is_unreadable(tmp_path: Path, syntax: str) -> None:
    path = factory.write_dicom(tmp_path / "t.dcm", factory.gradient_image(40, 40), transfer_syntax=syntax)
    data = path.read_bytes()
    # Cut the codestream in half but keep a well-formed item so only the decoder can notice.
    ds = dcmread(path)
    from pydicom.encaps import encapsulate, generate_fragments

    fragment = next(generate_fragments(ds.PixelData))
    ds.PixelData = encapsulate([fragment[: len(fragment) // 3]])
    ds.save_as(path, enforce_file_format=True)
    assert path.read_bytes() != data
    assert "cannot be decoded" in _reason(path) or "truncated" in _reason(path)


def test_a_decoding_failure_gives_each_plugins_cause_and_logs_no_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = factory.write_dicom(tmp_path / "t.dcm", factory.gradient_image(40, 40), transfer_syntax=JPEGLSLossless)
    ds = dcmread(path)
    from pydicom.encaps import encapsulate, generate_fragments

    fragment = next(generate_fragments(ds.PixelData))
    ds.PixelData = encapsulate([fragment[: len(fragment) // 3]])
    ds.save_as(path, enforce_file_format=True)

    with caplog.at_level("DEBUG"):
        reason = _reason(path)

    assert "all available plugins" in reason and "pylibjpeg:" in reason  # the cause, not only pydicom's first line
    assert not [r for r in caplog.records if r.exc_info], "pydicom's per-plugin tracebacks are not logged"


def test_a_library_message_never_quotes_the_value_it_choked_on() -> None:
    from common.data.read_failures import describe_failure as _describe

    described = _describe(ValueError("Invalid value for VR IS: '1A'\n  and \"SMITH^JOHN\" too"))

    assert "1A" not in described and "SMITH" not in described
    assert described == "ValueError: Invalid value for VR IS: <value>; and <value> too"


def test_missing_pixel_data_is_unreadable(tmp_path: Path) -> None:
    ds = factory.make_dataset(factory.gradient_image(8, 8))
    del ds.PixelData
    path = factory.save(ds, tmp_path / "nopixels.dcm")
    assert "no Pixel Data" in _reason(path)


def test_bits_stored_larger_than_bits_allocated_is_unreadable(tmp_path: Path) -> None:
    ds = factory.make_dataset(factory.gradient_image(8, 8))
    ds.BitsStored = 12  # with Bits Allocated 8
    path = factory.save(ds, tmp_path / "bits.dcm")
    reason = _reason(path)
    assert "Bits Stored (12)" in reason and "Bits Allocated (8)" in reason


def test_missing_rows_is_unreadable(tmp_path: Path) -> None:
    ds = factory.make_dataset(factory.gradient_image(8, 8))
    del ds.Rows
    assert "Rows" in _reason(factory.save(ds, tmp_path / "norows.dcm"))


def test_pixel_data_shorter_than_the_header_says_is_unreadable(tmp_path: Path) -> None:
    ds = factory.make_dataset(factory.gradient_image(8, 8))
    ds.Rows = 64
    assert "cannot be decoded" in _reason(factory.save(ds, tmp_path / "short.dcm"))


def test_transfer_syntax_without_installed_decoder_names_the_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = factory.write_dicom(tmp_path / "ls.dcm", factory.gradient_image(16, 16), transfer_syntax=JPEGLSLossless)
    from pydicom.pixels.decoders.base import get_decoder

    decoder = get_decoder(JPEGLSLossless)
    monkeypatch.setattr(type(decoder), "is_available", property(lambda self: False))
    reason = _reason(path)
    assert "pylibjpeg-libjpeg" in reason and "install" in reason


def test_syntax_without_any_decoder_is_explained(tmp_path: Path) -> None:
    ds = factory.make_dataset(factory.gradient_image(8, 8))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: video, no image decoder
    from pydicom.encaps import encapsulate

    ds.PixelData = encapsulate([b"\x00" * 64])
    path = factory.save(ds, tmp_path / "mpeg.dcm")
    reason = _reason(path)
    assert "no decoder supports" in reason or "no decoder for it" in reason


def test_htj2k_has_a_decoder_available() -> None:
    # No HTJ2K encoder is installed to write a test file; at least the decoder must be there.
    from pydicom.pixels.decoders.base import get_decoder

    assert get_decoder(HTJ2KLossless).is_available


def test_header_summary_reads_structure_without_pixels(tmp_path: Path) -> None:
    path = factory.write_dicom(tmp_path / "a.dcm", factory.gradient_image(12, 10), modality="OT")
    summary = read_header_summary(path)
    assert (summary.rows, summary.columns, summary.bits_stored) == (12, 10, 8)
    assert summary.transfer_syntax == ExplicitVRLittleEndian.name
    assert factory.MANUFACTURER not in repr(summary) and factory.PATIENT_ID not in repr(summary)
