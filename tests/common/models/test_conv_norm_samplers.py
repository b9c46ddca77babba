"""Ghost-clipping norm samplers: norms equal the explicit per-sample computation, and Opacus uses them."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
from opacus import PrivacyEngine
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from torch.utils.data import DataLoader, TensorDataset
from torchvision.models.convnext import LayerNorm2d

from common.models.conv_norm_samplers import (
    choose_conv_norm_method,
    conv_norm_sample,
    group_norm_norm_sample,
    layer_norm_2d_norm_sample,
    layer_norm_norm_sample,
    register_conv_norm_samplers,
)


def explicit_per_sample_norms(
    layer: nn.Module, inputs: torch.Tensor, backprops: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-parameter per-sample gradient norms by a loop over samples (the definition)."""
    trainable = [name for name, p in layer.named_parameters() if p.requires_grad]
    norms: dict[str, list[torch.Tensor]] = {name: [] for name in trainable}
    for i in range(inputs.shape[0]):
        layer.zero_grad()
        (layer(inputs[i : i + 1]) * backprops[i : i + 1]).sum().backward()
        for name, param in layer.named_parameters():
            if param.requires_grad:
                norms[name].append(param.grad.norm())
    layer.zero_grad()
    return {name: torch.stack(values) for name, values in norms.items()}


def assert_norms_match(layer: nn.Module, inputs: torch.Tensor, sampler, **kwargs) -> None:
    with torch.no_grad():
        backprops = torch.randn_like(layer(inputs))
    expected = explicit_per_sample_norms(layer, inputs, backprops)
    got = sampler(layer, [inputs], backprops, **kwargs)
    assert {id(p) for p in got} == {id(p) for p in layer.parameters() if p.requires_grad}
    for name, param in layer.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(got[param], expected[name], rtol=1e-4, atol=1e-5, msg=name)


CONV_CASES = [
    # in, out, kernel, stride, padding, dilation, groups, bias, padding_mode, input side
    pytest.param(3, 5, 3, 1, 1, 1, 1, True, "zeros", 7, id="3x3-same-size"),
    pytest.param(4, 6, 3, 2, 0, 1, 1, False, "zeros", 9, id="stride2-nopad-nobias"),
    pytest.param(4, 6, (3, 2), (2, 1), (1, 0), (2, 1), 2, True, "zeros", 9, id="rect-dilated-grouped"),
    pytest.param(6, 6, 3, 1, 1, 1, 6, True, "zeros", 8, id="depthwise"),
    pytest.param(6, 12, 5, 2, 2, 1, 6, False, "zeros", 9, id="depthwise-multiplier2"),
    pytest.param(8, 4, 1, 1, 0, 1, 1, True, "zeros", 5, id="pointwise"),
    pytest.param(4, 8, 2, 2, 0, 1, 1, True, "zeros", 8, id="convnext-downsample-2x2s2"),
    pytest.param(3, 4, 4, 1, "same", 1, 1, True, "zeros", 6, id="same-even-kernel"),
    pytest.param(3, 4, 3, 1, 2, 2, 1, True, "reflect", 6, id="reflect-padding"),
    pytest.param(3, 4, 3, 2, 1, 1, 1, True, "circular", 7, id="circular-padding"),
]


@pytest.mark.parametrize("method", ["ghost", "materialise", "auto"])
@pytest.mark.parametrize(
    "c_in,c_out,kernel,stride,padding,dilation,groups,bias,padding_mode,side", CONV_CASES
)
def test_conv2d_norms_equal_explicit_per_sample_norms(
    c_in, c_out, kernel, stride, padding, dilation, groups, bias, padding_mode, side, method
) -> None:
    torch.manual_seed(0)
    layer = nn.Conv2d(
        c_in, c_out, kernel, stride=stride, padding=padding, dilation=dilation,
        groups=groups, bias=bias, padding_mode=padding_mode,
    )
    assert_norms_match(layer, torch.randn(5, c_in, side, side + 1), conv_norm_sample, method=method)


