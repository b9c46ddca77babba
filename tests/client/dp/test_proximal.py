"""Specification of FedProx under DP: the proximal pull acts with DP on and off."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizerFastGradientClipping
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.dp.proximal import add_proximal_gradient, dp_step_with_proximal

LR = 0.001
MU = 100.0
OFFSET = 5.0  # local weights start this far from the global ones, in every coordinate
BATCH = 16


@pytest.fixture(autouse=True)
def _quiet_opacus_warnings() -> None:
    warnings.filterwarnings("ignore", module="opacus")
    warnings.filterwarnings("ignore", message=".*Full backward hook.*")


def _data() -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(64, 4, generator=generator)
    labels = torch.randint(0, 2, (64,), generator=generator)
    return TensorDataset(features, labels)


def _model_far_from_global() -> tuple[nn.Linear, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    global_weights = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    with torch.no_grad():
        for param in model.parameters():
            param.add_(OFFSET)
    return model, global_weights


def _private(
    model: nn.Module, *, noise: float, mode: str = "hooks"
) -> tuple[nn.Module, torch.optim.Optimizer, nn.Module, DataLoader, PrivacyEngine]:
    engine = PrivacyEngine(accountant="rdp")
    criterion = nn.CrossEntropyLoss()
    made = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        criterion=criterion,
        data_loader=DataLoader(_data(), batch_size=BATCH),
        noise_multiplier=noise,
        max_grad_norm=1.0,
        poisson_sampling=False,  # same batch for both arms of a comparison
        grad_sample_mode=mode,
        noise_generator=torch.Generator().manual_seed(1),
    )
    if mode == "ghost":
        private_model, optimizer, criterion, loader = made
    else:
        private_model, optimizer, loader = made
    return private_model, optimizer, criterion, loader, engine


def _first_batch(loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    return next(iter(loader))


def _weights(model: nn.Module) -> torch.Tensor:
    return torch.cat([param.detach().reshape(-1) for param in model.parameters()])


def _one_private_step(
    mu: float, *, noise: float = 0.0, mode: str = "hooks"
) -> tuple[torch.Tensor, PrivacyEngine]:
    model, global_weights = _model_far_from_global()
    private_model, optimizer, criterion, loader, engine = _private(model, noise=noise, mode=mode)
    features, labels = _first_batch(loader)
    optimizer.zero_grad()
    criterion(private_model(features), labels).backward()
    stepped = dp_step_with_proximal(optimizer, private_model.named_parameters(), global_weights, mu)
    assert stepped
    return _weights(private_model), engine


def test_without_dp_the_step_adds_mu_times_distance_to_the_gradient() -> None:
    model, global_weights = _model_far_from_global()
    reference = copy.deepcopy(model)
    features, labels = _data().tensors
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    nn.functional.cross_entropy(model(features), labels).backward()
    dp_step_with_proximal(optimizer, model.named_parameters(), global_weights, MU)

    nn.functional.cross_entropy(reference(features), labels).backward()
    expected = [
        param.detach() - LR * (param.grad + MU * (param.detach() - global_weights[name]))
        for name, param in reference.named_parameters()
    ]
    for (name, param), want in zip(model.named_parameters(), expected):
        assert torch.allclose(param.detach(), want, atol=1e-6), name


def test_with_dp_the_proximal_step_moves_weights_toward_global_by_lr_mu_distance() -> None:
    with_prox, engine = _one_private_step(MU)
    without_prox, _ = _one_private_step(0.0)
    pull = without_prox - with_prox  # the same data gradient and (zero) noise in both arms
    assert torch.allclose(pull, torch.full_like(pull, LR * MU * OFFSET), atol=1e-5)
    assert engine.accountant.history == [(0.0, 1 / 4, 1)], "exactly one accounted DP step"


def test_with_dp_and_noise_the_pull_dominates_a_far_away_model() -> None:
    model, global_weights = _model_far_from_global()
    start = _weights(model).clone()
    moved, _ = _one_private_step(MU, noise=1.0)
    toward_global = (start - moved).mean().item()
    assert toward_global == pytest.approx(LR * MU * OFFSET, rel=0.1)


def test_ghost_clipping_optimizer_gets_the_proximal_pull_too() -> None:
    model, _ = _model_far_from_global()
    _, optimizer, _, _, _ = _private(model, noise=0.0, mode="ghost")
    assert isinstance(optimizer, DPOptimizerFastGradientClipping)
    with_prox, _ = _one_private_step(MU, mode="ghost")
    without_prox, _ = _one_private_step(0.0, mode="ghost")
    pull = without_prox - with_prox
    assert torch.allclose(pull, torch.full_like(pull, LR * MU * OFFSET), atol=1e-5)


def test_contrast_a_proximal_term_added_to_the_loss_is_dropped_by_dp() -> None:
    """Documented pitfall: under DP the loss-side proximal term barely moves the weights."""
    model, global_weights = _model_far_from_global()
    start = _weights(model).clone()
    private_model, optimizer, criterion, loader, _ = _private(model, noise=0.0)
    features, labels = _first_batch(loader)
    optimizer.zero_grad()
    proximal_loss = sum(
        (param - global_weights[name.removeprefix("_module.")]).pow(2).sum()
        for name, param in private_model.named_parameters()
    )
    (criterion(private_model(features), labels) + MU / 2 * proximal_loss).backward()
    optimizer.step()
    largest_move = (start - _weights(private_model)).abs().max().item()
    assert largest_move < 0.01 * LR * MU * OFFSET  # only the clipped data gradient acted


def test_zero_mu_is_a_plain_step_and_frozen_parameters_are_left_alone() -> None:
    model, global_weights = _model_far_from_global()
    model.bias.requires_grad_(False)
    model.weight.grad = torch.zeros_like(model.weight)
    add_proximal_gradient(model.named_parameters(), global_weights, 0.0)
    assert torch.count_nonzero(model.weight.grad) == 0
    add_proximal_gradient(model.named_parameters(), global_weights, 2.0)
    assert torch.allclose(model.weight.grad, torch.full_like(model.weight, 2.0 * OFFSET))
    assert model.bias.grad is None


def test_a_shared_parameter_without_a_global_weight_is_named_in_the_error() -> None:
    model, global_weights = _model_far_from_global()
    del global_weights["bias"]
    with pytest.raises(KeyError, match="bias"):
        add_proximal_gradient(model.named_parameters(), global_weights, 1.0)


def test_a_skipped_opacus_step_does_not_update_the_weights() -> None:
    model, global_weights = _model_far_from_global()
    private_model, optimizer, criterion, loader, _ = _private(model, noise=0.0)
    before = _weights(private_model).clone()
    features, labels = _first_batch(loader)
    criterion(private_model(features), labels).backward()
    optimizer.signal_skip_step(do_skip=True)
    assert not dp_step_with_proximal(optimizer, private_model.named_parameters(), global_weights, MU)
    assert torch.equal(_weights(private_model), before)
