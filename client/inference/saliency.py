"""Saliency maps at the site: Grad-CAM heat maps, overlay PNGs, and the pointing game that checks them.

Method: Grad-CAM (Selvaraju et al. 2017), computed by Captum's ``LayerGradCam`` on one trunk stage
and upsampled bilinearly to the input (``LayerAttribution.interpolate``), for the class the model
predicts (or a class the caller names). The gradient flows from the site's own logits (its
personal head), so the map explains the decision the site's model makes.

Why Captum and not ``grad-cam`` (pytorch-grad-cam): Captum is PyTorch's own attribution library
(maintained under the pytorch organisation, released in step with torch), it is already a fedtl
dependency, it takes any callable forward function (our logits come from the personal head on
pooled features, not from ``model(x)``) and it needs nothing else; ``grad-cam`` pulls in OpenCV
(``opencv-python``, a large native wheel a hospital image would have to carry) for its resizing
and colour maps, which matplotlib and torch already do here.

Which stage: ``auto`` takes the deepest stage whose output is at least :data:`MIN_MAP_SIDE` pixels
wide (Grad-CAM's usual 7 x 7 at 224 px is ResNet's last stage; at the demo's 64 px the last stage is
2 x 2, too coarse to point anywhere, so ``auto`` goes to the 8 x 8 stage). Any stage name can be
given instead.

Checking the maps: :func:`pointing_game` counts the share of findings whose saliency peak falls
inside the lesion (Zhang et al. 2018); :func:`random_peak_hit_rate` is what a peak drawn uniformly
over the image would score (the lesion's share of the image), the baseline a map must beat. The
synthetic hospitals record each lesion (``lesions.csv``, see ``common.data.synthetic_hospitals``);
:func:`lesion_mask` maps it into the model's input through the same geometry as preprocessing.

Everything here stays at the site: maps and overlays are computed and written locally, never sent.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from client.inference.site_model import SiteClassifier

logger = logging.getLogger(__name__)

MIN_MAP_SIDE = 7


def stage_output_sides(classifier: SiteClassifier, image_size: int, in_channels: int) -> dict[str, int]:
    """Spatial side of each trunk stage's output for a ``image_size`` input."""
    sides: dict[str, int] = {}
    device = next(classifier.parameters()).device
    with torch.no_grad():
        h = torch.zeros(1, in_channels, image_size, image_size, device=device)
        for name, stage in classifier.model.stages.items():
            h = stage(h)
            sides[name] = int(h.shape[-1]) if h.dim() == 4 else 0
    return sides


def choose_saliency_stage(classifier: SiteClassifier, image_size: int, in_channels: int, requested: str = "auto") -> str:
    """The stage Grad-CAM is computed on (see the module docstring)."""
    sides = stage_output_sides(classifier, image_size, in_channels)
    if requested != "auto":
        if requested not in sides:
            raise ValueError(f"saliency stage {requested!r} is not a stage of this model; choose one of "
                             f"{', '.join(sides)} or 'auto'")
        return requested
    spatial = [name for name, side in sides.items() if side >= MIN_MAP_SIDE]
    if not spatial:
        spatial = [name for name, side in sides.items() if side > 0][:1] or list(sides)[:1]
    return spatial[-1]


class GradCam:
    """Grad-CAM maps of a site's classifier on one stage, upsampled to the input size.

    Args:
        classifier: the site's model.
        stage: a stage name of ``classifier.model.stages`` (see :func:`choose_saliency_stage`).
    """

    def __init__(self, classifier: SiteClassifier, stage: str) -> None:
        from captum.attr import LayerGradCam  # imported here: only saliency runs need it

        self.classifier = classifier
        self.stage = stage
        self._cam = LayerGradCam(classifier.logits, classifier.model.stages[stage])

    def maps(self, images: Tensor, target: Tensor, clinical: Tensor | None = None) -> Tensor:
        """``(N, S, S)`` non-negative maps for class ``target[i]`` of image ``i``, each scaled to max 1 (0 if flat)."""
        from captum.attr import LayerAttribution

        extra = (clinical,) if clinical is not None else None
        with torch.enable_grad():
            attribution = self._cam.attribute(images, target=target.tolist(), additional_forward_args=extra,
                                              relu_attributions=True)
        upsampled = LayerAttribution.interpolate(attribution.detach(), tuple(images.shape[-2:]),
                                                 interpolate_mode="bilinear")[:, 0]
        peak = upsampled.flatten(1).amax(dim=1).clamp(min=1e-12).view(-1, 1, 1)
        return (upsampled / peak).float().cpu()


