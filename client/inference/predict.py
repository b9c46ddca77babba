"""Predict on new studies at the site: one file, a folder, or a manifest -> one CSV row per image.

Inputs:

* one image file (DICOM, or PNG/JPEG/TIFF/BMP);
* a folder: every non-hidden file below it, in sorted order (DICOM files often have no extension;
  a file that is not an image gets a row saying so);
* a manifest: a ``.csv`` file with a ``path`` column (relative to the CSV's folder, or absolute) and,
  when the model fuses clinical values, those columns (an empty cell is a missing value and becomes
  0, as in training). Other columns (``label``, ``patient_id``) may be there and are ignored: nothing
  about a patient is written to the output.

Each image is read and preprocessed exactly as in training (``common.data.dicom_reader.read_image``,
then ``Preprocessing.fit`` and the decoded-image cache's 1/65535 quantisation via
``common.data.decoded_image_cache.quantise``, then the backbone's normalisation), batched
through the site's :class:`client.inference.site_model.SiteClassifier` on the CPU or GPU. A file that
cannot be read gets a row with its reason, and the batch goes on. With a saliency folder every
predicted image also gets a Grad-CAM overlay PNG (:mod:`client.inference.saliency`).

Nothing is sent anywhere: no network call is made, so prediction works with the network down.
"""

from __future__ import annotations

import csv
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from client.inference.saliency import GradCam, choose_saliency_stage, display_image, write_overlay
from client.inference.site_model import SiteModel
from common.data.decoded_image_cache import QUANT, quantise
from common.data.dicom_reader import UnreadableImageError, read_image

logger = logging.getLogger(__name__)

STATUS_OK = "ok"
STATUS_UNREADABLE = "unreadable"


class PredictInputError(ValueError):
    """The input to predict on can not be used; the message says why and what to give instead."""


@dataclass(frozen=True)
class PredictInput:
    """One image to predict on: its file, how it is shown in the output, its clinical values."""

    path: Path
    shown: str
    clinical: tuple[float, ...] = ()
    problem: str = ""  # set when the input row itself is unusable (e.g. a missing clinical value)


@dataclass
class Prediction:
    """The result for one image. ``probabilities`` follow the model's class order; empty when unreadable."""

    shown: str
    status: str
    predicted_class: str = ""
    probabilities: list[float] = field(default_factory=list)
    reason: str = ""
    saliency_png: str = ""
    original_shape: tuple[int, int] | None = None
    heat_map: np.ndarray | None = field(default=None, repr=False)  # (S, S), kept only when asked for


def discover_inputs(source: str | Path, clinical_features: Sequence[str] = ()) -> list[PredictInput]:
    """The images ``source`` names (a file, a folder or a ``.csv`` manifest; see the module docstring)."""
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file() and not any(
            part.startswith(".") for part in p.relative_to(source).parts))
        if not files:
            raise PredictInputError(f"{source}: the folder holds no files; give a DICOM file, a folder of images "
                                    "or a manifest CSV")
        if clinical_features:
            raise PredictInputError(
                f"{source}: this model fuses clinical values ({', '.join(clinical_features)}), which a folder "
                "does not have; give a manifest CSV with a 'path' column and those columns")
        return [PredictInput(p, str(p.relative_to(source))) for p in files]
    if source.is_file() and source.suffix.lower() == ".csv":
        return _manifest_inputs(source, clinical_features)
    if source.is_file():
        if clinical_features:
            raise PredictInputError(
                f"{source}: this model fuses clinical values ({', '.join(clinical_features)}); give a manifest CSV "
                "with a 'path' column and those columns")
        return [PredictInput(source, str(source))]
    raise PredictInputError(f"{source}: no such file or folder; give a DICOM file, a folder of images or a "
                            "manifest CSV with a 'path' column")