@pytest.mark.parametrize("method", ["ghost", "materialise"])
def test_conv1d_norms_equal_explicit_per_sample_norms(method: str) -> None:
    torch.manual_seed(1)
    layer = nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2)
    assert_norms_match(layer, torch.randn(4, 4, 15), conv_norm_sample, method=method)


def test_conv_with_frozen_weight_reports_only_bias_norms() -> None:
    torch.manual_seed(2)
    layer = nn.Conv2d(3, 4, 3, padding=1)
    layer.weight.requires_grad_(False)
    assert_norms_match(layer, torch.randn(3, 3, 5, 5), conv_norm_sample)


def test_empty_batch_gives_empty_norms() -> None:
    layer = nn.Conv2d(3, 4, 3)
    got = conv_norm_sample(layer, [torch.randn(0, 3, 5, 5)], torch.randn(0, 4, 3, 3))
    assert got[layer.weight].shape == (0,) and got[layer.bias].shape == (0,)


def test_half_precision_inputs_are_summed_in_float32() -> None:
    torch.manual_seed(3)
    layer = nn.Conv2d(3, 4, 3)
    inputs, backprops = torch.randn(2, 3, 6, 6), torch.randn(2, 4, 4, 4)
    reference = conv_norm_sample(layer, [inputs], backprops)[layer.weight]
    got = conv_norm_sample(layer, [inputs.bfloat16()], backprops.bfloat16())[layer.weight]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, reference, rtol=2e-2, atol=0)


def test_auto_picks_ghost_for_small_late_layers_and_materialises_large_or_depthwise_ones() -> None:
    late = nn.Conv2d(512, 512, 3, padding=1)  # ResNet layer4 at 64x64 input: 2x2 positions
    early = nn.Conv2d(3, 64, 7, stride=2, padding=3)  # ResNet stem at 224x224: 112x112 positions
    depthwise = nn.Conv2d(96, 96, 3, padding=1, groups=96)
    assert choose_conv_norm_method(late, positions=4) == "ghost"
    assert choose_conv_norm_method(early, positions=112 * 112) == "materialise"
    assert choose_conv_norm_method(depthwise, positions=14 * 14) == "materialise"


@pytest.mark.parametrize("shape,normalized", [((4, 7, 6), (6,)), ((4, 3, 5), (3, 5)), ((4, 6), (6,))])
def test_layer_norm_norms_equal_explicit_per_sample_norms(shape, normalized) -> None:
    torch.manual_seed(4)
    layer = nn.LayerNorm(normalized)
    with torch.no_grad():  # move away from the ones/zeros initialisation
        layer.weight.normal_()
        layer.bias.normal_()
    assert_norms_match(layer, torch.randn(shape), layer_norm_norm_sample)


def test_layer_norm_without_bias_reports_only_weight_norms() -> None:
    torch.manual_seed(5)
    assert_norms_match(nn.LayerNorm(6, bias=False), torch.randn(3, 2, 6), layer_norm_norm_sample)


def test_convnext_layer_norm_2d_norms_equal_explicit_per_sample_norms() -> None:
    torch.manual_seed(6)
    layer = LayerNorm2d(8, eps=1e-6)
    assert_norms_match(layer, torch.randn(4, 8, 3, 5), layer_norm_2d_norm_sample)


def test_group_norm_norms_equal_explicit_per_sample_norms() -> None:
    torch.manual_seed(7)
    layer = nn.GroupNorm(3, 6)
    assert_norms_match(layer, torch.randn(4, 6, 3, 4), group_norm_norm_sample)


def test_registration_puts_the_samplers_in_opacus_ghost_registry_idempotently() -> None:
    register_conv_norm_samplers()
    register_conv_norm_samplers()
    registry = GradSampleModuleFastGradientClipping.NORM_SAMPLERS
    assert registry[nn.Conv2d] is conv_norm_sample
    assert registry[nn.Conv1d] is conv_norm_sample
    assert registry[nn.LayerNorm] is layer_norm_norm_sample
    assert registry[LayerNorm2d] is layer_norm_2d_norm_sample
    assert registry[nn.GroupNorm] is group_norm_norm_sample


class SmallConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, groups=2)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.conv2(self.relu(self.conv1(x)))).flatten(1))