# ------------------------------------------------------------------------------------------- overlays


def write_overlay(path: Path, image: np.ndarray, heat: np.ndarray, title: str) -> Path:
    """A PNG of the model's input image (gray) with the heat map over it (jet, half transparent)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axis = plt.subplots(figsize=(3.2, 3.4), dpi=100)
    axis.imshow(image, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    axis.imshow(heat, cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0, interpolation="bilinear")
    axis.set_title(title, fontsize=8)
    axis.axis("off")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


def display_image(fitted: np.ndarray) -> np.ndarray:
    """The geometry step's (S, S, C) output as a 2-D gray image in [0, 1] (colour: the mean of the channels)."""
    return fitted.mean(axis=-1) if fitted.ndim == 3 else fitted


# ------------------------------------------------------------------------------------------- pointing game


@dataclass(frozen=True)
class Lesion:
    """A lesion as an ellipse in pixels of the original (stored) image."""

    center_row: float
    center_col: float
    radius_rows: float
    radius_cols: float


def read_lesions(path: str | Path) -> dict[str, Lesion]:
    """``lesions.csv`` of a synthetic hospital: manifest path -> lesion (only images with a finding)."""
    with Path(path).open(newline="", encoding="utf-8") as handle:
        return {row["path"]: Lesion(float(row["center_row"]), float(row["center_col"]), float(row["radius_rows"]),
                                    float(row["radius_cols"])) for row in csv.DictReader(handle)}


def lesion_mask(lesion: Lesion, original_shape: tuple[int, int], image_size: int) -> np.ndarray:
    """``(S, S)`` boolean mask of the lesion in the model's input, through preprocessing's geometry.

    Preprocessing resizes the longer side to ``S`` (bilinear, pixel centres aligned) and pads the shorter
    one symmetrically (``common.data.image_preprocessing.fit_to_square``); the mask follows the same map.
    """
    height, width = original_shape
    scale = image_size / max(height, width)
    new_h = max(1, min(image_size, round(height * scale)))
    new_w = max(1, min(image_size, round(width * scale)))
    top, left = (image_size - new_h) // 2, (image_size - new_w) // 2
    rows = (np.arange(image_size) - top + 0.5) * height / new_h - 0.5
    cols = (np.arange(image_size) - left + 0.5) * width / new_w - 0.5
    inside_rows = (np.arange(image_size) >= top) & (np.arange(image_size) < top + new_h)
    inside_cols = (np.arange(image_size) >= left) & (np.arange(image_size) < left + new_w)
    dy = (rows[:, None] - lesion.center_row) / lesion.radius_rows
    dx = (cols[None, :] - lesion.center_col) / lesion.radius_cols
    return (dy**2 + dx**2 <= 1.0) & inside_rows[:, None] & inside_cols[None, :]


def saliency_peak(heat: np.ndarray | Tensor) -> tuple[int, int]:
    """(row, col) of the map's maximum (the first one in row-major order on ties)."""
    values = np.asarray(heat)
    return tuple(int(v) for v in np.unravel_index(int(np.argmax(values)), values.shape))  # type: ignore[return-value]


def pointing_game(maps: list[np.ndarray], masks: list[np.ndarray]) -> float:
    """Share of findings whose saliency peak lies inside the lesion mask (NaN without findings)."""
    if len(maps) != len(masks):
        raise ValueError(f"{len(maps)} maps for {len(masks)} lesion masks")
    if not maps:
        return float("nan")
    return float(np.mean([bool(mask[saliency_peak(heat)]) for heat, mask in zip(maps, masks)]))


def random_peak_hit_rate(masks: list[np.ndarray]) -> float:
    """Expected pointing-game score of a peak drawn uniformly over the input: the mean lesion share of the image."""
    if not masks:
        return float("nan")
    return float(np.mean([mask.mean() for mask in masks]))
