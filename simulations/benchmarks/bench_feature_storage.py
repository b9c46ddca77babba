"""What a site's ``storage`` setting costs: trunk features in RAM against memory-mapped from the disk.

One process per storage mode (``memory``, ``disk``), after a first process has written the
trunk-feature cache, as a site's later session would find it. Each worker opens the features
with the shipping ``client.trunk_feature_cache.split_trunk_features`` and trains one DP epoch
with ``client.dp.local_training.train_tail`` on them (resnet18, its default layer policy, random
images and labels: only speed and memory are measured). It reports, from ``/proc/self/status``:

* ``anon_mib``: anonymous memory (RssAnon) added by the features, after opening them and after
  the epoch. This is memory the operating system cannot take back without swap.
* ``file_mib``: file-backed resident memory (RssFile) added, pages of the memory-mapped file
  that training has read; the operating system drops them again when memory runs short.

and the epoch's images per second. Linux only (``/proc``).

Run:  .venv/bin/python -m simulations.benchmarks.bench_feature_storage --images 8192 --out runs/bench_storage.json
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

RESULT_PREFIX = "STORAGE_RESULT "
MODES = ("memory", "disk")


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _memory() -> dict[str, float]:
    return {"anon": _status_mib("RssAnon"), "file": _status_mib("RssFile")}


def worker(mode: str, images_count: int, image_size: int, batch_size: int, cache_dir: Path) -> dict[str, Any]:
    """Open the features in ``mode`` (``prepare``: compute them) and train one DP epoch on them."""
    import torch

    from client.dp.local_training import train_tail
    from client.privacy.privacy_budget import PrivacyLedger
    from client.privacy.privacy_plan import sample_rate_for, steps_per_epoch
    from client.trunk_feature_cache import split_trunk_features
    from common.models.backbones import build_backbone
    from common.models.layer_policy import first_trainable_stage
    from common.config import ModelConfig, PrivacyConfig, TrainingConfig
    from common.models.layer_policy import apply_policy, default_policy
    from common.data.row_files import scratch_rows

    torch.manual_seed(0)
    model = build_backbone(ModelConfig(architecture="resnet18", num_classes=2, in_channels=1, image_size=image_size),
                           load_weights=False)
    policy = default_policy("resnet18")
    groups = apply_policy(model, policy)
    boundary = first_trainable_stage(model, policy)
    # The images as a disk-mode site holds them (memory-mapped), so that only the features differ.
    images = scratch_rows(cache_dir, images_count, (1, image_size, image_size))
    generator = torch.Generator().manual_seed(1)
    for start in range(0, images_count, 1024):
        chunk = images[start : start + 1024]
        chunk.copy_(torch.randn(chunk.shape, generator=generator))
    before = _memory()
    started = time.perf_counter()
    split = split_trunk_features(
        model, images, train_idx=list(range(images_count)), test_idx=[], boundary=boundary, fingerprint="bench",
        preprocessing_key="bench", cache_dir=cache_dir, device=torch.device("cpu"),
        storage="memory" if mode == "prepare" else mode,  # type: ignore[arg-type]
    )
    open_seconds = time.perf_counter() - started
    del images
    opened = _memory()
    if mode == "prepare":
        return {"mode": mode, "features_mib": round(split.train.nbytes / 2**20, 1), "seconds": round(open_seconds, 2)}

    named = dict(model.named_parameters())
    rate = sample_rate_for(images_count, batch_size)
    with tempfile.TemporaryDirectory() as ledger_dir, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus' RDP order warnings for tiny test sizes
        ledger = PrivacyLedger.load_or_create(Path(ledger_dir) / "ledger.json", target_epsilon=8.0, delta=1e-5,
                                              sample_rate=rate, planned_steps=steps_per_epoch(rate))
        labels = torch.randint(0, 2, (images_count,), generator=generator)
        started = time.perf_counter()
        outcome = train_tail(
            model.tail(boundary), split.train, torch.zeros(images_count, 0), labels,
            named_shared=[(n, named[n]) for n in groups.shared],
            named_local=[(n, named[n]) for n in groups.local if n in named],
            training=TrainingConfig(local_epochs=1, batch_size=batch_size),
            privacy=PrivacyConfig(enabled=True, unit="image", target_epsilon=8.0, target_delta=1e-5),
            ledger=ledger, global_shared=None, proximal_mu=0.0, class_weights=None,
            device=torch.device("cpu"), seed=3,
        )
        train_seconds = time.perf_counter() - started
    trained = _memory()
    return {
        "mode": mode,
        "storage": split.storage,
        "features_mib": round(split.train.nbytes / 2**20, 1),
        "open_seconds": round(open_seconds, 2),
        "anon_mib_after_open": round(opened["anon"] - before["anon"], 1),
        "file_mib_after_open": round(opened["file"] - before["file"], 1),
        "anon_mib_after_epoch": round(trained["anon"] - before["anon"], 1),
        "file_mib_after_epoch": round(trained["file"] - before["file"], 1),
        "dp_epoch_images_per_s": round(images_count / train_seconds, 1),
        "steps": outcome.steps,
    }


def _run_worker(mode: str, images: int, image_size: int, batch_size: int, cache_dir: Path) -> dict[str, Any]:
    command = [sys.executable, "-m", "simulations.benchmarks.bench_feature_storage", "--worker", mode, "--images", str(images),
               "--image-size", str(image_size), "--batch-size", str(batch_size), "--cache-dir", str(cache_dir)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    raise RuntimeError(f"storage worker {mode} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")


def measure(images: int = 8192, image_size: int = 64, batch_size: int = 64, in_process: bool = False) -> dict[str, Any]:
    """Both modes on the same cached features; a dict for ``bench.json``.

    ``in_process`` runs the workers in this process (for tests: the memory figures then overlap).
    """
    if not Path("/proc/self/status").exists():
        return {"skipped": "needs Linux /proc to read resident memory by kind"}
    run = worker if in_process else _run_worker
    with tempfile.TemporaryDirectory(prefix="fedtl-bench-storage-") as folder:
        cache_dir = Path(folder)
        prepared = run("prepare", images, image_size, batch_size, cache_dir)
        logger.info("storage bench: %s MiB of trunk features written in %.1f s", prepared["features_mib"],
                    prepared["seconds"])
        results = {mode: run(mode, images, image_size, batch_size, cache_dir) for mode in MODES}
    return {"images": images, "image_size": image_size, "batch_size": batch_size, "separate_processes": not in_process,
            "prepare": prepared, **results}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8192)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--worker", choices=("prepare", *MODES), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_storage.json"))
    args = parser.parse_args(argv)
    if args.worker:
        result = worker(args.worker, args.images, args.image_size, args.batch_size, args.cache_dir)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return result
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    report = measure(args.images, args.image_size, args.batch_size)
    from common.atomic_io import atomic_write_json

    atomic_write_json(args.out, report)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
