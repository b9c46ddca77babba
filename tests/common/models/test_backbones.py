"""FedModel: named stages + local head, DP-safe rewrites, and faithful conversion of torchvision weights."""

from __future__ import annotations

from typing import get_args

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from common.config import Architecture
from common.models.backbones import build_backbone, from_torchvision_state
from common.models.fed_model import FedModel, LocalHead
from common.models.layer_policy import first_trainable_stage
from common.config import ModelConfig
from common.models.layer_policy import LayerPolicy, default_policy
from common.models.model_weights import WeightsError

ARCHITECTURES = list(get_args(Architecture))  # every architecture the configuration accepts
SIZE = 32


def config(architecture: str, **overrides) -> ModelConfig:
    values = {"architecture": architecture, "num_classes": 2, "in_channels": 1, "image_size": SIZE}
    values.update(overrides)
    return ModelConfig(**values)


def torchvision_model_with_nontrivial_weights(architecture: str, image_size: int = SIZE) -> nn.Module:
    """A random torchvision model whose BN statistics and layer scales are far from their neutral init."""
    torch.manual_seed(0)
    kwargs = {"image_size": image_size} if architecture == "vit_b_16" else {}
    model = torchvision.models.get_model(architecture, weights=None, **kwargs)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
            if isinstance(module, torchvision.models.convnext.CNBlock):
                module.layer_scale.uniform_(0.5, 1.5)
    return model.eval()


def strip_imagenet_classifier(architecture: str, model: nn.Module) -> nn.Module:
    """Make ``model(x)`` return the features fedtl's head sees (the input of the ImageNet classifier)."""
    if architecture.startswith("resnet"):
        model.fc = nn.Identity()
    elif architecture in ("densenet121", "efficientnet_b0"):
        model.classifier = nn.Identity()
    elif architecture in ("mobilenet_v3_large", "convnext_tiny"):
        model.classifier[-1] = nn.Identity()
    elif architecture == "vit_b_16":
        model.heads = nn.Identity()
    return model


