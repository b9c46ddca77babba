"""Layer policies: every tensor in exactly one group, defaults per architecture, and every refusal."""

from __future__ import annotations

from typing import get_args

import pytest
import torch
from torch import nn

from common.config import Architecture
from common.models.backbones import build_backbone
from common.models.fed_model import FedModel
from common.config import LayerPolicyConfig, ModelConfig
from common.models.layer_policy import (
    LayerPolicy,
    LayerPolicyError,
    ParameterGroups,
    apply_policy,
    default_policy,
    resolve_policy,
)

ARCHITECTURES = list(get_args(Architecture))  # every architecture the configuration accepts


def build(architecture: str = "resnet18", **overrides) -> FedModel:
    values = {"architecture": architecture, "num_classes": 2, "in_channels": 1, "image_size": 32}
    values.update(overrides)
    return build_backbone(ModelConfig(**values), load_weights=False)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_default_policy_partitions_the_state_and_sets_requires_grad(architecture: str) -> None:
    model = build(architecture, clinical_features=["age"])
    policy = default_policy(architecture)
    groups = apply_policy(model, policy)
    keys = list(model.state_dict())
    assert sorted(groups.frozen + groups.shared + groups.local) == sorted(keys)
    assert len(set(groups.frozen) | set(groups.shared) | set(groups.local)) == len(keys)
    assert groups.shared and groups.frozen
    assert all(key.startswith(policy.shared) for key in groups.shared)
    assert [k for k in keys if k.startswith("head.")] == groups.local
    assert "head.classifier.weight" in groups.local and "head.clinical.linear.weight" in groups.local
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(groups.shared) | {k for k in groups.local if k in dict(model.named_parameters())}


def test_frozen_batchnorm_statistics_inside_a_shared_block_stay_frozen() -> None:
    model = build("resnet18")
    groups = apply_policy(model, default_policy("resnet18"))
    assert "stages.layer4.1.conv1.weight" in groups.shared
    assert "stages.layer4.1.bn1.running_mean" in groups.frozen
    assert "stages.layer4.1.bn1.weight" in groups.frozen  # FrozenBatchNorm2d affine values are buffers
    assert groups.group_of("stages.layer1.0.conv1.weight") == "frozen"


def test_sizes_count_values_per_group() -> None:
    model = build("resnet18")
    groups = apply_policy(model, default_policy("resnet18"))
    sizes = groups.sizes(model.state_dict())
    assert sizes["local"] == 512 * 2 + 2
    assert sizes["shared"] == sum(p.numel() for n, p in model.named_parameters() if n.startswith("stages.layer4.1"))


def test_resolve_policy_keeps_defaults_for_missing_lists_and_replaces_given_ones() -> None:
    assert resolve_policy(LayerPolicyConfig(), "convnext_tiny") == default_policy("convnext_tiny")
    custom = resolve_policy(LayerPolicyConfig(shared=["stages.layer3", "stages.layer4"]), "resnet18")
    assert custom == LayerPolicy(shared=("stages.layer3", "stages.layer4"), local=("head",))
    assert resolve_policy(LayerPolicyConfig(local=["head.classifier"]), "resnet18").local == ("head.classifier",)


def test_unknown_architecture_has_no_default_policy() -> None:
    with pytest.raises(LayerPolicyError, match="resnet18"):
        default_policy("alexnet")


def refuse(model: FedModel, policy: LayerPolicy, *fragments: str) -> str:
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    with pytest.raises(LayerPolicyError) as caught:
        apply_policy(model, policy)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, message
    assert before == {name: p.requires_grad for name, p in model.named_parameters()}, "model changed on refusal"
    return message


def test_a_prefix_that_names_no_module_is_refused_with_a_suggestion() -> None:
    refuse(build(), LayerPolicy(shared=("stages.layr4",), local=("head",)),
           "'stages.layr4'", "no module", "Did you mean 'stages.layer4'")


def test_a_prefix_in_both_groups_is_refused() -> None:
    refuse(build(), LayerPolicy(shared=("stages.layer4",), local=("head", "stages.layer4")),
           "'stages.layer4'", "both [policy] shared and local")


def test_a_prefix_listed_twice_is_refused() -> None:
    refuse(build(), LayerPolicy(shared=("stages.layer4", "stages.layer4"), local=("head",)), "shared twice")


def test_overlapping_prefixes_are_refused() -> None:
    refuse(build(), LayerPolicy(shared=("stages.layer4",), local=("head", "stages.layer4.1")),
           "overlap", "'stages.layer4.1'", "inside 'stages.layer4'")


def test_an_empty_shared_group_is_refused() -> None:
    refuse(build(), LayerPolicy(shared=(), local=("head",)), "shared is empty", "stages.layer4.1")


def test_a_frozen_classifier_is_refused() -> None:
    refuse(build(), LayerPolicy(shared=("stages.layer4",), local=()), "head.classifier.weight", "local")


def test_a_trainable_batchnorm_is_refused() -> None:
    model = build()
    model.stages.layer4[1].bn1 = nn.BatchNorm2d(512)
    refuse(model, default_policy("resnet18"), "'stages.layer4.1.bn1'", "trainable BatchNorm2d", "FrozenBatchNorm2d")


def test_a_batchnorm_in_the_frozen_part_is_refused_too() -> None:
    model = build()
    model.stages.layer1[0].bn1 = nn.BatchNorm2d(64)
    refuse(model, default_policy("resnet18"), "'stages.layer1.0.bn1'", "batch statistics", "FrozenBatchNorm2d")


def test_an_inplace_module_after_the_first_trainable_module_is_refused() -> None:
    model = build()
    model.stages.layer4[1].relu.inplace = True
    refuse(model, default_policy("resnet18"), "'stages.layer4.1.relu'", "inplace=False")


def test_an_inplace_module_before_the_trainable_part_is_accepted() -> None:
    model = build()
    model.stages.stem.relu.inplace = True
    apply_policy(model, default_policy("resnet18"))


def test_a_module_opacus_cannot_train_is_refused_by_name() -> None:
    model = build()
    model.stages.layer4[1].attention = nn.MultiheadAttention(8, 2)
    refuse(model, default_policy("resnet18"), "'stages.layer4.1.attention'", "MultiheadAttention", "DPMultiheadAttention")


def test_a_trainable_module_with_buffers_is_refused() -> None:
    class Calibrated(nn.Linear):
        def __init__(self) -> None:
            super().__init__(4, 4)
            self.register_buffer("offset", torch.zeros(4))

    model = build()
    model.stages.layer4[1].calibration = Calibrated()
    refuse(model, default_policy("resnet18"), "'stages.layer4.1.calibration'", "buffers")


def test_groups_are_plain_lists_of_state_keys() -> None:
    groups = ParameterGroups(frozen=["a"], shared=["b"], local=["c"])
    assert groups.group_of("b") == "shared"
    with pytest.raises(KeyError):
        groups.group_of("d")