def _manifest_inputs(manifest: Path, clinical_features: Sequence[str]) -> list[PredictInput]:
    with manifest.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in ("path", *clinical_features) if c not in columns]
        if missing:
            raise PredictInputError(f"{manifest}: column(s) {', '.join(missing)} missing (header: "
                                    f"{', '.join(columns) or 'none'}); a manifest needs 'path'"
                                    + (f" and the model's clinical columns {', '.join(clinical_features)}"
                                       if clinical_features else ""))
        inputs = []
        for line, row in enumerate(reader, start=2):
            row = {key.strip(): (value or "").strip() for key, value in row.items() if key}
            written = row["path"]
            path = Path(written) if Path(written).is_absolute() else manifest.parent / written
            values, problem = [], ""
            for column in clinical_features:
                if not row[column]:  # missing: 0, as in training (common.data.site_dataset)
                    values.append(0.0)
                    continue
                try:
                    value = float(row[column])
                    if not math.isfinite(value):
                        raise ValueError
                    values.append(value)
                except ValueError:
                    problem = (f"line {line}: clinical value {column!r} is not a number; write a number, or leave "
                               "the cell empty for a missing value")
            inputs.append(PredictInput(path, written or f"(line {line}: empty path)", tuple(values), problem))
    if not inputs:
        raise PredictInputError(f"{manifest}: the manifest lists no images")
    return inputs


def load_pixels(site_model: SiteModel, item: PredictInput) -> tuple[np.ndarray, tuple[int, int]]:
    """The geometry step's output (S, S, C) exactly as training reads it, and the original image's (rows, cols).

    Raises UnreadableImageError (or a decoder's own exception) for a file that can not be read.
    """
    if item.problem:
        raise UnreadableImageError(item.path, item.problem)
    original = read_image(item.path, site_model.frame_policy)  # type: ignore[arg-type]
    fitted = quantise(site_model.preprocessing.fit(original)).astype(np.float32) / QUANT
    return fitted, (int(original.shape[0]), int(original.shape[1]))


def predict_images(
    site_model: SiteModel, inputs: Sequence[PredictInput], *, batch_size: int = 32, progress: bool = True,
    saliency_dir: Path | None = None, saliency_stage: str = "auto", saliency_targets: Sequence[int] | None = None,
    keep_maps: bool = False,
) -> Iterator[Prediction]:
    """Predictions for ``inputs`` in order, batch by batch (see the module docstring).

    Args:
        saliency_dir: write one overlay PNG per predicted image there.
        saliency_stage: trunk stage for Grad-CAM (``auto``: see :func:`client.inference.saliency.choose_saliency_stage`).
        saliency_targets: class index to explain per input (default: the predicted class).
        keep_maps: keep each image's ``(S, S)`` heat map on its :class:`Prediction` (computed even without a folder).
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, not {batch_size}")
    classifier, names = site_model.classifier, site_model.class_names
    cam = None
    if saliency_dir is not None or keep_maps:
        model_config = site_model.config.model
        stage = choose_saliency_stage(classifier, model_config.image_size, model_config.in_channels, saliency_stage)
        cam = GradCam(classifier, stage)
        logger.info("saliency: Grad-CAM on stage %s", stage)
    bar = tqdm(total=len(inputs), desc="predicting", unit="img", disable=not progress, leave=False)
    for start in range(0, len(inputs), batch_size):
        chunk = list(enumerate(inputs[start : start + batch_size], start=start))
        results: dict[int, Prediction] = {}
        fitted, shapes, readable = [], [], []
        for index, item in chunk:
            try:
                pixels, shape = load_pixels(site_model, item)
            except UnreadableImageError as error:
                results[index] = Prediction(item.shown, STATUS_UNREADABLE, reason=error.reason)
                continue
            except Exception as error:  # a decoder bug must not stop the batch
                results[index] = Prediction(item.shown, STATUS_UNREADABLE, reason=(
                    f"unexpected {type(error).__name__} while reading; remove the file or report the problem"))
                continue
            fitted.append(pixels)
            shapes.append(shape)
            readable.append((index, item))
        if readable:
            images = site_model.preprocessing.normalise(np.stack(fitted)).to(site_model.device)
            clinical = (torch.tensor([item.clinical for _, item in readable], dtype=torch.float32,
                                     device=site_model.device) if classifier.num_clinical else None)
            with torch.no_grad():
                probabilities = classifier(images, clinical).float().cpu()
            decisions = site_model.operating_point.decide(probabilities)
            heat = None
            if cam is not None:
                targets = (decisions if saliency_targets is None
                           else torch.tensor([saliency_targets[index] for index, _ in readable]))
                heat = cam.maps(images, targets.to(site_model.device), clinical).numpy()
            for row, (index, item) in enumerate(readable):
                prediction = Prediction(item.shown, STATUS_OK, predicted_class=names[int(decisions[row])],
                                        probabilities=[float(p) for p in probabilities[row]],
                                        original_shape=shapes[row])
                if heat is not None:
                    if keep_maps:
                        prediction.heat_map = heat[row]
                    if saliency_dir is not None:
                        png = saliency_dir / overlay_name(index, item.shown)
                        title = f"{prediction.predicted_class} (P={max(prediction.probabilities):.2f})"
                        write_overlay(png, display_image(fitted[row]), heat[row], title)
                        prediction.saliency_png = str(png)
                results[index] = prediction
        for index, _ in chunk:
            yield results[index]
        bar.update(len(chunk))
    bar.close()


def overlay_name(index: int, shown: str) -> str:
    """``00012_images_P0001_0.png``: position in the input, then the input path made file-name safe."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", shown).strip("._")[-80:]
    return f"{index:05d}_{safe or 'image'}.png"


