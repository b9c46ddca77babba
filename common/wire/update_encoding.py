"""Compact encodings of a site's shared-layer update, for the trip back to the coordinator.

Three encodings (``TrainingConfig.update_encoding``):

* ``"fp32"``: the trained weights themselves, float32. Lossless, and a coordinator that knows
  nothing about encodings can aggregate it as plain weights.
* ``"fp16"``: the DIFFERENCE ``new - reference`` from the global weights the site received, as
  float16 (half the bytes; relative error at most 2^-11 of each delta entry).
* ``"int8"``: that difference quantised symmetrically per tensor: ``scale = max|delta| / 127``,
  ``q = round(delta / scale)`` in int8 (a quarter of the bytes; absolute error at most
  ``scale / 2``). The scales travel as 0-d float32 tensors (wire record ``SHARED_SCALE``).

Deltas are encoded rather than weights because one round moves weights very little: a delta's
range is orders of magnitude smaller than the weights', so the same 8 or 16 bits resolve it far
more finely. fp32 sends the weights because float32 ``(new - ref) + ref`` is not always ``new``.

The encoding is recoverable from the tensors alone (float32 = weights, float16 = delta,
int8 = delta with a scale), so ``EncodedUpdate`` carries tensors and scales and nothing else.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal, Mapping

import torch

logger = logging.getLogger(__name__)

Encoding = Literal["fp32", "fp16", "int8"]
ENCODINGS: tuple[Encoding, ...] = ("fp32", "fp16", "int8")

INT8_LEVELS: int = 127
"""Largest quantised magnitude; -128 is never used so the code is symmetric."""

_FP16_MAX: float = float(torch.finfo(torch.float16).max)


class UpdateEncodingError(ValueError):
    """An update cannot be encoded or decoded; the message names the tensor and the fix."""


@dataclass
class EncodedUpdate:
    """One site's encoded shared-layer update.

    Attributes:
        tensors: tensor name -> float32 weights (fp32), float16 delta (fp16) or int8 codes (int8).
        scales: tensor name -> 0-d float32 tensor, the int8 step size; empty for fp32 and fp16.
    """

    tensors: dict[str, torch.Tensor]
    scales: dict[str, torch.Tensor] = field(default_factory=dict)


def _check_same_names(
    new: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], what: str
) -> None:
    missing = sorted(set(reference) - set(new))
    extra = sorted(set(new) - set(reference))
    if missing or extra:
        raise UpdateEncodingError(
            f"{what}: tensor names differ from the reference (global) weights: "
            f"missing {missing[:5]}, unexpected {extra[:5]}; the update must cover exactly the "
            "shared layers the site received"
        )


def _check_finite(name: str, tensor: torch.Tensor, role: str) -> None:
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise UpdateEncodingError(
            f"encode_update: {role} tensor '{name}' has {bad} NaN/inf value(s); training diverged "
            "or the weights are corrupt. Do not send this update: lower the learning rate or "
            "restart from the global weights"
        )


def _check_pair(name: str, new: torch.Tensor, reference: torch.Tensor) -> None:
    if new.shape != reference.shape:
        raise UpdateEncodingError(
            f"encode_update: tensor '{name}' has shape {tuple(new.shape)} but the reference has "
            f"{tuple(reference.shape)}; the model and the global weights come from different architectures"
        )
    if new.dtype != reference.dtype or not new.is_floating_point():
        raise UpdateEncodingError(
            f"encode_update: tensor '{name}' is {new.dtype} but the reference is {reference.dtype}; "
            "both must be the same floating-point dtype (cast the model back to float32 after "
            "mixed-precision training, and keep integer buffers out of the shared layers)"
        )


def _quantise_int8(name: str, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-tensor int8 codes and the float32 scale of one delta."""
    delta64 = delta.to(torch.float64)
    peak = float(delta64.abs().max()) if delta64.numel() else 0.0
    scale = torch.tensor(peak / INT8_LEVELS, dtype=torch.float32)
    if peak == 0.0 or float(scale) == 0.0:
        return torch.zeros_like(delta, dtype=torch.int8), torch.tensor(0.0, dtype=torch.float32)
    codes = torch.round(delta64 / float(scale)).clamp_(-INT8_LEVELS, INT8_LEVELS).to(torch.int8)
    logger.debug("int8 %s: scale %.3g", name, float(scale))
    return codes, scale


