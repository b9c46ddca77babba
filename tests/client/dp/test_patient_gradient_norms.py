"""Patient-level ghost clipping: each patient's summed gradient is clipped without per-image gradients.

``client.dp.patient_gradient_norms`` must give the norm of every group's summed gradient exactly (to
float rounding) for linear layers, convolutions and the BatchNorm adapters, through both of its
paths (Gram products and the group's own gradient); ``patient_clipped_backward`` must
leave the DP-SGD clipped sum over patients by definition; and ``train_tail`` with the patient unit
must end on the same weights and ledger in ghost mode as in hooks mode (per-image gradients summed
per patient), with the same seed.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from torch import nn

from client.dp import patient_gradient_norms
from client.dp.ghost_clipping import DirectWeightGradients, GhostClippingError
from client.dp import local_training
from client.dp.local_training import train_tail
from client.dp.patient_gradient_norms import (
    layer_group_squared_norms,
    patient_clipped_backward,
    tail_supports_patient_norms,
)
from client.dp.patient_sampling import grad_sample_mode_for
from client.privacy.privacy_budget import PrivacyLedger
from client.privacy.privacy_plan import sample_rate_for
from common.config import PrivacyConfig, TrainingConfig
from common.models.opacus_compat import ChannelAffine
from tests.client.dp.test_ghost_clipping import Batch, TinyTail, resnet18_batch, tiny_batch

GROUPS = torch.tensor([0, 2, 0, 1, 2, 2])  # six samples of three patients: two, one and three images


def _group_gradients_by_definition(layer: nn.Module, x: torch.Tensor, group: torch.Tensor,
                                   num_groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Squared norm of each group's summed gradient of ``sum(layer(x) * r)``, by autograd; plus ``x``'s output gradient."""
    torch.manual_seed(1)
    out = layer(x)
    r = torch.randn_like(out)
    params = [p for p in layer.parameters() if p.requires_grad]
    expected = torch.zeros(num_groups)
    for g in range(num_groups):
        members = group == g
        grads = torch.autograd.grad((out[members] * r[members]).sum(), params, retain_graph=True)
        expected[g] = sum(gr.pow(2).sum() for gr in grads)
    return expected, out.detach(), r


@pytest.mark.parametrize(
    "layer, shape",
    [
        (nn.Linear(5, 3), (6, 5)),
        (nn.Linear(5, 3, bias=False), (6, 4, 5)),  # a sequence: rows of a sample are summed
        (nn.Conv2d(3, 4, kernel_size=3, padding=1), (6, 3, 5, 5)),
        (nn.Conv2d(3, 4, kernel_size=3, stride=2, dilation=1, padding=0, bias=False), (6, 3, 7, 7)),
        (nn.Conv2d(2, 2, kernel_size=2, dilation=2, padding=1), (6, 2, 6, 6)),
        (ChannelAffine(3), (6, 3, 4, 4)),
    ],
    ids=["linear", "linear_sequence", "conv", "conv_strided", "conv_dilated", "channel_affine"],
)
@pytest.mark.parametrize("gram_rows_limit", [4096, 0], ids=["gram_products", "group_gradients"])
def test_each_groups_squared_norm_is_that_of_its_summed_gradient(
    layer: nn.Module, shape: tuple[int, ...], gram_rows_limit: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(patient_gradient_norms, "_GRAM_ROWS_LIMIT", gram_rows_limit)
    torch.manual_seed(0)
    if isinstance(layer, ChannelAffine):
        with torch.no_grad():
            layer.scale.uniform_(0.5, 1.5)
            layer.shift.normal_()
    x = torch.randn(*shape)
    expected, _out, r = _group_gradients_by_definition(layer, x, GROUPS, 3)
    actual = layer_group_squared_norms(layer, x, r, GROUPS, 3)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-6)


