"""One DP-SGD step per architecture on the trainable tail, with exact per-sample gradients.

For every architecture the default policy's tail passes Opacus' validator, Opacus' per-sample
gradients equal a loop over single samples (so nothing mixes samples and no in-place op breaks
the hooks), one clipped step moves every shared tensor, and frozen tensors stay put.
"""

from __future__ import annotations

from typing import get_args

import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from opacus import PrivacyEngine
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.ops import StochasticDepth

from common.config import Architecture
from common.models.backbones import from_torchvision_state
from common.models.fed_model import FedModel
from common.models.layer_policy import first_trainable_stage
from common.config import ModelConfig
from common.models.layer_policy import ParameterGroups, apply_policy, default_policy
from common.models.opacus_compat import BatchFirstDPMultiheadAttention, LayerScale

ARCHITECTURES = list(get_args(Architecture))  # every architecture the configuration accepts
BATCH = 3


def calibrated_torchvision_state(architecture: str) -> dict[str, torch.Tensor]:
    """Random torchvision weights with BatchNorm statistics measured on random images.

    A randomly initialised trunk with neutral statistics (mean 0, var 1) shrinks activations to
    ~1e-12 by EfficientNet's last stage; measured statistics behave like pretrained ones. ConvNeXt
    layer scales start at 1e-6 (pretrained ones are far larger), which would make the block's
    gradients vanish below float32 resolution of its weights.
    """
    kwargs = {"image_size": 32} if architecture == "vit_b_16" else {}
    reference = torchvision.models.get_model(architecture, weights=None, **kwargs)
    for module in reference.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # cumulative average over the calibration pass
        if isinstance(module, torchvision.models.convnext.CNBlock):
            module.layer_scale.data.fill_(0.5)
    with torch.no_grad():
        reference.train()(torch.randn(8, 3, 32, 32))
    return reference.state_dict()


def prepared(architecture: str) -> tuple[FedModel, ParameterGroups, int]:
    torch.manual_seed(0)
    config = ModelConfig(architecture=architecture, num_classes=2, in_channels=1, image_size=32,
                         clinical_features=["age"])
    model = from_torchvision_state(config, calibrated_torchvision_state(architecture))
    policy = default_policy(architecture)
    groups = apply_policy(model, policy)
    return model, groups, first_trainable_stage(model, policy)


def without_randomness(module: nn.Module) -> nn.Module:
    """Dropout and stochastic depth off, so a batched pass and single-sample passes are comparable."""
    for sub in module.modules():
        if isinstance(sub, (nn.Dropout, StochasticDepth)):
            sub.p = 0.0
    return module


