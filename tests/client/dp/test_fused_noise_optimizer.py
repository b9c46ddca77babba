"""The fused noise step gives bit-for-bit Opacus' noised gradients, step after step."""

from __future__ import annotations

import pytest
import torch
from opacus.optimizers import DPOptimizerFastGradientClipping
from torch import nn

from client.dp.fused_noise_optimizer import FusedNoiseGhostOptimizer, use_fused_noise


def noised_gradients(fused: bool, steps: int, std_multiplier: float = 0.9) -> list[list[torch.Tensor]]:
    """Run ``steps`` DP optimizer steps on fixed clipped sums; the p.grad after each pre_step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    optimizer = DPOptimizerFastGradientClipping(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), noise_multiplier=std_multiplier,
        max_grad_norm=1.3, expected_batch_size=16, loss_reduction="mean",
        generator=torch.Generator().manual_seed(42),
    )
    if fused:
        use_fused_noise(optimizer)
    sums = torch.Generator().manual_seed(7)
    seen = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=sums)  # what the ghost backward leaves: the clipped sum
        optimizer.step()
        seen.append([p.grad.clone() for p in model.parameters()] + [p.detach().clone() for p in model.parameters()])
    return seen


@pytest.mark.parametrize("std_multiplier", [0.9, 0.0])
def test_noised_gradients_and_weights_are_bit_identical_to_opacus(std_multiplier: float) -> None:
    stock = noised_gradients(False, steps=3, std_multiplier=std_multiplier)
    fused = noised_gradients(True, steps=3, std_multiplier=std_multiplier)
    for step, (a, b) in enumerate(zip(stock, fused)):
        for x, y in zip(a, b):
            assert torch.equal(x, y), f"step {step}"


def test_noise_is_really_added() -> None:
    with_noise = noised_gradients(True, steps=1)[0]
    without = noised_gradients(True, steps=1, std_multiplier=0.0)[0]
    assert not torch.equal(with_noise[0], without[0])


def test_gradients_not_cleared_between_steps_are_refused_as_in_opacus() -> None:
    model = nn.Linear(3, 2)
    optimizer = use_fused_noise(DPOptimizerFastGradientClipping(
        torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
        expected_batch_size=4, loss_reduction="sum"))
    assert isinstance(optimizer, FusedNoiseGhostOptimizer)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    with pytest.raises(ValueError, match="haven't been cleared"):
        optimizer.step()


def test_only_the_ghost_optimizer_is_switched() -> None:
    plain = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    assert type(use_fused_noise(plain)) is torch.optim.SGD
