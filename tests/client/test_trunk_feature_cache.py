"""The frozen-trunk cache: the same inputs for the tail as the full forward, once per image, in RAM or on disk.

``client.trunk_feature_cache.split_trunk_features`` must give, for the train and test split,
exactly what the frozen trunk computes; compute it once and then read it back; recompute it
when the backbone, the preprocessing, the cut point, an image or the split changes, or when the
file is damaged; keep it memory-mapped (zero-copy slices of one file) when the site's storage
says ``disk`` or memory is short. Training on the cached features must be the same DP training
as training through the frozen trunk: same Poisson batches, same steps, same privacy ledger,
same weights.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from client import trunk_feature_cache
from client.dp.local_training import train_tail
from client.privacy.privacy_budget import PrivacyLedger
from client.privacy.privacy_plan import sample_rate_for, steps_per_epoch
from client.trunk_feature_cache import SplitInputs, split_trunk_features
from common.models.backbones import build_backbone
from common.models.fed_model import FedModel
from common.models.layer_policy import first_trainable_stage
from common.config import ModelConfig, PrivacyConfig, TrainingConfig
from common.models.layer_policy import LayerPolicy, apply_policy, default_policy

TRAIN_IDX = [5, 0, 3, 7, 1, 9]
TEST_IDX = [2, 8, 4, 6]
CPU = torch.device("cpu")


def tiny_resnet(seed: int = 0) -> tuple[FedModel, LayerPolicy, int]:
    torch.manual_seed(seed)
    config = ModelConfig(architecture="resnet18", num_classes=2, in_channels=1, image_size=32)
    model = build_backbone(config, load_weights=False)
    policy = default_policy("resnet18")
    apply_policy(model, policy)
    return model, policy, first_trainable_stage(model, policy)


def images(count: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randn(count, 1, 32, 32, generator=torch.Generator().manual_seed(seed))


def features(model: FedModel, pixels: torch.Tensor, boundary: int, cache_dir: Path, **overrides: object) -> SplitInputs:
    arguments: dict[str, object] = dict(
        train_idx=TRAIN_IDX, test_idx=TEST_IDX, boundary=boundary, fingerprint="fp-a",
        preprocessing_key="prep-a", cache_dir=cache_dir, device=CPU, storage="memory",
    )
    arguments.update(overrides)
    return split_trunk_features(model, pixels, **arguments)  # type: ignore[arg-type]


def count_trunk_passes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the number of images of every batch the trunk computes (the one-image shape probe excluded)."""
    calls: list[int] = []
    original = trunk_feature_cache._trunk_batches

    def counting(model, images, order, boundary, device, batch_size=128):  # noqa: ANN001, ANN202
        for start, batch in original(model, images, order, boundary, device, batch_size):
            if len(images if order is None else order) > 1:
                calls.append(len(batch))
            yield start, batch

    monkeypatch.setattr(trunk_feature_cache, "_trunk_batches", counting)
    return calls


