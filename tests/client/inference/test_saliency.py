"""Saliency maps: Grad-CAM overlays per image, and the pointing game that checks them against known lesions."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from client.inference.predict import discover_inputs, run_predictions
from client.inference.saliency import (
    Lesion,
    choose_saliency_stage,
    lesion_mask,
    pointing_game,
    random_peak_hit_rate,
    read_lesions,
    saliency_peak,
    stage_output_sides,
)
from client.inference.site_model import load_site_model


@pytest.fixture(scope="module")
def maps_run(trained_site, tmp_path_factory):  # noqa: ANN001, ANN201
    model = load_site_model(trained_site.state_dir)
    inputs = discover_inputs(trained_site.manifest)[:6]
    folder = tmp_path_factory.mktemp("saliency")
    return model, run_predictions(model, inputs, progress=False, saliency_dir=folder, keep_maps=True), folder


def test_every_predicted_image_gets_an_overlay_png_and_a_finite_map_of_the_input_size(maps_run) -> None:  # noqa: ANN001
    model, run, folder = maps_run
    size = model.config.model.image_size
    assert len(list(folder.glob("*.png"))) == len(run.predictions) == 6
    for prediction in run.predictions:
        with Image.open(prediction.saliency_png) as png:
            assert png.format == "PNG" and min(png.size) > 100
        heat = prediction.heat_map
        assert heat.shape == (size, size) and np.isfinite(heat).all()
        assert heat.min() >= 0.0 and heat.max() <= 1.0 + 1e-6


def test_auto_picks_the_deepest_stage_with_a_map_of_at_least_seven_pixels(maps_run) -> None:  # noqa: ANN001
    model, _run, _folder = maps_run
    sides = stage_output_sides(model.classifier, 32, 1)
    assert sides["layer4"] == 1 and sides["layer2"] == 4 and sides["layer1"] == 8
    assert choose_saliency_stage(model.classifier, 32, 1) == "layer1"
    assert choose_saliency_stage(model.classifier, 224, 1) == "layer4"
    with pytest.raises(ValueError, match="not a stage"):
        choose_saliency_stage(model.classifier, 32, 1, "layer9")


def test_the_pointing_game_counts_peaks_inside_the_lesion() -> None:
    masks = [np.zeros((8, 8), dtype=bool) for _ in range(4)]
    for mask in masks:
        mask[2:4, 2:4] = True  # a 4-pixel lesion: a random peak lands in it 4/64 of the time
    inside, outside = np.zeros((8, 8)), np.zeros((8, 8))
    inside[3, 2] = 1.0
    outside[6, 6] = 1.0
    assert saliency_peak(inside) == (3, 2)
    assert pointing_game([inside, inside, inside, outside], masks) == pytest.approx(0.75)
    assert random_peak_hit_rate(masks) == pytest.approx(4 / 64)
    assert np.isnan(pointing_game([], []))


def test_a_lesion_is_mapped_into_the_input_through_the_preprocessing_geometry() -> None:
    # an 80 x 64 (portrait) image becomes 32 x 26 inside a 32 x 32 input, padded 3 columns on each side
    lesion = Lesion(center_row=40.0, center_col=32.0, radius_rows=5.0, radius_cols=5.0)
    mask = lesion_mask(lesion, (80, 64), 32)
    rows, cols = np.nonzero(mask)
    assert mask.shape == (32, 32)
    assert rows.mean() == pytest.approx(16 - 0.5 + 0.2, abs=0.5) and cols.mean() == pytest.approx(15.5, abs=0.5)
    assert mask.sum() == pytest.approx(np.pi * (5 * 0.4) ** 2, rel=0.35)
    assert not mask[:, :3].any() and not mask[:, 29:].any()


def test_the_synthetic_lesions_file_lists_the_findings_of_the_site(trained_site) -> None:  # noqa: ANN001
    lesions = read_lesions(trained_site.manifest.parent / "lesions.csv")
    labels = dict(line.split(",")[:2] for line in trained_site.manifest.read_text().splitlines()[1:])
    assert set(lesions) == {path for path, label in labels.items() if label == "finding"}
    assert all(lesion.radius_rows > 0 for lesion in lesions.values())
