"""Weights from the local torch hub cache or a fedtl checkpoint, fingerprints, and state split/merge."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from common.models.backbones import build_backbone
from common.config import ModelConfig
from common.models.layer_policy import apply_policy, default_policy
from common.models.model_weights import (
    WeightsError,
    WeightsNotFoundError,
    backbone_normalization,
    fingerprint,
    load_backbone_checkpoint,
    resolve_torchvision_weights,
    save_backbone_checkpoint,
    torchvision_weights_file,
)
from common.models.state_groups import StateMismatchError, merge_state, split_state

RESNET18_FILE = "resnet18-f37072fd.pth"
RESNET18_URL = "https://download.pytorch.org/models/resnet18-f37072fd.pth"


def model_config(**overrides) -> ModelConfig:
    values = {"architecture": "resnet18", "num_classes": 2, "in_channels": 1, "image_size": 32}
    values.update(overrides)
    return ModelConfig(**values)


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    return tmp_path / "torch-home"


@pytest.fixture
def fake_resnet18_file(torch_home: Path) -> dict[str, torch.Tensor]:
    """A randomly initialised torchvision resnet18 saved where torch.hub keeps the IMAGENET1K_V1 file."""
    torch.manual_seed(3)
    state = torchvision.models.resnet18(weights=None).state_dict()
    target = torch_home / "hub" / "checkpoints" / RESNET18_FILE
    target.parent.mkdir(parents=True)
    torch.save(state, target)
    return state


# ---- fingerprints ----------------------------------------------------------------------------


def test_fingerprint_is_stable_across_order_copies_and_strides() -> None:
    base = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.tensor([1, 2], dtype=torch.int64)}
    reordered = {"a": base["a"].clone(), "b": base["b"].t().contiguous().t()}
    assert not reordered["b"].is_contiguous()
    digest = fingerprint(base)
    assert fingerprint(reordered) == digest
    assert len(digest) == 64 and int(digest, 16) >= 0


def test_fingerprint_changes_with_any_value_name_dtype_or_shape() -> None:
    base = {"w": torch.zeros(4), "v": torch.ones(2, 2)}
    digest = fingerprint(base)
    changed = {"w": torch.tensor([0.0, 0.0, 1e-7, 0.0]), "v": torch.ones(2, 2)}
    assert fingerprint(changed) != digest
    assert fingerprint({"w2": base["w"], "v": base["v"]}) != digest
    assert fingerprint({"w": base["w"].double(), "v": base["v"]}) != digest
    assert fingerprint({"w": base["w"], "v": base["v"].reshape(4)}) != digest


def test_fingerprint_of_a_built_model_is_reproducible() -> None:
    torch.manual_seed(0)
    first = build_backbone(model_config(), load_weights=False)
    torch.manual_seed(0)
    second = build_backbone(model_config(), load_weights=False)
    assert fingerprint(first.state_dict()) == fingerprint(second.state_dict())


# ---- torchvision weights from the hub cache -------------------------------------------------


def test_torchvision_weights_load_from_the_hub_cache_and_are_folded_to_gray(fake_resnet18_file) -> None:
    model = build_backbone(model_config(weights="ResNet18_Weights.IMAGENET1K_V1"))
    torch.testing.assert_close(model.stages["layer4"][1].conv2.weight, fake_resnet18_file["layer4.1.conv2.weight"])
    torch.testing.assert_close(model.stages["layer2"][0].bn1.running_var, fake_resnet18_file["layer2.0.bn1.running_var"])
    torch.testing.assert_close(
        model.stages["stem"].conv1.weight, fake_resnet18_file["conv1.weight"].sum(dim=1, keepdim=True)
    )
    default = build_backbone(model_config(weights="DEFAULT", in_channels=3))
    torch.testing.assert_close(default.stages["stem"].conv1.weight, fake_resnet18_file["conv1.weight"])


def test_gray_model_with_loaded_weights_matches_rgb_model_on_replicated_image(fake_resnet18_file) -> None:
    gray_model = build_backbone(model_config(weights="IMAGENET1K_V1", in_channels=1))
    rgb_model = build_backbone(model_config(weights="IMAGENET1K_V1", in_channels=3))
    gray = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            gray_model.forward_stages(gray), rgb_model.forward_stages(gray.repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-4
        )


def test_missing_weights_error_names_the_file_the_directory_and_the_url(torch_home: Path) -> None:
    with pytest.raises(WeightsNotFoundError) as caught:
        build_backbone(model_config(weights="ResNet18_Weights.IMAGENET1K_V1"))
    message = str(caught.value)
    assert f"'{RESNET18_FILE}'" in message
    assert f"'{torch_home / 'hub' / 'checkpoints'}'" in message
    assert RESNET18_URL in message
    assert "never downloads" in message
    assert not (torch_home / "hub" / "checkpoints" / RESNET18_FILE).exists()


def test_weights_file_location_follows_the_torch_hub_convention(torch_home: Path) -> None:
    weights = resolve_torchvision_weights("resnet18", "DEFAULT")
    assert torchvision_weights_file(weights) == torch_home / "hub" / "checkpoints" / RESNET18_FILE


def test_weights_names_of_another_architecture_or_unknown_names_are_refused() -> None:
    with pytest.raises(WeightsError, match="another architecture.*ResNet18_Weights.IMAGENET1K_V1"):
        resolve_torchvision_weights("resnet18", "ResNet50_Weights.IMAGENET1K_V2")
    with pytest.raises(WeightsError, match="not a torchvision weights name"):
        resolve_torchvision_weights("resnet18", "IMAGENET22K")


def test_a_damaged_weights_file_is_reported(torch_home: Path) -> None:
    target = torch_home / "hub" / "checkpoints" / RESNET18_FILE
    target.parent.mkdir(parents=True)
    target.write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="cannot be read"):
        build_backbone(model_config(weights="DEFAULT"))


def test_load_weights_false_ignores_configured_weights(torch_home: Path) -> None:
    model = build_backbone(model_config(weights="DEFAULT"), load_weights=False)
    assert model.architecture == "resnet18"


# ---- fedtl checkpoints --------------------------------------------------------------------------


def test_checkpoint_round_trip_restores_every_tensor_and_the_normalisation(tmp_path: Path) -> None:
    torch.manual_seed(5)
    model = build_backbone(model_config(clinical_features=["age"]), load_weights=False)
    path = tmp_path / "backbone.pt"
    digest = save_backbone_checkpoint(path, model, ((0.3,), (0.2,)))
    assert digest == fingerprint(model.state_dict())
    config = model_config(clinical_features=["age"], checkpoint=path)
    torch.manual_seed(6)
    restored = build_backbone(config)
    for key, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
    assert backbone_normalization(config) == ((0.3,), (0.2,))
    loaded = load_backbone_checkpoint(path)
    assert (loaded.architecture, loaded.in_channels, loaded.image_size, loaded.num_clinical) == ("resnet18", 1, 32, 1)
    assert loaded.fingerprint == digest


def test_checkpoint_that_does_not_fit_the_configuration_names_each_difference(tmp_path: Path) -> None:
    path = tmp_path / "backbone.pt"
    save_backbone_checkpoint(path, build_backbone(model_config(), load_weights=False), ((0.5,), (0.25,)))
    with pytest.raises(WeightsError, match="image_size is 32 in the checkpoint but 64") as caught:
        build_backbone(model_config(checkpoint=path, image_size=64, architecture="resnet50"))
    assert "architecture is 'resnet18' in the checkpoint but 'resnet50'" in str(caught.value)
    with pytest.raises(WeightsError, match="num_clinical is 0 in the checkpoint but 2"):
        build_backbone(model_config(checkpoint=path, clinical_features=["age", "sex"]))


def test_altered_checkpoint_is_detected_by_its_fingerprint(tmp_path: Path) -> None:
    path = tmp_path / "backbone.pt"
    save_backbone_checkpoint(path, build_backbone(model_config(), load_weights=False), ((0.5,), (0.25,)))
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["head.classifier.bias"] += 1
    torch.save(payload, path)
    with pytest.raises(WeightsError, match="do not match the recorded fingerprint"):
        load_backbone_checkpoint(path)


def test_torchvision_file_given_as_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(WeightsError, match="not a fedtl backbone checkpoint.*weights instead"):
        load_backbone_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="no such backbone checkpoint"):
        load_backbone_checkpoint(tmp_path / "absent.pt")


def test_checkpoint_normalisation_must_fit_the_input_channels(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="one mean and one std per input channel"):
        save_backbone_checkpoint(tmp_path / "x.pt", build_backbone(model_config(), load_weights=False),
                                 ((0.1, 0.2, 0.3), (1.0, 1.0, 1.0)))


def test_default_normalisation_is_imagenet_folded_to_gray() -> None:
    mean, std = backbone_normalization(model_config(in_channels=1))
    assert mean == pytest.approx((0.449,)) and std == pytest.approx((0.226,))
    assert backbone_normalization(model_config(in_channels=3)) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


# ---- split / merge of groups ----------------------------------------------------------------------


def grouped_model():
    model = build_backbone(model_config(), load_weights=False)
    return model, apply_policy(model, default_policy("resnet18"))


def test_split_then_merge_gives_back_the_state() -> None:
    model, groups = grouped_model()
    state = model.state_dict()
    parts = split_state(state, groups)
    assert set(parts["shared"]) == set(groups.shared) and set(parts["local"]) == set(groups.local)
    merged = merge_state(parts, expected=state)
    assert list(merged) == list(state)
    assert all(merged[k] is state[k] for k in state)


def test_split_refuses_groups_of_another_model() -> None:
    model, groups = grouped_model()
    state = dict(model.state_dict())
    state["stages.extra.weight"] = torch.zeros(1)
    with pytest.raises(StateMismatchError, match="'stages.extra.weight'.*belongs to no group"):
        split_state(state, groups)


def test_merge_names_the_missing_extra_misshapen_mistyped_or_doubled_tensor() -> None:
    model, groups = grouped_model()
    state = model.state_dict()
    parts = split_state(state, groups)
    shared = dict(parts["shared"])
    name = "stages.layer4.1.conv1.weight"

    without = {**parts, "shared": {k: v for k, v in shared.items() if k != name}}
    with pytest.raises(StateMismatchError, match=f"'{name}'.*missing"):
        merge_state(without, expected=state)
    with pytest.raises(StateMismatchError, match="'stages.bogus'.*does not exist"):
        merge_state({**parts, "shared": {**shared, "stages.bogus": torch.zeros(1)}}, expected=state)
    with pytest.raises(StateMismatchError, match=rf"'{name}'.*shape \(1,\)"):
        merge_state({**parts, "shared": {**shared, name: torch.zeros(1)}}, expected=state)
    with pytest.raises(StateMismatchError, match=f"'{name}'.*dtype torch.float16"):
        merge_state({**parts, "shared": {**shared, name: shared[name].half()}}, expected=state)
    with pytest.raises(StateMismatchError, match=f"'{name}' is given twice"):
        merge_state({**parts, "again": {name: shared[name]}}, expected=state)


def test_a_checkpoint_from_before_the_batch_norm_adapters_loads_with_identity_adapters(tmp_path: Path) -> None:
    """Checkpoints written before ``AdaptableFrozenBatchNorm2d`` lack ``*.adapter.*``: the model computes what it did."""
    torch.manual_seed(5)
    model = build_backbone(model_config(), load_weights=False)
    path = tmp_path / "old.pt"
    save_backbone_checkpoint(path, model, ((0.5,), (0.25,)))
    payload = torch.load(path, weights_only=False)
    payload["state_dict"] = {k: v for k, v in payload["state_dict"].items() if ".adapter." not in k}
    payload["fingerprint"] = fingerprint(payload["state_dict"])
    torch.save(payload, path)
    restored = build_backbone(model_config(checkpoint=path))
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(restored.forward_stages(x), model.forward_stages(x))
    assert all(torch.equal(v, torch.ones_like(v)) for k, v in restored.state_dict().items() if k.endswith("adapter.scale"))
