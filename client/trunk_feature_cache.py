"""Frozen-trunk outputs, computed once per image and reused across epochs and rounds.

When every stage below the first trainable one is frozen and nothing random happens to an
image before it, the trunk's output for that image never changes. We compute it once, keep it
in memory and on the site's disk, and train only the tail on it. The key covers the backbone
fingerprint, the preprocessing, the cut point and the image content, so a new backbone or a
new preprocessing invalidates it. Privacy accounting is untouched: the same images are sampled
with the same probability for the same number of steps.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from torch import nn

from common.atomic_io import atomic_torch_save

logger = logging.getLogger(__name__)


def feature_cache_key(fingerprint: str, preprocessing_key: str, boundary: int, images: torch.Tensor) -> str:
    digest = hashlib.sha256()
    digest.update(f"{fingerprint}|{preprocessing_key}|{boundary}|{tuple(images.shape)}".encode())
    digest.update(images.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


@torch.no_grad()
def compute_trunk_features(
    stages_forward: nn.Module | object,
    images: torch.Tensor,
    boundary: int,
    device: torch.device,
    batch_size: int = 128,
) -> torch.Tensor:
    """Run ``model.forward_stages(x, 0, boundary)`` over all images in eval mode."""
    model = stages_forward
    was_training = model.training  # type: ignore[union-attr]
    model.eval()  # type: ignore[union-attr]
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(device)
        outputs.append(model.forward_stages(batch, 0, boundary).float().cpu())  # type: ignore[union-attr]
    model.train(was_training)  # type: ignore[union-attr]
    if not outputs:
        return torch.empty(0)
    return torch.cat(outputs)


def cached_trunk_features(
    model: nn.Module,
    images: torch.Tensor,
    *,
    boundary: int,
    fingerprint: str,
    preprocessing_key: str,
    cache_dir: Path | None,
    device: torch.device,
) -> torch.Tensor:
    """Trunk outputs for ``images``, from the disk cache when the key matches."""
    if boundary == 0:
        return images
    key = feature_cache_key(fingerprint, preprocessing_key, boundary, images)
    path = cache_dir / f"{key}.pt" if cache_dir is not None else None
    if path is not None and path.exists():
        try:
            features = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(features, torch.Tensor) and len(features) == len(images):
                logger.debug("trunk features from cache %s", path.name)
                return features
        except Exception:  # noqa: BLE001 - a damaged cache entry is recomputed, never fatal
            logger.warning("trunk-feature cache entry %s is damaged; recomputing it", path.name)
    features = compute_trunk_features(model, images, boundary, device)
    if path is not None:
        atomic_torch_save(path, features)
    return features