def encode_update(
    new: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], encoding: Encoding
) -> EncodedUpdate:
    """Encode trained shared-layer weights relative to the global weights the site received.

    Args:
        new: tensor name -> the site's trained weights (the shared layers only).
        reference: tensor name -> the global weights this round started from (same names,
            shapes and dtypes).
        encoding: ``"fp32"`` (weights, lossless), ``"fp16"`` (delta) or ``"int8"`` (delta + scale).

    Raises:
        UpdateEncodingError: unknown encoding, names/shapes/dtypes that differ from the reference,
            NaN/inf values, or an fp16 delta too large for float16.
    """
    if encoding not in ENCODINGS:
        raise UpdateEncodingError(f"encode_update: encoding {encoding!r} is not one of {ENCODINGS}")
    _check_same_names(new, reference, "encode_update")
    tensors: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    for name, ref in reference.items():
        value = new[name]
        _check_pair(name, value, ref)
        _check_finite(name, value, "trained")
        _check_finite(name, ref, "reference")
        value32 = value.detach().to("cpu", torch.float32)
        if encoding == "fp32":
            tensors[name] = value32.clone()
            continue
        delta = value32 - ref.detach().to("cpu", torch.float32)
        if encoding == "fp16":
            peak = float(delta.abs().max()) if delta.numel() else 0.0
            if peak > _FP16_MAX:
                raise UpdateEncodingError(
                    f"encode_update: tensor '{name}' changed by {peak:.3g}, beyond float16's range "
                    f"({_FP16_MAX:.0f}); use update_encoding 'int8' or 'fp32'"
                )
            tensors[name] = delta.to(torch.float16)
        else:
            tensors[name], scales[name] = _quantise_int8(name, delta)
    return EncodedUpdate(tensors=tensors, scales=scales)


def decode_update(encoded: EncodedUpdate, reference: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rebuild float32 weights from an encoded update and the reference it was encoded against.

    Args:
        encoded: what ``encode_update`` produced (possibly after a trip over the wire).
        reference: the same global weights the site encoded against.

    Raises:
        UpdateEncodingError: names/shapes that differ from the reference, an int8 tensor without
            a scale (or a scale without an int8 tensor), or a dtype that no encoding produces.
    """
    _check_same_names(encoded.tensors, reference, "decode_update")
    stray = sorted(
        name
        for name in encoded.scales
        if name not in encoded.tensors or encoded.tensors[name].dtype != torch.int8
    )
    if stray:
        raise UpdateEncodingError(
            f"decode_update: scales given for {stray[:5]}, which are not int8 tensors of this update; "
            "the SHARED and SHARED_SCALE records do not belong together"
        )
    decoded: dict[str, torch.Tensor] = {}
    for name, ref in reference.items():
        value = encoded.tensors[name]
        if value.shape != ref.shape:
            raise UpdateEncodingError(
                f"decode_update: tensor '{name}' has shape {tuple(value.shape)} but the reference has "
                f"{tuple(ref.shape)}; the update was encoded against different global weights"
            )
        ref32 = ref.detach().to("cpu", torch.float32)
        if value.dtype == torch.float32:
            decoded[name] = value.detach().to("cpu").clone()
        elif value.dtype == torch.float16:
            decoded[name] = ref32 + value.detach().to("cpu", torch.float32)
        elif value.dtype == torch.int8:
            if name not in encoded.scales:
                raise UpdateEncodingError(
                    f"decode_update: int8 tensor '{name}' arrived without a scale; the reply is "
                    "missing its SHARED_SCALE entry and must be dropped"
                )
            scale = float(encoded.scales[name])
            if not (scale >= 0.0 and scale < float("inf")):
                raise UpdateEncodingError(
                    f"decode_update: int8 tensor '{name}' has scale {scale}; a scale must be a "
                    "finite number >= 0, so this reply is corrupt and must be dropped"
                )
            decoded[name] = ref32 + value.detach().to("cpu", torch.float32) * scale
        else:
            raise UpdateEncodingError(
                f"decode_update: tensor '{name}' is {value.dtype}; encoded updates hold float32, "
                "float16 or int8 tensors only"
            )
    return decoded


def encoded_nbytes(encoded: EncodedUpdate) -> int:
    """Payload bytes of an encoded update (tensor data plus scales, no framing)."""
    tensors = list(encoded.tensors.values()) + list(encoded.scales.values())
    return sum(t.numel() * t.element_size() for t in tensors)
