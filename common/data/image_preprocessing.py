"""Turn a decoded image (float32 in [0, 1]) into the model's input tensor.

Two steps, kept apart so that the decoded-image cache can store the result of the first:

1. geometry (:meth:`Preprocessing.fit`): keep the aspect ratio: resize so that the LONGER
   side becomes ``image_size`` (antialiased bilinear), then pad the shorter side
   symmetrically with 0 (black) to a square; convert to ``in_channels`` (grayscale is
   repeated to RGB; RGB becomes grayscale with ITU-R BT.601 luma weights).
   Result: float32 (S, S, C) in [0, 1].
2. normalisation (:meth:`Preprocessing.normalise`): ``(x - mean) / std`` per channel,
   returned as a torch tensor (C, S, S).

Padding rather than cropping keeps every pixel of the original (a lesion at the edge of a
film is not cut away) and never stretches anatomy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Bump when the geometry step changes output for the same input (the cache keys on it).
GEOMETRY_VERSION = "1"


@dataclass(frozen=True)
class Preprocessing:
    """How images become model inputs.

    image_size: side S of the square input, in pixels.
    in_channels: 1 (grayscale) or 3 (RGB) channels expected by the backbone.
    mean, std: per-channel normalisation; one value (used for every channel) or one per channel.
    """

    image_size: int
    in_channels: int = 1
    mean: tuple[float, ...] = field(default=(0.5,))
    std: tuple[float, ...] = field(default=(0.25,))

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise ValueError(f"Preprocessing.image_size must be positive, not {self.image_size}")
        if self.in_channels not in (1, 3):
            raise ValueError(f"Preprocessing.in_channels must be 1 or 3, not {self.in_channels}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, self.in_channels):
                raise ValueError(
                    f"Preprocessing.{name} needs 1 or {self.in_channels} values (one per channel), "
                    f"got {len(values)}"
                )
        if any(s <= 0 for s in self.std):
            raise ValueError("Preprocessing.std values must be positive")

    @classmethod
    def imagenet(cls, image_size: int, in_channels: int) -> Preprocessing:
        """ImageNet statistics; for one channel, the mean of the three RGB statistics."""
        if in_channels == 3:
            return cls(image_size, 3, IMAGENET_MEAN, IMAGENET_STD)
        return cls(image_size, 1, (float(np.mean(IMAGENET_MEAN)),), (float(np.mean(IMAGENET_STD)),))

    def geometry_key(self) -> str:
        """Identifies the output of :meth:`fit` (what the decoded-image cache stores)."""
        return f"g{GEOMETRY_VERSION}-s{self.image_size}-c{self.in_channels}"

    def key(self) -> str:
        """A stable string naming the complete preprocessing (geometry and normalisation)."""
        mean = "_".join(f"{v:.6g}" for v in self.mean)
        std = "_".join(f"{v:.6g}" for v in self.std)
        return f"{self.geometry_key()}-m{mean}-sd{std}"

    def fit(self, image: np.ndarray) -> np.ndarray:
        """Geometry step: float32 (H, W) or (H, W, 3) in [0, 1] -> float32 (S, S, C) in [0, 1]."""
        return fit_to_square(to_channels(image, self.in_channels), self.image_size)

    def normalise(self, fitted: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(S, S, C) array in [0, 1] (or a batch (N, S, S, C)) -> normalised (C, S, S) / (N, C, S, S)."""
        tensor = torch.as_tensor(np.asarray(fitted, dtype=np.float32))
        tensor = tensor.movedim(-1, -3).contiguous()
        mean = torch.tensor(_per_channel(self.mean, self.in_channels)).view(-1, 1, 1)
        std = torch.tensor(_per_channel(self.std, self.in_channels)).view(-1, 1, 1)
        return (tensor - mean) / std

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """Decoded image -> model input, float32 tensor (C, S, S)."""
        return self.normalise(self.fit(image))


def to_channels(image: np.ndarray, in_channels: int) -> np.ndarray:
    """(H, W) or (H, W, 3) -> (H, W, in_channels)."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"expected an image shaped (H, W) or (H, W, 3), got {image.shape}")
    if image.shape[-1] == in_channels:
        return image
    if in_channels == 3:
        return np.repeat(image, 3, axis=-1)
    return (image @ LUMA_WEIGHTS)[..., None].astype(np.float32)


def fit_to_square(image: np.ndarray, size: int) -> np.ndarray:
    """Resize (H, W, C) so the longer side is `size`, then zero-pad to (size, size, C)."""
    height, width, channels = image.shape
    scale = size / max(height, width)
    new_h = max(1, min(size, round(height * scale)))
    new_w = max(1, min(size, round(width * scale)))
    out = np.zeros((size, size, channels), dtype=np.float32)
    top = (size - new_h) // 2
    left = (size - new_w) // 2
    for ch in range(channels):
        plane = image[..., ch]
        if (new_h, new_w) != (height, width):
            resized = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32)).resize(
                (new_w, new_h), Image.Resampling.BILINEAR
            )
            plane = np.asarray(resized, dtype=np.float32)
        out[top : top + new_h, left : left + new_w, ch] = plane
    return np.clip(out, 0.0, 1.0)


def _per_channel(values: Sequence[float], channels: int) -> list[float]:
    return list(values) * channels if len(values) == 1 else list(values)
