"""What each simulated hospital would see when it uses its model: operating point and saliency overlays.

After a simulated federation every site's state folder holds the same model a real hospital's
would (``client.inference.site_model``). For the report this module loads each one, predicts on
the site's own test patients (the same patient split as its evaluation), writes a few Grad-CAM
overlays per site to ``<run>/site-use/<site>/`` and, where the site is a synthetic hospital that
records its lesions (``lesions.csv`` beside the manifest), scores the saliency with the pointing
game on every test image with a finding (Grad-CAM of the positive class) against a random-peak
baseline. It is computed from the sites' own folders, as a hospital would compute it; none of it
crossed the simulated network.

``python -m simulations.site_use_report RUN_DIR --site NAME=MANIFEST ...`` re-runs it on a finished
run folder and prints the section.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from client.inference.predict import STATUS_OK, PredictInput, predict_images
from client.inference.saliency import lesion_mask, pointing_game, random_peak_hit_rate, read_lesions
from client.inference.site_model import SiteModel, load_site_model
from client.inference.site_model_record import SiteModelError
from client.site_settings import SiteSettings
from common.data.patient_split import split_by_patient
from common.data.site_manifest import load_manifest
from common.data.synthetic_hospitals import LESIONS_FILE

logger = logging.getLogger(__name__)

OVERLAYS_PER_SITE = 4
SITE_USE_DIR = "site-use"


def test_inputs(site_model: SiteModel, manifest: Path) -> tuple[list[PredictInput], list[int]]:
    """The site's test images (its evaluation's patient split) and their labels."""
    loaded = load_manifest(manifest, site_model.class_names, site_model.clinical_features)
    labels = loaded.labels()
    data = site_model.config.data
    _train, test = split_by_patient(loaded.patient_ids(), labels, data.test_fraction, data.split_seed)
    entries = [loaded.entries[i] for i in test]
    return ([PredictInput(e.path, loaded.display_path(e), e.clinical) for e in entries], [labels[i] for i in test])


def site_use(site_model: SiteModel, manifest: Path, out_dir: Path, *, overlays: int = OVERLAYS_PER_SITE,
             stage: str = "auto") -> dict[str, Any]:
    """Operating point, a few overlays and (with known lesions) the pointing game for one site."""
    inputs, labels = test_inputs(site_model, manifest)
    positive = len(site_model.class_names) - 1
    shown = _mixed_selection(labels, positive, overlays)
    overlay_inputs = [inputs[i] for i in shown]
    pngs = [p.saliency_png for p in predict_images(site_model, overlay_inputs, progress=False,
                                                   saliency_dir=out_dir, saliency_stage=stage) if p.saliency_png]
    result: dict[str, Any] = {"operating_point": site_model.operating_point.to_dict(), "overlays": pngs,
                              "test_images": len(inputs)}
    lesions_file = manifest.parent / LESIONS_FILE
    if lesions_file.is_file():
        lesions = {str((manifest.parent / path).resolve()): lesion for path, lesion in read_lesions(lesions_file).items()}
        findings = [item for item, label in zip(inputs, labels) if label == positive and
                    str(item.path.resolve()) in lesions]
        maps, masks = [], []
        for item, prediction in zip(findings, predict_images(site_model, findings, progress=False, keep_maps=True,
                                                             saliency_stage=stage,
                                                             saliency_targets=[positive] * len(findings))):
            if prediction.status != STATUS_OK or prediction.heat_map is None or prediction.original_shape is None:
                continue
            maps.append(prediction.heat_map)
            masks.append(lesion_mask(lesions[str(item.path.resolve())], prediction.original_shape,
                                     site_model.config.model.image_size))
        result["pointing_game"] = {"findings": len(maps), "score": pointing_game(maps, masks),
                                   "random_peak": random_peak_hit_rate(masks), "stage": stage}
    return result


def _mixed_selection(labels: list[int], positive: int, count: int) -> list[int]:
    """Up to ``count`` test images, findings and normals alternating (the first of each in order)."""
    findings = [i for i, label in enumerate(labels) if label == positive]
    others = [i for i, label in enumerate(labels) if label != positive]
    chosen: list[int] = []
    while len(chosen) < count and (findings or others):
        for pool in (findings, others):
            if pool and len(chosen) < count:
                chosen.append(pool.pop(0))
    return chosen


def site_use_section(run_dir: Path, sites: Mapping[int, SiteSettings], *, stage: str = "auto") -> dict[str, Any]:
    """:func:`site_use` for every site that holds a finished model; overlays under ``run_dir/site-use``
    (their paths in the section are relative to ``run_dir``, as report.md links them)."""
    section: dict[str, Any] = {}
    for settings in sites.values():
        try:
            site_model = load_site_model(settings.state_dir, device="cpu")
        except SiteModelError as error:
            logger.warning("[%s] no usable model for the site-use section: %s", settings.site_name, error)
            continue
        try:
            row = site_use(site_model, settings.manifest, run_dir / SITE_USE_DIR / settings.site_name, stage=stage)
            row["overlays"] = [Path(png).relative_to(run_dir).as_posix() for png in row["overlays"]]
            section[settings.site_name] = row
        except Exception:  # noqa: BLE001 - a report section must not end the experiment
            logger.exception("[%s] the site-use section failed; left out of the report", settings.site_name)
    return section


def _fraction(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) and not math.isnan(value) else "-"


def format_site_use(metrics: Mapping[str, Any]) -> list[str]:
    """The report's section: each site's operating point, pointing game and overlays (Markdown lines)."""
    section = metrics.get("site_use") or {}
    if not section:
        return []
    lines = ["## Using the model at each site", "",
             "Each site's decision threshold, chosen on its own validation patients (out-of-fold predictions of its",
             "personal head), and Grad-CAM saliency on its test patients. Pointing game: share of test findings whose",
             "saliency peak falls inside the recorded lesion, against a peak drawn at random over the image.", "",
             "| site | decision rule | threshold | validation sensitivity / specificity | pointing game (findings) "
             "| random peak |", "|---|---|---|---|---|---|"]
    for site, row in sorted(section.items()):
        point, game = row["operating_point"], row.get("pointing_game") or {}
        rule = point["rule"] + (f" >= {point['target']:g}" if point.get("target") is not None else "")
        threshold = "-" if point.get("threshold") is None else f"{point['threshold']:.3f}"
        rates = f"{_fraction(point.get('sensitivity'))} / {_fraction(point.get('specificity'))}"
        pointing = f"{_fraction(game.get('score'))} ({game.get('findings', 0)})" if game else "-"
        lines.append(f"| {site} | {rule} | {threshold} | {rates} | {pointing} | {_fraction(game.get('random_peak'))} |")
    lines.append("")
    for site, row in sorted(section.items()):
        pictures = [Path(p) for p in row.get("overlays", [])]
        if pictures:
            lines.append(f"{site}: " + " ".join(f"![{site} {p.stem}]({p.as_posix()})" for p in pictures))
            lines.append("")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.site_use_report", description=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--site", action="append", default=[], metavar="NAME=MANIFEST", required=True,
                        help="a site of the run (its state is RUN_DIR/sites/NAME) and its manifest; repeat per site")
    parser.add_argument("--stage", default="auto", help="trunk stage for Grad-CAM (default: auto)")
    parser.add_argument("--out", type=Path, default=None, help="also write the section as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    sites = {}
    for index, pair in enumerate(args.site):
        name, _, manifest = pair.partition("=")
        sites[index] = SiteSettings(site_name=name, manifest=Path(manifest), state_dir=args.run_dir / "sites" / name)
    section = site_use_section(args.run_dir, sites, stage=args.stage)
    print("\n".join(format_site_use({"site_use": section})))
    if args.out is not None:
        args.out.write_text(json.dumps(section, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
