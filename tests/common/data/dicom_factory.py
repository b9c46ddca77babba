"""Write small, real DICOM files for the tests: every photometric, depth and compressed syntax.

Encoders used for the compressed transfer syntaxes:

* RLE Lossless, JPEG 2000 (lossless and lossy): ``Dataset.compress`` (pydicom's own RLE
  encoder; pylibjpeg-openjpeg for JPEG 2000).
* JPEG Baseline: Pillow writes the frame; JPEG Extended: the same 8-bit Huffman stream
  marked as SOF1 (an extended-process frame header, which decoders must accept).
* JPEG Lossless (process 14, first-order prediction) and JPEG-LS lossless: no encoder is
  installed in the project's environment, so this module carries two small reference
  encoders written from ITU-T T.81 Annex H and ITU-T T.87. They are slow (pure Python) and
  meant only for the tiny test images.

Nothing here is used by the product code.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

# Distinctive identifying values: the privacy tests look for these in logs and reports.
PATIENT_NAME = "Zyx^Quorra"
PATIENT_ID = "PID-7731"
INSTITUTION = "St Elsewhere Qx"
BIRTH_DATE = "19470312"
STUDY_DATE = "20230917"
MANUFACTURER = "Quuxon Medical"
REFERRING = "Dr^Vexmoor"
ACCESSION = "ACC-55821"

IDENTIFYING_VALUES = (
    PATIENT_NAME,
    "Quorra",
    PATIENT_ID,
    INSTITUTION,
    BIRTH_DATE,
    STUDY_DATE,
    "Vexmoor",
    ACCESSION,
)


def make_dataset(
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    modality: str = "CT",
    header: dict[str, Any] | None = None,
    patient_id: str = PATIENT_ID,
) -> Dataset:
    """A complete uncompressed dataset holding `pixels`.

    pixels: uint8/uint16/int8/int16 array shaped (H, W), (F, H, W), (H, W, 3) or (F, H, W, 3).
    header: extra or overriding elements by keyword (e.g. ``{"RescaleSlope": 2}``).
    """
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    sop_class = CTImageStorage if modality == "CT" else SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.Modality = modality
    ds.PatientName = PATIENT_NAME
    ds.PatientID = patient_id
    ds.PatientBirthDate = BIRTH_DATE
    ds.StudyDate = STUDY_DATE
    ds.SeriesDate = STUDY_DATE
    ds.InstitutionName = INSTITUTION
    ds.Manufacturer = MANUFACTURER
    ds.ReferringPhysicianName = REFERRING
    ds.AccessionNumber = ACCESSION
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    default_bits = 8 * pixels.dtype.itemsize
    ds.set_pixel_data(pixels, photometric, bits_stored or default_bits)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword, value in (header or {}).items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_dicom(path: Path, pixels: np.ndarray, *, transfer_syntax: str = ExplicitVRLittleEndian, **kwargs: Any) -> Path:
    """Write `pixels` to `path` in the given transfer syntax (see module doc for encoders)."""
    ds = make_dataset(pixels, **kwargs)
    if transfer_syntax != ExplicitVRLittleEndian:
        encode_in_place(ds, pixels, transfer_syntax)
    return save(ds, path)


def encode_in_place(ds: Dataset, pixels: np.ndarray, transfer_syntax: str) -> None:
    """Replace the native pixel data of `ds` by `transfer_syntax`-encoded frames."""
    if transfer_syntax in (RLELossless, JPEG2000Lossless):
        ds.compress(transfer_syntax, generate_instance_uid=False)
        return
    if transfer_syntax == JPEG2000:
        ds.compress(transfer_syntax, j2k_cr=[4], generate_instance_uid=False)
        return
    frames = _frames(pixels, int(ds.get("NumberOfFrames", 1)))
    bits = int(ds.BitsStored)
    if transfer_syntax == JPEGBaseline8Bit:
        encoded = [pillow_jpeg(frame) for frame in frames]
        if pixels.ndim >= 3 and pixels.shape[-1] == 3:
            ds.PhotometricInterpretation = "YBR_FULL"
    elif transfer_syntax == JPEGExtended12Bit:
        encoded = [as_extended_process(pillow_jpeg(frame)) for frame in frames]
    elif transfer_syntax in (JPEGLosslessSV1, JPEGLossless):  # SV1 streams are valid process-14 streams
        encoded = [jpeg_lossless_sv1(frame, bits) for frame in frames]
    elif transfer_syntax in (JPEGLSLossless, JPEGLSNearLossless):  # NEAR = 0 is valid near-lossless
        encoded = [jpeg_ls_lossless(frame, bits) for frame in frames]
    else:
        raise ValueError(f"dicom_factory has no encoder for {transfer_syntax}")
    ds.PixelData = encapsulate(encoded)
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = transfer_syntax


def _frames(pixels: np.ndarray, nr_frames: int) -> list[np.ndarray]:
    return [pixels] if nr_frames == 1 else [pixels[i] for i in range(nr_frames)]


# ----------------------------------------------------------------------------- JPEG baseline


def pillow_jpeg(frame: np.ndarray, quality: int = 95) -> bytes:
    """Baseline JPEG (SOF0) written by Pillow; colour uses 4:4:4 YCbCr (DICOM YBR_FULL)."""
    from PIL import Image

    if frame.dtype != np.uint8:
        raise ValueError("JPEG baseline needs 8-bit samples")
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="JPEG", quality=quality, subsampling=0)
    return buffer.getvalue()


def as_extended_process(stream: bytes) -> bytes:
    """Relabel an 8-bit baseline stream as extended sequential (SOF0 -> SOF1)."""
    index = stream.index(b"\xff\xc0")
    return stream[:index] + b"\xff\xc1" + stream[index + 2 :]


# ----------------------------------------------------------------------------- bits


class _Bits:
    """MSB-first bit accumulator."""

    def __init__(self) -> None:
        self.bits: list[int] = []

    def put(self, value: int, count: int) -> None:
        for shift in range(count - 1, -1, -1):
            self.bits.append((value >> shift) & 1)

    def zeros(self, count: int) -> None:
        self.bits.extend([0] * count)


def _segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload


# ----------------------------------------------------------------------------- JPEG Lossless


def jpeg_lossless_sv1(frame: np.ndarray, precision: int) -> bytes:
    """ITU-T T.81 process 14, predictor 1 (left), one grayscale component, Pt = 0."""
    if frame.ndim != 2:
        raise ValueError("the test encoder handles grayscale frames only")
    height, width = frame.shape
    values = frame.astype(np.int64) & ((1 << precision) - 1)
    # One DC table: every SSSS category 0..16 gets a 5-bit code (the all-ones code is unused).
    bits_counts = [0, 0, 0, 0, 17] + [0] * 11
    huffval = list(range(17))
    codes = {ssss: (ssss, 5) for ssss in huffval}

    out = _Bits()
    for y in range(height):
        for x in range(width):
            if x == 0 and y == 0:
                prediction = 1 << (precision - 1)
            elif y == 0:
                prediction = int(values[y, x - 1])
            elif x == 0:
                prediction = int(values[y - 1, x])
            else:
                prediction = int(values[y, x - 1])
            diff = (int(values[y, x]) - prediction) % 65536
            if diff > 32768:
                diff -= 65536
            ssss = 0 if diff == 0 else int(abs(diff)).bit_length()
            code, length = codes[ssss]
            out.put(code, length)
            if 0 < ssss < 16:
                extra = diff if diff > 0 else diff + (1 << ssss) - 1
                out.put(extra, ssss)
    scan = _pack_jpeg(out.bits)

    sof = bytes([precision]) + height.to_bytes(2, "big") + width.to_bytes(2, "big") + bytes([1, 1, 0x11, 0])
    dht = bytes([0x00]) + bytes(bits_counts) + bytes(huffval)
    sos = bytes([1, 1, 0x00, 1, 0, 0])  # Ns, Cs, Td/Ta, Ss = predictor 1, Se, Ah/Al
    return b"\xff\xd8" + _segment(0xC3, sof) + _segment(0xC4, dht) + _segment(0xDA, sos) + scan + b"\xff\xd9"


def _pack_jpeg(bits: list[int]) -> bytes:
    """T.81: pad with 1-bits, stuff 0x00 after every 0xFF."""
    padded = bits + [1] * (-len(bits) % 8)
    out = bytearray()
    for start in range(0, len(padded), 8):
        byte = int("".join(map(str, padded[start : start + 8])), 2)
        out.append(byte)
        if byte == 0xFF:
            out.append(0x00)
    return bytes(out)


# ----------------------------------------------------------------------------- JPEG-LS

_J = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 9, 10, 11, 12, 13, 14, 15]


def jpeg_ls_lossless(frame: np.ndarray, precision: int) -> bytes:
    """ITU-T T.87 lossless (NEAR = 0), default parameters, one grayscale component.

    Supports precisions with MAXVAL >= 128 (8..16 bits), where the default thresholds are
    T1 = F + 2, T2 = 4F + 3, T3 = 17F + 4 with F = (min(MAXVAL, 4095) + 128) // 256.
    """
    if frame.ndim != 2 or not 8 <= precision <= 16:
        raise ValueError("the test encoder handles 8..16-bit grayscale frames only")
    height, width = frame.shape
    maxval = (1 << precision) - 1
    value_range = maxval + 1
    qbpp = precision
    bpp = max(2, precision)
    limit = 2 * (bpp + max(8, bpp))
    factor = (min(maxval, 4095) + 128) // 256
    t1, t2, t3 = factor + 2, 4 * factor + 3, 17 * factor + 4
    reset = 64
    a_init = max(2, (value_range + 32) // 64)

    a: dict[int, int] = {}
    b: dict[int, int] = {}
    c: dict[int, int] = {}
    n: dict[int, int] = {}
    run_a = [a_init, a_init]
    run_n = [1, 1]
    run_nn = [0, 0]
    run_index = 0
    out = _Bits()

    def quantise(d: int) -> int:
        if d <= -t3:
            return -4
        if d <= -t2:
            return -3
        if d <= -t1:
            return -2
        if d < 0:
            return -1
        if d == 0:
            return 0
        if d < t1:
            return 1
        if d < t2:
            return 2
        if d < t3:
            return 3
        return 4

    def reduce(err: int) -> int:
        if err < 0:
            err += value_range
        if err >= (value_range + 1) // 2:
            err -= value_range
        return err

    def golomb(value: int, k: int, lim: int) -> None:
        high = value >> k
        if high < lim - qbpp - 1:
            out.zeros(high)
            out.put(1, 1)
            out.put(value & ((1 << k) - 1), k)
        else:
            out.zeros(lim - qbpp - 1)
            out.put(1, 1)
            out.put((value - 1) & ((1 << qbpp) - 1), qbpp)

    img = frame.astype(np.int64).tolist()
    # prev holds the line above with one sample of padding on each side.
    prev = [0] * (width + 2)
    for y in range(height):
        prev[width + 1] = prev[width]
        cur = [0] * (width + 2)
        cur[0] = prev[1]
        for x in range(width):
            cur[x + 1] = img[y][x]
        x = 0
        while x < width:
            ra, rb, rc, rd = cur[x], prev[x + 1], prev[x], prev[x + 2]
            ix = cur[x + 1]
            q1, q2, q3 = quantise(rd - rb), quantise(rb - rc), quantise(rc - ra)
            if q1 == 0 and q2 == 0 and q3 == 0:
                # ---- run mode
                run_value = ra
                run_count = 0
                while x + run_count < width and cur[x + run_count + 1] == run_value:
                    run_count += 1
                end_of_line = x + run_count == width
                remaining = run_count
                while remaining >= (1 << _J[run_index]):
                    out.put(1, 1)
                    remaining -= 1 << _J[run_index]
                    if run_index < 31:
                        run_index += 1
                if end_of_line:
                    if remaining > 0:
                        out.put(1, 1)
                    x += run_count
                    continue
                out.put(0, 1)
                out.put(remaining, _J[run_index])
                x += run_count
                # ---- run interruption sample
                ix = cur[x + 1]
                ra, rb = run_value, prev[x + 1]
                ri_type = 1 if ra == rb else 0
                predicted = ra if ri_type else rb
                err = ix - predicted
                if ri_type == 0 and ra > rb:
                    err = -err
                err = reduce(err)
                q = ri_type
                temp = run_a[q] + (run_n[q] >> 1) if ri_type else run_a[q]
                k = 0
                while (run_n[q] << k) < temp:
                    k += 1
                if k == 0 and err > 0 and 2 * run_nn[q] < run_n[q]:
                    mapping = 1
                elif err < 0 and 2 * run_nn[q] >= run_n[q]:
                    mapping = 1
                elif err < 0 and k != 0:
                    mapping = 1
                else:
                    mapping = 0
                em_err = 2 * abs(err) - ri_type - mapping
                golomb(em_err, k, limit - _J[run_index] - 1)
                if err < 0:
                    run_nn[q] += 1
                run_a[q] += (em_err + 1 - ri_type) >> 1
                if run_n[q] == reset:
                    run_a[q] >>= 1
                    run_n[q] >>= 1
                    run_nn[q] >>= 1
                run_n[q] += 1
                if run_index > 0:
                    run_index -= 1
                x += 1
                continue
            # ---- regular mode
            sign = 1
            if q1 < 0 or (q1 == 0 and q2 < 0) or (q1 == 0 and q2 == 0 and q3 < 0):
                sign = -1
                q1, q2, q3 = -q1, -q2, -q3
            q = (q1 * 9 + q2) * 9 + q3
            if q not in a:
                a[q], b[q], c[q], n[q] = a_init, 0, 0, 1
            if rc >= max(ra, rb):
                px = min(ra, rb)
            elif rc <= min(ra, rb):
                px = max(ra, rb)
            else:
                px = ra + rb - rc
            px = px + c[q] if sign > 0 else px - c[q]
            px = min(max(px, 0), maxval)
            err = ix - px
            if sign < 0:
                err = -err
            err = reduce(err)
            k = 0
            while (n[q] << k) < a[q]:
                k += 1
            if k == 0 and 2 * b[q] <= -n[q]:
                mapped = 2 * err + 1 if err >= 0 else -2 * (err + 1)
            else:
                mapped = 2 * err if err >= 0 else -2 * err - 1
            golomb(mapped, k, limit)
            b[q] += err
            a[q] += abs(err)
            if n[q] == reset:
                a[q] >>= 1
                b[q] >>= 1
                n[q] >>= 1
            n[q] += 1
            if b[q] <= -n[q]:
                b[q] += n[q]
                if c[q] > -128:
                    c[q] -= 1
                if b[q] <= -n[q]:
                    b[q] = -n[q] + 1
            elif b[q] > 0:
                b[q] -= n[q]
                if c[q] < 127:
                    c[q] += 1
                if b[q] > 0:
                    b[q] = 0
            x += 1
        prev = cur
    scan = _pack_jpeg_ls(out.bits)
    sof = bytes([precision]) + height.to_bytes(2, "big") + width.to_bytes(2, "big") + bytes([1, 1, 0x11, 0])
    sos = bytes([1, 1, 0, 0, 0, 0])  # Ns, Cs, Tm, NEAR, ILV, point transform
    return b"\xff\xd8" + _segment(0xF7, sof) + _segment(0xDA, sos) + scan + b"\xff\xd9"


def _pack_jpeg_ls(bits: list[int]) -> bytes:
    """T.87 A.1: after a 0xFF byte the next byte carries only 7 bits (a 0 bit is stuffed)."""
    out = bytearray()
    position = 0
    total = len(bits)
    while position < total:
        width = 7 if out and out[-1] == 0xFF else 8
        chunk = bits[position : position + width]
        chunk = chunk + [0] * (width - len(chunk))
        out.append(int("".join(map(str, chunk)), 2))
        position += width
    if out and out[-1] == 0xFF:
        out.append(0x00)
    return bytes(out)


# ----------------------------------------------------------------------------- ready-made images


def gradient_image(height: int = 24, width: int = 20, *, maximum: int = 255, dtype: Any = np.uint8) -> np.ndarray:
    """A smooth, textured test pattern with values from 0 to `maximum` (not square, on purpose)."""
    yy, xx = np.mgrid[0:height, 0:width]
    pattern = (xx / (width - 1)) * 0.7 + (yy / (height - 1)) * 0.3
    pattern = pattern + 0.05 * np.sin(xx * 1.3) * np.cos(yy * 0.7)
    pattern = (pattern - pattern.min()) / (pattern.max() - pattern.min())
    return np.round(pattern * maximum).astype(dtype)


def multi_frame(frames: Sequence[np.ndarray]) -> np.ndarray:
    return np.stack(list(frames), axis=0)
