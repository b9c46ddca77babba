"""Where backbone weights come from, and how a set of tensors is identified.

Two sources, neither of which ever downloads anything:

* a torchvision weights name (``"ResNet18_Weights.IMAGENET1K_V1"``, ``"IMAGENET1K_V1"`` or
  ``"DEFAULT"``), read from the local torch hub cache
  (``torch.hub.get_dir()/checkpoints/<file name of the weights URL>``);
* a fedtl backbone checkpoint file written by :func:`save_backbone_checkpoint`, which records
  the architecture, input geometry, label count, input normalisation, the state dict and its
  fingerprint.

:func:`fingerprint` is a SHA-256 over a canonical serialisation of named tensors: the same
tensors give the same hex string on every machine, one changed value gives another.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import torch
from torch import Tensor
from torchvision.models import get_model_weights
from torchvision.models._api import WeightsEnum

from common.atomic_io import atomic_torch_save
from common.config import ModelConfig

if TYPE_CHECKING:
    from common.models.fed_model import FedModel

logger = logging.getLogger(__name__)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

CHECKPOINT_FORMAT = "fedtl-backbone"
CHECKPOINT_VERSION = 1

Normalization = tuple[tuple[float, ...], tuple[float, ...]]


class WeightsError(ValueError):
    """Weights or a checkpoint exist but do not fit: unknown name, other architecture, wrong tensors, corrupt file."""


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained weights are not on this machine; the message names the file, the directory and the URL."""


# ---------------------------------------------------------------------------------------------
# Fingerprints
# ---------------------------------------------------------------------------------------------


def _little_endian_bytes(tensor: Tensor) -> bytes:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    raw = flat.view(torch.uint8) if flat.dtype != torch.uint8 else flat
    if sys.byteorder == "big" and flat.element_size() > 1:
        raw = raw.reshape(-1, flat.element_size()).flip(1).reshape(-1)
    return raw.numpy().tobytes()