def test_cached_features_are_the_frozen_trunk_outputs_of_each_split_in_split_order(tmp_path: Path) -> None:
    model, _policy, boundary = tiny_resnet()
    pixels = images()
    split = features(model, pixels, boundary, tmp_path)
    model.eval()
    with torch.no_grad():
        expected = model.forward_stages(pixels, 0, boundary)
    torch.testing.assert_close(split.train, expected[TRAIN_IDX], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(split.test, expected[TEST_IDX], rtol=1e-5, atol=1e-6)
    assert model.training is False  # the caller's mode is restored (here: eval, as set above)


def test_features_are_computed_once_and_read_back_from_the_site_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, _policy, boundary = tiny_resnet()
    pixels = images()
    passes = count_trunk_passes(monkeypatch)
    first = features(model, pixels, boundary, tmp_path)
    assert sum(passes) == len(pixels)
    second = features(model, pixels, boundary, tmp_path)
    assert sum(passes) == len(pixels), "the second session must not run the trunk again"
    assert torch.equal(first.train, second.train) and torch.equal(first.test, second.test)
    assert len(list(tmp_path.glob("*.npy"))) == 1


@pytest.mark.parametrize(
    "change",
    [
        {"fingerprint": "fp-b"},
        {"preprocessing_key": "prep-b"},
        {"train_idx": TRAIN_IDX[:-1], "test_idx": [*TEST_IDX, TRAIN_IDX[-1]]},
        {"images": "one pixel changed"},
        {"boundary": "one stage earlier"},
    ],
    ids=["new backbone", "new preprocessing", "new split", "changed image", "new cut point"],
)
def test_a_new_backbone_preprocessing_split_image_or_cut_point_recomputes_the_features(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: dict[str, object]
) -> None:
    model, _policy, boundary = tiny_resnet()
    pixels = images()
    features(model, pixels, boundary, tmp_path)
    passes = count_trunk_passes(monkeypatch)
    overrides = dict(change)
    if overrides.pop("images", None):
        pixels = pixels.clone()
        pixels[4, 0, 3, 3] += 0.5
    if overrides.pop("boundary", None):
        boundary -= 1
    features(model, pixels, boundary, tmp_path, **overrides)
    assert sum(passes) == len(pixels)
    assert len(list(tmp_path.glob("*.npy"))) == 2


@pytest.mark.parametrize("damage", [b"not an npy file", None], ids=["garbage", "truncated"])
def test_a_damaged_cache_file_is_recomputed_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, damage: bytes | None
) -> None:
    model, _policy, boundary = tiny_resnet()
    pixels = images()
    good = features(model, pixels, boundary, tmp_path)
    (entry,) = tmp_path.glob("*.npy")
    entry.write_bytes(damage if damage is not None else entry.read_bytes()[:-100])
    passes = count_trunk_passes(monkeypatch)
    with caplog.at_level("WARNING"):
        again = features(model, pixels, boundary, tmp_path, storage="disk")
    assert "is damaged; recomputing it" in caplog.text
    assert sum(passes) == len(pixels)
    assert torch.equal(again.train, good.train) and torch.equal(again.test, good.test)


def test_the_cache_keeps_the_most_recently_used_entries_and_drops_the_earlier_format(tmp_path: Path) -> None:
    model, _policy, boundary = tiny_resnet()
    pixels = images()
    (tmp_path / "0123abcd.pt").write_bytes(b"features of the earlier format")
    paths = {}
    for number, fingerprint in enumerate(["fp-1", "fp-2", "fp-3"]):
        features(model, pixels, boundary, tmp_path, fingerprint=fingerprint)
        (paths[fingerprint],) = set(tmp_path.glob("*.npy")) - set(paths.values())
        os.utime(paths[fingerprint], ns=(number * 10**9, number * 10**9))  # used in this order
    assert not (tmp_path / "0123abcd.pt").exists()
    features(model, pixels, boundary, tmp_path, fingerprint="fp-1")  # a hit: fp-1 is now the most recent
    features(model, pixels, boundary, tmp_path, fingerprint="fp-4")  # a new entry: the oldest, fp-2, goes
    remaining = set(tmp_path.glob("*.npy"))
    assert len(remaining) == trunk_feature_cache.KEPT_ENTRIES == 3
    assert paths["fp-1"] in remaining and paths["fp-3"] in remaining and paths["fp-2"] not in remaining


def _mapped_files() -> str:
    return Path("/proc/self/maps").read_text(encoding="ascii", errors="replace")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_on_disk_the_splits_are_zero_copy_slices_of_one_memory_mapped_file(tmp_path: Path) -> None:
    model, _policy, boundary = tiny_resnet()
    pixels = images()
    in_memory = features(model, pixels, boundary, tmp_path / "a")
    on_disk = features(model, pixels, boundary, tmp_path / "b", storage="disk")
    assert on_disk.storage == "disk" and in_memory.storage == "memory"
    assert torch.equal(on_disk.train, in_memory.train) and torch.equal(on_disk.test, in_memory.test)
    (entry,) = (tmp_path / "b").glob("*.npy")
    assert str(entry) in _mapped_files()
    assert on_disk.train.untyped_storage().data_ptr() == on_disk.test.untyped_storage().data_ptr()
    assert on_disk.test.data_ptr() == on_disk.train.data_ptr() + on_disk.train.nbytes
    on_disk.train.mul_(0)  # copy-on-write: a tensor written to never changes the cached file
    assert torch.equal(features(model, pixels, boundary, tmp_path / "b", storage="disk").train, in_memory.train)