def image_features(model: FedModel, images: torch.Tensor) -> torch.Tensor:
    return model.head.features(model.forward_stages(images))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_converted_model_computes_the_same_features_as_torchvision(architecture: str) -> None:
    reference = torchvision_model_with_nontrivial_weights(architecture)
    state = reference.state_dict()
    model = from_torchvision_state(config(architecture, in_channels=3), state)
    strip_imagenet_classifier(architecture, reference)
    images = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = reference(images)
        actual = image_features(model, images)
    assert actual.shape == (2, model.feature_dim)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    logits = model(images)
    assert logits.shape == (2, 2)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_build_leaves_no_batchnorm_and_no_inplace_operation(architecture: str) -> None:
    model = build_backbone(config(architecture), load_weights=False)
    assert not [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert not [n for n, m in model.named_modules() if getattr(m, "inplace", False)]
    assert not [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    assert model.stages[model.stage_names[0]] is not None
    assert (model.architecture, model.num_classes, model.in_channels, model.image_size) == (
        architecture, 2, 1, SIZE
    )
    assert isinstance(model.head, LocalHead) and isinstance(model.head.classifier, nn.Linear)
    assert model.head.classifier.in_features == model.feature_dim
    assert not list(model.head.pool.parameters())


def test_frozen_batchnorm_statistics_do_not_change_in_train_mode() -> None:
    model = build_backbone(config("resnet18"), load_weights=False)
    frozen_norms = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert frozen_norms
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model.train()
    model(torch.randn(4, 1, SIZE, SIZE) * 5 + 3)
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def test_frozen_batchnorm_never_mixes_samples_of_a_batch() -> None:
    model = build_backbone(config("resnet18"), load_weights=False).train()
    torch.manual_seed(1)
    first = torch.randn(1, 1, SIZE, SIZE)
    with torch.no_grad():
        alone = model.forward_stages(first)
        together = model.forward_stages(torch.cat([first, 100 * torch.randn(3, 1, SIZE, SIZE)]))[:1]
    torch.testing.assert_close(alone, together)


def test_residual_blocks_add_the_shortcut_out_of_place() -> None:
    model = build_backbone(config("resnet18"), load_weights=False).train()
    block = model.stages["layer4"][1]
    x = torch.randn(2, 512, 1, 1, requires_grad=True)
    out = block(x)
    assert out._version == 0  # nothing modified the block's output in place
    out.sum().backward()
    assert x.grad is not None


def test_tail_shares_parameters_and_names_and_continues_the_forward_pass() -> None:
    model = build_backbone(config("resnet18", clinical_features=["age"]), load_weights=False)
    tail = model.tail(4)
    full = dict(model.named_parameters())
    tail_params = dict(tail.named_parameters())
    assert "stages.layer4.0.conv1.weight" in tail_params and "head.classifier.weight" in tail_params
    assert "stages.layer3.0.conv1.weight" not in tail_params
    assert all(tail_params[name] is full[name] for name in tail_params)
    images, clinical = torch.randn(2, 1, SIZE, SIZE), torch.randn(2, 1)
    with torch.no_grad():
        torch.testing.assert_close(tail(model.forward_stages(images, 0, 4), clinical), model(images, clinical))
    assert len(list(model.tail(0).parameters())) == len(full)
    assert all(name.startswith("head.") for name, _ in model.tail(len(model.stages)).named_parameters())


def test_forward_stages_rejects_a_range_outside_the_stages() -> None:
    model = build_backbone(config("resnet18"), load_weights=False)
    with pytest.raises(IndexError, match="outside the 5 stages"):
        model.forward_stages(torch.randn(1, 1, SIZE, SIZE), 0, 6)


def test_first_trainable_stage_is_the_first_stage_holding_a_trainable_prefix() -> None:
    model = build_backbone(config("resnet18"), load_weights=False)
    assert first_trainable_stage(model, default_policy("resnet18")) == 4
    assert first_trainable_stage(model, LayerPolicy(shared=("stages.layer2.1",), local=("head",))) == 2
    assert first_trainable_stage(model, LayerPolicy(shared=(), local=("head",))) == 5


@pytest.mark.parametrize("architecture", ["resnet18", "convnext_tiny", "vit_b_16"])
def test_gray_model_on_gray_image_equals_rgb_model_on_replicated_image(architecture: str) -> None:
    state = torchvision_model_with_nontrivial_weights(architecture).state_dict()
    gray_model = from_torchvision_state(config(architecture, in_channels=1), state)
    rgb_model = from_torchvision_state(config(architecture, in_channels=3), state)
    gray = torch.rand(2, 1, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(
            gray_model.forward_stages(gray), rgb_model.forward_stages(gray.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-4
        )


def test_gray_fold_keeps_all_pretrained_filters_by_summing_them() -> None:
    state = torchvision_model_with_nontrivial_weights("resnet18").state_dict()
    model = from_torchvision_state(config("resnet18", in_channels=1), state)
    folded = model.stages["stem"].conv1.weight
    assert folded.shape == (64, 1, 7, 7)
    torch.testing.assert_close(folded, state["conv1.weight"].sum(dim=1, keepdim=True))


def test_clinical_values_change_the_logits_through_the_clinical_branch() -> None:
    torch.manual_seed(0)
    model = build_backbone(config("resnet18", clinical_features=["age", "sex"]), load_weights=False)
    assert model.num_clinical == 2
    assert model.head.classifier.in_features == model.feature_dim + 32
    images = torch.randn(2, 1, SIZE, SIZE)
    with torch.no_grad():
        young = model(images, torch.tensor([[0.1, 0.0], [0.1, 1.0]]))
        old = model(images, torch.tensor([[3.0, 0.0], [3.0, 1.0]]))
    assert not torch.allclose(young, old)


def test_clinical_values_are_required_exactly_when_configured() -> None:
    with_branch = build_backbone(config("resnet18", clinical_features=["age"]), load_weights=False)
    without = build_backbone(config("resnet18"), load_weights=False)
    images = torch.randn(1, 1, SIZE, SIZE)
    with pytest.raises(ValueError, match="fuses 1 clinical feature"):
        with_branch(images)
    with pytest.raises(ValueError, match=r"shape \(batch, 1\)"):
        with_branch(images, torch.zeros(1, 2))
    with pytest.raises(ValueError, match="no clinical branch"):
        without(images, torch.zeros(1, 1))


def test_vit_interpolates_224_position_embeddings_to_the_configured_size() -> None:
    state = torchvision.models.vit_b_16(weights=None).state_dict()
    model = from_torchvision_state(config("vit_b_16", image_size=32), state)
    assert model.stages["embed"].pos_embedding.shape == (1, 1 + 2 * 2, 768)
    torch.testing.assert_close(
        model.stages["embed"].class_token, state["class_token"]
    )
    assert model(torch.randn(1, 1, 32, 32)).shape == (1, 2)
    with pytest.raises(ValueError, match="built for 32x32"):
        model(torch.randn(1, 1, 48, 48))


def test_densenet_weights_with_legacy_key_names_load() -> None:
    reference = torchvision_model_with_nontrivial_weights("densenet121")
    legacy = {}
    for key, value in reference.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue  # files from before BatchNorm counted batches
        for old, new in (("norm1", "norm.1"), ("conv1", "conv.1"), ("norm2", "norm.2"), ("conv2", "conv.2")):
            if "denselayer" in key and f".{old}." in key:
                key = key.replace(f".{old}.", f".{new}.")
        legacy[key] = value
    assert any(".norm.1." in key for key in legacy)
    model = from_torchvision_state(config("densenet121", in_channels=3), legacy)
    torch.testing.assert_close(
        model.stages["denseblock4"].denselayer16.conv2.weight,
        reference.features.denseblock4.denselayer16.conv2.weight,
    )


def test_weights_of_another_architecture_are_rejected() -> None:
    state = torchvision.models.resnet18(weights=None).state_dict()
    with pytest.raises(WeightsError, match="resnet50"):
        from_torchvision_state(config("resnet50"), state)


def test_every_configurable_architecture_is_registered_once_with_its_default_shared_layers() -> None:
    from common.config import Architecture
    from common.models.backbone_families import FAMILIES, Family, register_family

    assert set(Architecture.__args__) == set(FAMILIES)
    assert all(recipe.default_shared for recipe in FAMILIES.values())
    with pytest.raises(ValueError, match="twice"):
        register_family("resnet18", Family("conv1", lambda k: False, lambda m: None, ("stages.layer4",)))  # type: ignore[arg-type, return-value]
