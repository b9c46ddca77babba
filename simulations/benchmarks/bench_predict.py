"""Throughput of ``fedtl-hospital predict``: images per second at the site, CPU and (when there is one) GPU.

A synthetic hospital (DICOM files) and a site state folder with a finished model (the demo's
ResNet-18, random weights: speed does not depend on them) are built in a scratch folder; then
``client.inference.predict`` runs over every file once to warm up, then three times, the fastest pass
counting. Two figures per device:

* ``end_to_end_images_per_s``: reading the DICOM, preprocessing and the model, what a hospital sees;
* ``model_images_per_s``: the model alone on preprocessed batches (the exported TorchScript's work).

The CPU case runs at the demo's image size; the GPU case (only when CUDA is available) at 224 px.

Run:  .venv/bin/python -m simulations.benchmarks.bench_predict --images 256 --out runs/bench_predict.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.inference.predict import discover_inputs, load_pixels, run_predictions
from client.inference.site_model import load_site_model
from client.site_session import SiteSession
from client.site_settings import SiteSettings
from client.site_state import SiteState, tensor_fingerprint
from common.atomic_io import atomic_write_json
from common.config import FederationConfig
from common.data.synthetic_hospitals import generate_federation
from common.models.backbones import build_backbone
from common.models.layer_policy import apply_policy, resolve_policy

logger = logging.getLogger(__name__)

BENCH_GLOBAL_ID = "bench-global"
GPU_IMAGE_SIZE = 224


def build_site(root: Path, image_size: int, images: int, architecture: str = "resnet18") -> tuple[Path, Path]:
    """A synthetic hospital and a state folder holding a finished site model; returns (state dir, image folder)."""
    manifest = Path(generate_federation(root / "data", num_sites=1, seed=0, image_size=image_size,
                                        site_sizes=[images], with_clinical=False)[0])
    config = FederationConfig.from_dict({"model": {"architecture": architecture, "image_size": image_size},
                                         "privacy": {"enabled": False}, "training": {"device": "cpu"}})
    torch.manual_seed(0)
    model = build_backbone(config.model, load_weights=False)
    groups = apply_policy(model, resolve_policy(config.policy, architecture))
    backbone = {k: v.clone() for k, v in model.state_dict().items() if k not in set(groups.local)}
    fingerprint = tensor_fingerprint(backbone)
    state = SiteState(root / "state")
    state.store_backbone(fingerprint, backbone, {"mean": [0.5], "std": [0.25], "source": "benchmark: random init"})
    state.store_global_layers(BENCH_GLOBAL_ID, {name: backbone[name] for name in groups.shared})
    settings = SiteSettings(site_name="bench", manifest=manifest, state_dir=state.root, device="cpu", storage="memory")
    session = SiteSession.open(settings, config, fingerprint)
    session.load_shared(state.load_global_layers()[1])
    session.evaluate(BENCH_GLOBAL_ID)
    return state.root, manifest.parent / "images"


def measure_device(state_dir: Path, images_dir: Path, device: str, batch_size: int, repeats: int = 3) -> dict[str, Any]:
    """End-to-end and model-only images/s of predict on ``device``: a warm-up pass, then the best of ``repeats``."""
    site_model = load_site_model(state_dir, device=device)
    inputs = discover_inputs(images_dir)
    run_predictions(site_model, inputs, batch_size=batch_size, progress=False)  # warm-up: caches, kernels
    _synchronise(site_model.device)
    timed = min((run_predictions(site_model, inputs, batch_size=batch_size, progress=False) for _ in range(repeats)),
                key=lambda run: run.seconds)
    batch = site_model.preprocessing.normalise(np.stack([load_pixels(site_model, item)[0] for item in inputs]))
    batch = batch.to(site_model.device)
    passes = []
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first pass warms up
            _synchronise(site_model.device)
            started = time.perf_counter()
            for start in range(0, len(batch), batch_size):
                site_model.classifier(batch[start : start + batch_size])
            _synchronise(site_model.device)
            passes.append(time.perf_counter() - started)
    model_seconds = min(passes[1:])
    return {
        "device": str(site_model.device),
        "image_size": site_model.config.model.image_size,
        "architecture": site_model.config.model.architecture,
        "images": len(inputs),
        "batch_size": batch_size,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "end_to_end_seconds": round(timed.seconds, 3),
        "end_to_end_images_per_s": round(timed.images_per_second, 1),
        "model_images_per_s": round(len(inputs) / model_seconds, 1),
    }


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(images: int = 256, cpu_image_size: int = 64, batch_size: int = 32, work_dir: Path | None = None,
            gpu: bool | None = None) -> dict[str, Any]:
    """CPU figures at ``cpu_image_size``; GPU figures at 224 px when CUDA is available (or ``gpu`` forces it off)."""
    use_gpu = torch.cuda.is_available() if gpu is None else gpu and torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="fedtl-bench-predict-", dir=work_dir) as scratch:
        root = Path(scratch)
        state_dir, images_dir = build_site(root / "cpu", cpu_image_size, images)
        report: dict[str, Any] = {"cpu": measure_device(state_dir, images_dir, "cpu", batch_size)}
        if use_gpu:
            state_dir, images_dir = build_site(root / "gpu", GPU_IMAGE_SIZE, images)
            report["gpu"] = measure_device(state_dir, images_dir, "cuda", batch_size)
        else:
            report["gpu"] = None
    return report


def format_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    for key in ("cpu", "gpu"):
        figures = report.get(key)
        if figures:
            lines.append(f"predict on {figures['device']} at {figures['image_size']} px ({figures['architecture']}, "
                         f"{figures['images']} DICOM files, batch {figures['batch_size']}): "
                         f"{figures['end_to_end_images_per_s']:.1f} images/s end to end, "
                         f"{figures['model_images_per_s']:.1f} images/s model only")
    if report.get("gpu") is None:
        lines.append("predict on GPU: skipped (no CUDA device)")
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=64, help="CPU case image size (the demo's)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    report = measure(args.images, args.image_size, args.batch_size)
    print("\n".join(format_lines(report)))
    if args.out is not None:
        atomic_write_json(args.out, report)
        print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