def test_auto_storage_keeps_features_on_disk_only_when_they_would_crowd_the_memory(tmp_path: Path) -> None:
    model, _policy, boundary = tiny_resnet()
    pixels = images()
    roomy = features(model, pixels, boundary, tmp_path, storage="auto", available_memory=10**12)
    short = features(model, pixels, boundary, tmp_path, storage="auto", available_memory=4 * roomy.train.nbytes)
    assert roomy.storage == "memory" and short.storage == "disk"
    assert torch.equal(roomy.train, short.train)


def test_without_a_frozen_trunk_the_inputs_are_the_images_in_split_order_in_memory_or_on_disk(tmp_path: Path) -> None:
    model, _policy, _boundary = tiny_resnet()
    pixels = images()
    for storage in ("memory", "disk"):
        split = features(model, pixels, 0, tmp_path, storage=storage)
        assert split.storage == storage
        assert torch.equal(split.train, pixels[TRAIN_IDX]) and torch.equal(split.test, pixels[TEST_IDX])
    assert list(tmp_path.glob("*.npy")) == [], "images are not cached a second time"


def _train_dp(model: FedModel, policy: LayerPolicy, boundary: int, inputs: torch.Tensor, ledger_path: Path) -> tuple[dict[str, torch.Tensor], int, PrivacyLedger]:
    groups = apply_policy(model, policy)
    named = dict(model.named_parameters())
    training = TrainingConfig(local_epochs=2, batch_size=4, learning_rate=0.1, momentum=0.0)
    privacy = PrivacyConfig(enabled=True, unit="image", target_epsilon=8.0, target_delta=1e-3, max_grad_norm=1.0)
    ledger = PrivacyLedger.load_or_create(ledger_path, target_epsilon=8.0, delta=1e-3,
                                          sample_rate=sample_rate_for(len(inputs), 4),
                                          planned_steps=2 * steps_per_epoch(sample_rate_for(len(inputs), 4)))
    labels = torch.tensor([0, 1] * (len(inputs) // 2))
    outcome = train_tail(
        model.tail(boundary), inputs, torch.zeros(len(inputs), 0), labels,
        named_shared=[(n, named[n]) for n in groups.shared],
        named_local=[(n, named[n]) for n in groups.local if n in named],
        training=training, privacy=privacy, ledger=ledger, global_shared=None, proximal_mu=0.0,
        class_weights=None, device=CPU, seed=7,
    )
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, outcome.steps, ledger


def test_dp_training_on_cached_features_is_the_same_training_as_through_the_frozen_trunk(tmp_path: Path) -> None:
    """Same seed: the same Poisson batches and noise give the same steps, the same ledger and the same weights."""
    pixels = images(12, seed=3)
    model, policy, boundary = tiny_resnet(seed=5)
    cached = split_trunk_features(model, pixels, train_idx=list(range(12)), test_idx=[], boundary=boundary,
                                  fingerprint="fp", preprocessing_key="prep", cache_dir=tmp_path, device=CPU,
                                  storage="disk")
    with_cache, cache_steps, cache_ledger = _train_dp(model, policy, boundary, cached.train, tmp_path / "a.json")

    model, policy, _ = tiny_resnet(seed=5)
    through_trunk, trunk_steps, trunk_ledger = _train_dp(model, policy, 0, pixels, tmp_path / "b.json")

    assert cache_steps == trunk_steps == 2 * steps_per_epoch(sample_rate_for(12, 4))
    assert cache_ledger.history == trunk_ledger.history
    assert cache_ledger.spent_epsilon() == trunk_ledger.spent_epsilon() > 0
    assert set(with_cache) == set(through_trunk)
    for name in through_trunk:
        torch.testing.assert_close(with_cache[name], through_trunk[name], rtol=1e-4, atol=1e-5, msg=name)