def test_a_frozen_parameter_adds_nothing_to_the_norm() -> None:
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 4, kernel_size=3, padding=1)
    layer.bias.requires_grad_(False)
    x = torch.randn(6, 3, 5, 5)
    expected, _out, r = _group_gradients_by_definition(layer, x, GROUPS, 3)
    torch.testing.assert_close(layer_group_squared_norms(layer, x, r, GROUPS, 3), expected, rtol=1e-4, atol=1e-6)


def test_layers_without_an_exact_patient_norm_are_declined() -> None:
    assert not patient_gradient_norms.supports_patient_norms(nn.Conv2d(4, 4, 3, groups=2))
    assert not patient_gradient_norms.supports_patient_norms(nn.Conv1d(4, 4, 3))
    assert not tail_supports_patient_norms(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten()))
    assert tail_supports_patient_norms(TinyTail())
    # ... and then the patient unit falls back to per-image gradients summed per patient
    assert grad_sample_mode_for("ghost", "patient", patient_norms_supported=False) == "hooks"
    assert grad_sample_mode_for("ghost", "patient", patient_norms_supported=True) == "ghost"
    assert grad_sample_mode_for("ghost", "image") == "ghost"


def _clipped_sum_over_patients_by_definition(tail: nn.Module, batch: Batch, groups: torch.Tensor,
                                             max_grad_norm: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """DP-SGD per patient: each patient's summed per-image gradient, clipped to ``max_grad_norm``, summed."""
    h, clinical, labels = batch
    trainable = {name: p for name, p in tail.named_parameters() if p.requires_grad}
    total = {name: torch.zeros_like(p) for name, p in trainable.items()}
    norms = []
    for g in torch.unique(groups):
        members = groups == g
        loss = F.cross_entropy(tail(h[members], clinical[members]), labels[members], reduction="sum")
        grads = torch.autograd.grad(loss, list(trainable.values()))
        norm = torch.sqrt(sum(gr.pow(2).sum() for gr in grads))
        norms.append(norm)
        scale = (max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
        for name, gr in zip(trainable, grads):
            total[name] += scale * gr
    return total, torch.stack(norms)


def _grouped_ghost_gradients(tail: nn.Module, batch: Batch, groups: torch.Tensor, max_grad_norm: float,
                             loss_reduction: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    h, clinical, labels = batch
    trainable = {name: p for name, p in tail.named_parameters() if p.requires_grad}
    dp_module = GradSampleModuleFastGradientClipping(tail, max_grad_norm=max_grad_norm, loss_reduction=loss_reduction,
                                                     use_ghost_clipping=True)
    dp_module.disable_hooks()  # as train_tail does: Opacus' per-image norms are not needed
    direct = DirectWeightGradients.attach(tail)
    assert direct is not None
    try:
        optimizer = DPOptimizerFastGradientClipping(
            torch.optim.SGD(list(trainable.values()), lr=0.1), noise_multiplier=0.0, max_grad_norm=max_grad_norm,
            expected_batch_size=len(labels), loss_reduction=loss_reduction,
        )
        criterion = DPLossFastGradientClipping(dp_module, optimizer, nn.CrossEntropyLoss(reduction=loss_reduction),
                                               loss_reduction)
        leaves = [h.detach().requires_grad_(True), clinical.detach().requires_grad_(True)]
        patient_clipped_backward(criterion(dp_module(*leaves), labels), dp_module, leaves, direct, groups)
        return ({name: p.grad.detach().clone() for name, p in trainable.items()},
                dp_module.per_sample_gradient_norms.detach().clone())
    finally:
        direct.close()
        dp_module._close()
        for p in trainable.values():
            p.grad = None


@pytest.mark.parametrize("make, groups", [(tiny_batch, GROUPS), (resnet18_batch, torch.tensor([5, 9, 5, 9]))],
                         ids=["conv_linear_tail", "resnet18_tail"])
@pytest.mark.parametrize("loss_reduction", ["mean", "sum"])
def test_grouped_backward_gives_the_clipped_sum_over_patients(make, groups: torch.Tensor, loss_reduction: str) -> None:
    tail, batch = make()
    _, expected_norms = _clipped_sum_over_patients_by_definition(tail, batch, groups, 1.0)
    max_grad_norm = float(expected_norms.mean())  # clips one patient's sum, leaves another's whole
    assert (expected_norms > max_grad_norm).any() and (expected_norms < max_grad_norm).any()
    expected, _ = _clipped_sum_over_patients_by_definition(tail, batch, groups, max_grad_norm)

    grads, norms = _grouped_ghost_gradients(tail, batch, groups, max_grad_norm, loss_reduction)

    torch.testing.assert_close(norms, expected_norms, rtol=1e-4, atol=1e-7)
    for name, value in expected.items():
        torch.testing.assert_close(grads[name], value, rtol=1e-4, atol=1e-4 * float(value.abs().max()), msg=name)


def test_grouped_backward_refuses_group_codes_that_do_not_match_the_batch() -> None:
    tail, batch = tiny_batch()
    with pytest.raises(GhostClippingError, match="4 group codes for 6 samples"):
        _grouped_ghost_gradients(tail, batch, torch.tensor([0, 1, 0, 1]), 1.0, "mean")


def _train_by_patient(tmp_path: Path, grad_sample_mode: str) -> tuple[dict[str, torch.Tensor], PrivacyLedger]:
    tail, _ = tiny_batch()
    generator = torch.Generator().manual_seed(3)
    inputs, clinical = torch.randn(24, 4, 8, 8, generator=generator), torch.randn(24, 2, generator=generator)
    labels = torch.randint(0, 3, (24,), generator=generator)
    patients = [f"p{i % 9}" for i in range(24)]  # nine patients of two or three images
    training = TrainingConfig(batch_size=6, local_epochs=2, learning_rate=0.1, momentum=0.9)
    privacy = PrivacyConfig(enabled=True, unit="patient", target_epsilon=8.0, target_delta=1e-3, max_grad_norm=0.5,
                            grad_sample_mode=grad_sample_mode)
    rate = sample_rate_for(24, 6)
    ledger = PrivacyLedger.load_or_create(tmp_path / f"ledger-{grad_sample_mode}.json", target_epsilon=8.0,
                                          delta=1e-3, sample_rate=rate, planned_steps=8)
    named = list(tail.named_parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_tail(
            tail, inputs, clinical, labels,
            named_shared=[(n, p) for n, p in named if not n.startswith("classifier")],
            named_local=[(n, p) for n, p in named if n.startswith("classifier")],
            training=training, privacy=privacy, ledger=ledger, global_shared=None, proximal_mu=0.0,
            class_weights=torch.tensor([1.0, 2.0, 0.5]), device=torch.device("cpu"), seed=7, patients=patients,
        )
    assert all(not hasattr(p, "_forward_counter") for p in tail.parameters()), "Opacus hooks were not removed"
    return {n: p.detach().clone() for n, p in tail.named_parameters()}, ledger


def test_train_tail_by_patient_in_ghost_mode_trains_like_per_image_gradients_summed_per_patient(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same patient draws, same noise, same clipping of each patient's sum: the same weights and ledger."""
    calls: list[int] = []

    def counted(*args, **kwargs) -> None:  # noqa: ANN002, ANN003 - the shipping function, counted
        calls.append(1)
        patient_clipped_backward(*args, **kwargs)

    monkeypatch.setattr(local_training, "patient_clipped_backward", counted)
    ghost, ghost_ledger = _train_by_patient(tmp_path, "ghost")
    assert calls, "ghost mode did not take the per-patient ghost path"
    calls.clear()
    hooks, hooks_ledger = _train_by_patient(tmp_path, "hooks")
    assert not calls, "hooks mode must sum per-image gradients"
    assert ghost_ledger.history == hooks_ledger.history and ghost_ledger.steps_done > 0
    initial = tiny_batch()[0].state_dict()
    moved = [name for name in hooks if not torch.equal(hooks[name], initial[name])]
    assert moved, "training changed nothing"
    for name in hooks:
        torch.testing.assert_close(ghost[name], hooks[name], rtol=1e-4, atol=1e-5, msg=name)