@pytest.mark.parametrize("method", ["ghost", "materialise", "auto"])
def test_ghost_mode_gives_the_explicitly_clipped_gradient_sum(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(8)
    batch = 8
    images, labels = torch.randn(batch, 1, 9, 9), torch.randint(0, 3, (batch,))
    model = SmallConvNet()

    # Definition: per-sample gradients of the per-sample loss, clipped to C, summed.
    per_sample = []
    for i in range(batch):
        model.zero_grad()
        nn.functional.cross_entropy(model(images[i : i + 1]), labels[i : i + 1]).backward()
        per_sample.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    per_sample = torch.stack(per_sample)
    norms = per_sample.norm(dim=1)
    max_grad_norm = norms.median().item()  # half the samples get clipped
    factors = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    expected_sum = (factors[:, None] * per_sample).sum(dim=0)

    calls = {"conv": 0}
    registry = GradSampleModuleFastGradientClipping.NORM_SAMPLERS

    def counting_conv_sampler(layer, activations, backprops):
        calls["conv"] += 1
        return conv_norm_sample(layer, activations, backprops, method=method)

    monkeypatch.setitem(registry, nn.Conv2d, counting_conv_sampler)

    model.zero_grad()
    loader = DataLoader(TensorDataset(images, labels), batch_size=batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private_model, optimizer, criterion, loader = PrivacyEngine().make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=loader,
            criterion=nn.CrossEntropyLoss(),
            noise_multiplier=0.0,
            max_grad_norm=max_grad_norm,
            poisson_sampling=False,
            grad_sample_mode="ghost",
        )
    x, y = next(iter(loader))
    optimizer.zero_grad()
    criterion(private_model(x), y).backward()

    assert calls["conv"] == 2, "both convolutions must go through the ghost norm sampler"
    summed = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(summed, expected_sum, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        private_model.per_sample_gradient_norms, norms, rtol=1e-4, atol=1e-6
    )

    # The DP optimizer turns the clipped sum into the mean over the expected batch ('mean' reduction).
    optimizer.pre_step()
    averaged = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(averaged, expected_sum / batch, rtol=1e-4, atol=1e-7)


def test_channel_affine_grad_and_norm_samples_equal_explicit_per_sample_ones() -> None:
    from common.models.opacus_compat import ChannelAffine, channel_affine_grad_sample, channel_affine_norm_sample

    torch.manual_seed(3)
    layer = ChannelAffine(5)
    with torch.no_grad():
        layer.scale.uniform_(0.5, 1.5)
        layer.shift.normal_()
    inputs, backprops = torch.randn(4, 5, 3, 3), torch.randn(4, 5, 3, 3)
    expected = explicit_per_sample_norms(layer, inputs, backprops)
    norms = channel_affine_norm_sample(layer, [inputs], backprops)
    torch.testing.assert_close(norms[layer.scale], expected["scale"])
    torch.testing.assert_close(norms[layer.shift], expected["shift"])
    grads = channel_affine_grad_sample(layer, [inputs], backprops)
    layer.zero_grad()
    (layer(inputs[1:2]) * backprops[1:2]).sum().backward()
    torch.testing.assert_close(grads[layer.scale][1], layer.scale.grad)
    torch.testing.assert_close(grads[layer.shift][1], layer.shift.grad)


def test_the_batch_norm_adapter_starts_as_the_identity_and_keeps_the_frozen_keys() -> None:
    from torchvision.ops.misc import FrozenBatchNorm2d

    from common.models.opacus_compat import AdaptableFrozenBatchNorm2d

    plain, adaptable = FrozenBatchNorm2d(4), AdaptableFrozenBatchNorm2d(4)
    state = {k: torch.rand_like(v) + 0.5 for k, v in plain.state_dict().items()}
    plain.load_state_dict(state)
    adaptable.load_state_dict(state, strict=False)
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(adaptable(x), plain(x))
    assert set(adaptable.state_dict()) == set(plain.state_dict()) | {"adapter.scale", "adapter.shift"}
    assert not any(True for _ in adaptable.parameters(recurse=False)), "the norm owns buffers only (Opacus rule)"