def csv_columns(class_names: Sequence[str]) -> list[str]:
    return ["path", "status", "predicted_class", *(f"p_{name}" for name in class_names), "threshold",
            "decision_rule", "saliency_png", "reason"]


def write_predictions_csv(path: Path, predictions: Sequence[Prediction], site_model: SiteModel) -> Path:
    """The CSV: one row per input image, in input order."""
    point = site_model.operating_point
    threshold = "" if point.threshold is None else f"{point.threshold:.6f}"
    rule = point.rule if point.target is None else f"{point.rule}>={point.target:g}"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(csv_columns(site_model.class_names))
        for p in predictions:
            probabilities = ([f"{v:.6f}" for v in p.probabilities] if p.probabilities
                             else [""] * len(site_model.class_names))
            writer.writerow([p.shown, p.status, p.predicted_class, *probabilities,
                             threshold if p.status == STATUS_OK else "", rule if p.status == STATUS_OK else "",
                             p.saliency_png, p.reason])
    return path


@dataclass(frozen=True)
class PredictRun:
    """A finished prediction run: its rows and how fast it went."""

    predictions: list[Prediction]
    seconds: float

    @property
    def images_per_second(self) -> float:
        done = sum(p.status == STATUS_OK for p in self.predictions)
        return done / self.seconds if self.seconds > 0 else float("nan")


def run_predictions(site_model: SiteModel, inputs: Sequence[PredictInput], **options: object) -> PredictRun:
    """All predictions (``predict_images`` options), timed."""
    started = time.perf_counter()
    predictions = list(predict_images(site_model, inputs, **options))  # type: ignore[arg-type]
    return PredictRun(predictions, time.perf_counter() - started)


def summary(run: PredictRun, site_model: SiteModel, csv_path: Path | None) -> str:
    """What the CLI prints after a run."""
    config = site_model.config.model
    ok = [p for p in run.predictions if p.status == STATUS_OK]
    counts = Counter(p.predicted_class for p in ok)
    round_text = f", round {site_model.last_trained_round}" if site_model.last_trained_round is not None else ""
    lines = [
        f"site model     {config.architecture} at {config.image_size} px, global layers "
        f"{site_model.global_id[:12]}{round_text}, backbone {site_model.backbone_fingerprint[:12]}",
        f"decision       {site_model.operating_point.describe()}",
        f"images         {len(ok)} predicted, {len(run.predictions) - len(ok)} unreadable"
        + (" (see the reason column)" if len(ok) < len(run.predictions) else ""),
        *(f"  {name:<12} {counts.get(name, 0)}" for name in site_model.class_names),
        f"device         {site_model.device}, {run.seconds:.1f} s, {run.images_per_second:.1f} images/s",
    ]
    if csv_path is not None:
        lines.append(f"csv            {csv_path}")
    return "\n".join(lines)