def fingerprint(tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 hex digest identifying a set of named tensors.

    Args:
        tensors: name -> tensor. Names are visited in sorted order; for each, the name, dtype,
            shape and the contiguous little-endian bytes of the values are hashed, so the
            digest does not depend on insertion order, device, strides or machine byte order.
    """
    digest = hashlib.sha256()
    digest.update(b"fedtl-fingerprint-v1\n")
    for name in sorted(tensors):
        tensor = tensors[name]
        if not isinstance(tensor, Tensor):
            raise TypeError(f"fingerprint: {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        payload = _little_endian_bytes(tensor)
        header = f"{len(name)}:{name}|{tensor.dtype}|{tuple(tensor.shape)}|{len(payload)}\n"
        digest.update(header.encode("utf-8"))
        digest.update(payload)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Input normalisation
# ---------------------------------------------------------------------------------------------


def imagenet_normalization(in_channels: int) -> Normalization:
    """ImageNet mean/std for ``in_channels`` inputs; for 1 channel the RGB values are averaged.

    Averaging matches the grayscale fold of the first convolution (filters summed over RGB): a
    gray image normalised with the averaged statistics and fed to the folded filters gives
    the same response as the image replicated to RGB and normalised with the averaged values.
    """
    if in_channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    if in_channels == 1:
        return (sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)
    raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")


def backbone_normalization(config: ModelConfig) -> Normalization:
    """(mean, std) per input channel that images must be normalised with for this backbone.

    Args:
        config: the model section; when it names a fedtl checkpoint, the statistics recorded in
            that checkpoint are used, otherwise ImageNet statistics (folded to gray for 1 channel).
    """
    if config.checkpoint is not None:
        checkpoint = load_backbone_checkpoint(config.checkpoint)
        if len(checkpoint.mean) != config.in_channels:
            raise WeightsError(
                f"{config.checkpoint}: records normalisation for {len(checkpoint.mean)} channel(s) but "
                f"[model] in_channels = {config.in_channels}; set in_channels = {len(checkpoint.mean)}"
            )
        return checkpoint.normalization
    return imagenet_normalization(config.in_channels)


# ---------------------------------------------------------------------------------------------
# torchvision weights from the local hub cache
# ---------------------------------------------------------------------------------------------


def resolve_torchvision_weights(architecture: str, name: str) -> WeightsEnum:
    """The torchvision weights enum member that ``name`` denotes for ``architecture``.

    Args:
        architecture: torchvision builder name, e.g. ``"resnet18"``.
        name: ``"<Enum>.<MEMBER>"`` (``"ResNet18_Weights.IMAGENET1K_V1"``), a bare member
            (``"IMAGENET1K_V1"``) or ``"DEFAULT"``.
    """
    enum_class = get_model_weights(architecture)
    available = ", ".join(f"{enum_class.__name__}.{member.name}" for member in enum_class)
    enum_name, _, member_name = name.rpartition(".")
    if enum_name and enum_name != enum_class.__name__:
        raise WeightsError(
            f"[model] weights = {name!r} are for another architecture than {architecture!r}; "
            f"use one of: {available} (or 'DEFAULT')"
        )
    try:
        return enum_class[member_name]
    except KeyError:
        raise WeightsError(
            f"[model] weights = {name!r} is not a torchvision weights name for {architecture!r}; "
            f"use one of: {available} (or 'DEFAULT')"
        ) from None


def torchvision_weights_file(weights: WeightsEnum) -> Path:
    """Where torch.hub keeps the file for ``weights``: ``<hub dir>/checkpoints/<basename of the URL>``."""
    file_name = os.path.basename(urlparse(weights.url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / file_name


def _warn_if_hash_differs(path: Path) -> None:
    """torchvision file names carry the first hex digits of the file's SHA-256; say if they disagree."""
    match = re.search(r"-([a-f0-9]{6,})\.", path.name)
    if not match:
        return
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    if not sha.hexdigest().startswith(match.group(1)):
        logger.warning(
            "%s: content hash does not start with %s as its name promises; this is not the published "
            "file (fine for a locally made file, otherwise fetch it again)",
            path,
            match.group(1),
        )


def load_torchvision_state_dict(architecture: str, name: str) -> dict[str, Tensor]:
    """State dict of torchvision weights ``name`` for ``architecture``, from the local hub cache only.

    Raises:
        WeightsNotFoundError: the file is not in the cache; the message says which file to put
            into which directory and the URL to fetch it from on a machine with internet.
        WeightsError: unknown name, or the file cannot be read as a state dict.
    """
    weights = resolve_torchvision_weights(architecture, name)
    path = torchvision_weights_file(weights)
    full_name = f"{type(weights).__name__}.{weights.name}"
    if not path.is_file():
        raise WeightsNotFoundError(
            f"pretrained weights {full_name} for {architecture} are not on this machine and fedtl never "
            f"downloads. Put the file '{path.name}' into the directory '{path.parent}' (the torch hub "
            f"cache; set TORCH_HOME to use another place). Fetch it on a machine with internet from "
            f"{weights.url} and copy it over unchanged, or set [model] checkpoint to a fedtl backbone "
            f"checkpoint instead."
        )
    _warn_if_hash_differs(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
        raise WeightsError(
            f"{path}: cannot be read as torchvision weights ({exc}); delete it and copy it again from {weights.url}"
        ) from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsError(f"{path}: does not hold a state dict of tensors; copy it again from {weights.url}")
    logger.info("loaded %s for %s from %s", full_name, architecture, path)
    return dict(state)


# ---------------------------------------------------------------------------------------------
# fedtl backbone checkpoints
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackboneCheckpoint:
    """Contents of a fedtl backbone checkpoint file.

    Attributes:
        architecture: torchvision builder name.
        image_size: square input side the model was built for.
        in_channels: 1 (gray) or 3 (RGB).
        num_classes: classifier outputs.
        num_clinical: number of clinical features fused before the classifier (0 = none).
        mean, std: input normalisation per channel.
        state_dict: the FedModel's state dict (names as in ``FedModel.state_dict()``).
        fingerprint: :func:`fingerprint` of ``state_dict``.
    """

    architecture: str
    image_size: int
    in_channels: int
    num_classes: int
    num_clinical: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    state_dict: dict[str, Tensor]
    fingerprint: str

    @property
    def normalization(self) -> Normalization:
        return self.mean, self.std


def _checked_normalization(normalization: Normalization, in_channels: int) -> Normalization:
    mean, std = (tuple(float(v) for v in part) for part in normalization)
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(
            f"normalization must give one mean and one std per input channel ({in_channels}); "
            f"got {len(mean)} mean(s) and {len(std)} std(s)"
        )
    if any(s <= 0 for s in std):
        raise ValueError(f"normalization std values must be positive, got {std}")
    return mean, std


def save_backbone_checkpoint(path: str | Path, model: FedModel, normalization: Normalization) -> str:
    """Write ``model`` as a fedtl backbone checkpoint (atomically) and return its fingerprint.

    Args:
        path: destination file (``.pt``); parent directories are created.
        model: the FedModel whose full state dict is stored.
        normalization: (mean, std) per input channel that images were normalised with.
    """
    mean, std = _checked_normalization(normalization, model.in_channels)
    state = {name: tensor.detach().to("cpu").clone() for name, tensor in model.state_dict().items()}
    digest = fingerprint(state)
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "architecture": model.architecture,
        "image_size": model.image_size,
        "in_channels": model.in_channels,
        "num_classes": model.num_classes,
        "num_clinical": model.num_clinical,
        "mean": list(mean),
        "std": list(std),
        "state_dict": state,
        "fingerprint": digest,
    }
    atomic_torch_save(path, payload)
    logger.info("saved %s backbone checkpoint %s (fingerprint %s)", model.architecture, path, digest[:12])
    return digest


def load_backbone_checkpoint(path: str | Path) -> BackboneCheckpoint:
    """Read and verify a fedtl backbone checkpoint (format, fields, fingerprint).

    Raises:
        FileNotFoundError: no such file.
        WeightsError: not a fedtl checkpoint, a field is missing, or the tensors do not match the
            recorded fingerprint (the file was altered or damaged).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such backbone checkpoint; check [model] checkpoint")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise WeightsError(f"{path}: cannot be read as a fedtl backbone checkpoint ({exc})") from exc
    if not isinstance(payload, Mapping) or payload.get("format") != CHECKPOINT_FORMAT:
        raise WeightsError(
            f"{path}: not a fedtl backbone checkpoint (for torchvision weights use [model] weights instead)"
        )
    if payload.get("version") != CHECKPOINT_VERSION:
        raise WeightsError(
            f"{path}: checkpoint version {payload.get('version')!r}; this fedtl reads version {CHECKPOINT_VERSION}"
        )
    required = ("architecture", "image_size", "in_channels", "num_classes", "num_clinical", "mean", "std",
                "state_dict", "fingerprint")
    missing = [key for key in required if key not in payload]
    if missing:
        raise WeightsError(f"{path}: checkpoint lacks {', '.join(missing)}; re-export it with save_backbone_checkpoint")
    state = dict(payload["state_dict"])
    actual = fingerprint(state)
    if actual != payload["fingerprint"]:
        raise WeightsError(
            f"{path}: tensors do not match the recorded fingerprint ({actual[:12]} != "
            f"{str(payload['fingerprint'])[:12]}); the file was altered or damaged, copy it again"
        )
    return BackboneCheckpoint(
        architecture=str(payload["architecture"]),
        image_size=int(payload["image_size"]),
        in_channels=int(payload["in_channels"]),
        num_classes=int(payload["num_classes"]),
        num_clinical=int(payload["num_clinical"]),
        mean=tuple(float(v) for v in payload["mean"]),
        std=tuple(float(v) for v in payload["std"]),
        state_dict=state,
        fingerprint=actual,
    )


def check_checkpoint_fits(checkpoint: BackboneCheckpoint, config: ModelConfig, source: str | Path) -> None:
    """Raise :class:`WeightsError` naming every field where ``checkpoint`` and ``config`` disagree.

    Args:
        checkpoint: what the file holds.
        config: the model section it is to be loaded into.
        source: file name used in the message.
    """
    wanted = {
        "architecture": config.architecture,
        "image_size": config.image_size,
        "in_channels": config.in_channels,
        "num_classes": config.num_classes,
        "num_clinical": len(config.clinical_features),
    }
    problems = [
        f"{field} is {getattr(checkpoint, field)!r} in the checkpoint but {value!r} in [model]"
        for field, value in wanted.items()
        if getattr(checkpoint, field) != value
    ]
    if problems:
        raise WeightsError(
            f"{source}: checkpoint does not fit this configuration: " + "; ".join(problems)
            + ". Change [model] to match the checkpoint (num_clinical = number of clinical_features), "
            "or export a checkpoint for this configuration."
        )