def per_sample_gradients_by_loop(tail: nn.Module, h, clinical, labels) -> dict[str, torch.Tensor]:
    trainable = {name: p for name, p in tail.named_parameters() if p.requires_grad}
    grads: dict[str, list[torch.Tensor]] = {name: [] for name in trainable}
    for i in range(len(labels)):
        tail.zero_grad()
        F.cross_entropy(tail(h[i : i + 1], clinical[i : i + 1]), labels[i : i + 1]).backward()
        for name, param in trainable.items():
            grads[name].append(param.grad.detach().clone())
    tail.zero_grad()
    return {name: torch.stack(values) for name, values in grads.items()}


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_one_dp_sgd_step_on_the_default_tail(architecture: str) -> None:
    model, groups, start = prepared(architecture)
    images, clinical = torch.randn(BATCH, 1, 32, 32), torch.randn(BATCH, 1)
    labels = torch.tensor([0, 1, 1])
    with torch.no_grad():
        h = model.forward_stages(images, 0, start)
    tail = without_randomness(model.tail(start).train())
    assert ModuleValidator.validate(tail, strict=False) == []

    expected = per_sample_gradients_by_loop(tail, h, clinical, labels)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}

    wrapped = GradSampleModule(tail, batch_first=True, loss_reduction="mean")
    try:
        trainable = [p for p in tail.parameters() if p.requires_grad]
        optimizer = DPOptimizer(torch.optim.SGD(trainable, lr=0.5), noise_multiplier=0.0, max_grad_norm=1.0,
                                expected_batch_size=BATCH)
        optimizer.zero_grad()
        F.cross_entropy(wrapped(h, clinical), labels).backward()
        for name, param in tail.named_parameters():
            if param.requires_grad:
                torch.testing.assert_close(param.grad_sample, expected[name], rtol=1e-3, atol=1e-5, msg=name)
        optimizer.step()
    finally:
        wrapped._close()

    after = model.state_dict()
    unchanged_shared = [k for k in groups.shared if torch.equal(after[k], before[k])]
    assert not unchanged_shared, f"shared tensors that did not move: {unchanged_shared[:5]}"
    assert not [k for k in groups.frozen if not torch.equal(after[k], before[k])]
    assert not torch.equal(after["head.classifier.weight"], before["head.classifier.weight"])


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_ghost_clipping_uses_exact_per_sample_norms(architecture: str) -> None:
    """grad_sample_mode="ghost" (the configured default) clips with the true per-sample gradient norms."""
    model, groups, start = prepared(architecture)
    images, clinical, labels = torch.randn(BATCH, 1, 32, 32), torch.randn(BATCH, 1), torch.tensor([0, 1, 1])
    with torch.no_grad():
        h = model.forward_stages(images, 0, start)
    tail = without_randomness(model.tail(start).train())
    expected = per_sample_gradients_by_loop(tail, h, clinical, labels)
    expected_norms = torch.cat([g.flatten(1) for g in expected.values()], dim=1).norm(dim=1)
    loader = DataLoader(TensorDataset(h, clinical, labels), batch_size=BATCH)
    before = {k: model.state_dict()[k].clone() for k in groups.shared}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped, optimizer, criterion, loader = PrivacyEngine().make_private(
            module=tail,
            optimizer=torch.optim.SGD([p for p in tail.parameters() if p.requires_grad], lr=0.5),
            criterion=nn.CrossEntropyLoss(),
            data_loader=loader,
            noise_multiplier=0.0,
            max_grad_norm=1.0,
            poisson_sampling=False,
            grad_sample_mode="ghost",
        )
        try:
            for batch_h, batch_clinical, batch_labels in loader:
                optimizer.zero_grad()
                criterion(wrapped(batch_h, batch_clinical), batch_labels).backward()
                torch.testing.assert_close(wrapped.per_sample_gradient_norms, expected_norms, rtol=1e-3, atol=1e-6)
                optimizer.step()
        finally:
            wrapped._close()
    after = model.state_dict()
    assert not [k for k in groups.shared if torch.equal(after[k], before[k])]


def test_layer_scale_per_sample_gradients_and_norms_match_the_definition() -> None:
    from common.models.opacus_compat import layer_scale_norm_sample

    torch.manual_seed(0)
    layer = LayerScale(torch.rand(4, 1, 1))
    inputs, backprops = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    expected = []
    for i in range(3):
        layer.zero_grad()
        (layer(inputs[i : i + 1]) * backprops[i : i + 1]).sum().backward()
        expected.append(layer.scale.grad.clone())
    norms = layer_scale_norm_sample(layer, [inputs], backprops)[layer.scale]
    torch.testing.assert_close(norms, torch.stack([g.norm() for g in expected]))

    wrapped = GradSampleModule(nn.Sequential(layer), loss_reduction="sum")
    try:
        (wrapped(inputs) * backprops).sum().backward()
        torch.testing.assert_close(layer.scale.grad_sample, torch.stack(expected))
    finally:
        wrapped._close()


def test_batch_first_dp_attention_equals_torch_attention() -> None:
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(16, 4, batch_first=True)
    attention = BatchFirstDPMultiheadAttention(16, 4)
    attention.load_state_dict(dict(reference.state_dict()))
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        expected, expected_weights = reference(x, x, x, need_weights=True)
        actual, weights = attention(x, x, x, need_weights=True)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weights, expected_weights, rtol=1e-5, atol=1e-5)
    with pytest.raises(NotImplementedError, match="masks"):
        attention(x, x, x, attn_mask=torch.zeros(5, 5, dtype=torch.bool))
