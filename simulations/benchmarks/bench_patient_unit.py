"""What the patient unit of privacy costs per DP step: per-patient ghost norms against per-image gradients.

On cached trunk features of the demo's tail (ResNet-18 at 64 px, its default layer policy), one
``client.dp.local_training.train_tail`` call per setting, the same seed, the same ledger plan:

* ``patient_ghost``: the shipping default, each patient's summed gradient clipped from Gram
  products of the patient's images (``client.dp.patient_gradient_norms``), no per-image gradient;
* ``patient_hooks``: per-image gradients (Opacus ``hooks``) summed per patient, then clipped (what
  the patient unit ran before, and still runs for layers the patient norms do not cover);
* ``image_ghost``: the image unit with ghost clipping (the lower bound: no grouping at all).

Each figure is the wall time per step of the timed call (after a warm-up call); ``max_rel_diff``
compares the weights ``patient_ghost`` and ``patient_hooks`` end on (the same patient draws and
noise: only float rounding separates them).

Run:  .venv/bin/python -m simulations.benchmarks.bench_patient_unit --out runs/bench-patient-unit.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

SETTINGS: dict[str, tuple[str, str]] = {
    "patient_ghost": ("patient", "ghost"),
    "patient_hooks": ("patient", "hooks"),
    "image_ghost": ("image", "ghost"),
}


def _demo_tail_features(images: int, image_size: int, seed: int) -> tuple[Any, Any, torch.Tensor, torch.Tensor]:
    from client.trunk_feature_cache import compute_trunk_features
    from common.config import ModelConfig
    from common.models.backbones import build_backbone
    from common.models.layer_policy import apply_policy, default_policy, first_trainable_stage

    torch.manual_seed(seed)
    model = build_backbone(ModelConfig(architecture="resnet18", num_classes=2, in_channels=1, image_size=image_size),
                           load_weights=False)
    policy = default_policy("resnet18")
    groups = apply_policy(model, policy)
    boundary = first_trainable_stage(model, policy)
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(images, 1, image_size, image_size, generator=generator)
    features = compute_trunk_features(model, pixels, boundary, torch.device("cpu"))
    labels = torch.randint(0, 2, (images,), generator=generator)
    return model, (groups, boundary), features, labels


def _train(model: Any, layout: Any, features: torch.Tensor, labels: torch.Tensor, patients: list[str], *,
           unit: str, mode: str, batch_size: int, ledger_dir: Path, seed: int) -> tuple[int, float, dict[str, Any]]:
    from client.dp.local_training import train_tail
    from client.privacy.privacy_budget import PrivacyLedger
    from client.privacy.privacy_plan import sample_rate_for
    from common.config import PrivacyConfig, TrainingConfig

    groups, boundary = layout
    state = {k: v.clone() for k, v in model.state_dict().items()}
    named = dict(model.named_parameters())
    named_shared = [(n, named[n]) for n in groups.shared if n in named]
    named_local = [(n, named[n]) for n in groups.local if n in named]
    units = len(set(patients)) if unit == "patient" else len(labels)
    ledger = PrivacyLedger.load_or_create(ledger_dir / f"{unit}-{mode}-{len(labels)}.json", target_epsilon=8.0,
                                          delta=1e-5, sample_rate=sample_rate_for(units, batch_size), planned_steps=40)
    training = TrainingConfig(batch_size=batch_size, local_epochs=1, learning_rate=0.05, momentum=0.9)
    privacy = PrivacyConfig(enabled=True, unit=unit, target_epsilon=8.0, target_delta=1e-5, max_grad_norm=1.0,
                            grad_sample_mode=mode)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcome = train_tail(
            model.tail(boundary), features, torch.zeros(len(labels), 0), labels,
            named_shared=named_shared, named_local=named_local, training=training, privacy=privacy, ledger=ledger,
            global_shared=None, proximal_mu=0.0, class_weights=None, device=torch.device("cpu"), seed=seed,
            patients=patients,
        )
    seconds = time.perf_counter() - start
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    return outcome.steps, seconds, trained


def measure(images: int = 192, images_per_patient: int = 2, batch_size: int = 32, image_size: int = 64,
            seed: int = 0) -> dict[str, Any]:
    """Seconds per DP step of each setting in :data:`SETTINGS`, and the patient modes' weight difference."""
    model, layout, features, labels = _demo_tail_features(images, image_size, seed)
    patients = [f"p{i // images_per_patient}" for i in range(images)]
    result: dict[str, Any] = {"images": images, "images_per_patient": images_per_patient, "batch_size": batch_size,
                              "image_size": image_size, "threads": torch.get_num_threads(), "settings": {}}
    ends: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="fedtl-bench-patient-") as tmp:
        for name, (unit, mode) in SETTINGS.items():
            warm = 2 * batch_size
            _train(model, layout, features[:warm], labels[:warm], patients[:warm], unit=unit, mode=mode,
                   batch_size=batch_size, ledger_dir=Path(tmp), seed=seed)
            steps, seconds, ends[name] = _train(model, layout, features, labels, patients, unit=unit, mode=mode,
                                                batch_size=batch_size, ledger_dir=Path(tmp), seed=seed)
            result["settings"][name] = {"steps": steps, "seconds": round(seconds, 3),
                                        "seconds_per_step": round(seconds / max(1, steps), 4)}
    ghost, hooks = ends["patient_ghost"], ends["patient_hooks"]
    result["max_rel_diff"] = max(
        float((ghost[k].float() - hooks[k].float()).abs().max() / hooks[k].float().abs().max().clamp_min(1e-12))
        for k in hooks if hooks[k].is_floating_point()
    )
    settings = result["settings"]
    result["patient_speedup_ghost_vs_hooks"] = (settings["patient_hooks"]["seconds_per_step"]
                                                / settings["patient_ghost"]["seconds_per_step"])
    return result


def format_lines(result: dict[str, Any]) -> list[str]:
    lines = [f"DP step per privacy unit (resnet18 tail, {result['image_size']} px, batch {result['batch_size']}, "
             f"{result['images_per_patient']} images per patient, {result['threads']} threads)"]
    for name, figures in result["settings"].items():
        lines.append(f"  {name:14s} {figures['seconds_per_step'] * 1000:8.1f} ms/step ({figures['steps']} steps)")
    lines.append(f"  patient unit, ghost vs hooks: {result['patient_speedup_ghost_vs_hooks']:.1f}x faster; "
                 f"weights differ by {result['max_rel_diff']:.1e} (relative)")
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-patient-unit.json"))
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = measure(images=args.images)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print("\n".join(format_lines(result)))
    return result


if __name__ == "__main__":
    main()
