"""FedProx's proximal term that survives differential privacy.

FedProx adds ``mu/2 * ||w - w_global||^2`` (over the shared layers) to each site's local loss.
Under DP-SGD that does not work as a loss term: the Opacus optimizer REPLACES ``p.grad`` by the
clipped, noised sum of per-sample gradients, and per-sample gradients are only computed for
layer outputs, so a loss term that no layer sees is silently dropped.

The proximal gradient ``mu * (w - w_global)`` depends only on the weights, not on any image,
so it can be added after privatisation at no privacy cost. The right order of one step is::

    optimizer.pre_step()            # Opacus: clip, noise, scale, accountant step hook
    add_proximal_gradient(...)      # p.grad += mu * (w - w_global)
    optimizer.original_optimizer.step()

:func:`dp_step_with_proximal` does exactly this for ``opacus.optimizers.DPOptimizer`` and its
subclasses (including ``DPOptimizerFastGradientClipping`` used by ``grad_sample_mode="ghost"``,
whose ``pre_step`` has the same contract), and a plain ``optimizer.step()`` with the proximal
gradient for a plain torch optimizer (DP off).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import torch
from opacus.optimizers import DPOptimizer
from torch import nn

logger = logging.getLogger(__name__)

# Opacus' GradSampleModule prefixes parameter names with this when it wraps a model.
_WRAPPER_PREFIX = "_module."


def add_proximal_gradient(
    params: Iterable[tuple[str, nn.Parameter]],
    global_weights: Mapping[str, torch.Tensor],
    mu: float,
) -> None:
    """Add ``mu * (w - w_global)`` to ``p.grad`` of every trainable shared parameter.

    Call it after the (DP) gradient is final and before the optimizer's update.

    Args:
        params: ``(name, parameter)`` pairs of the shared layers, e.g. a filtered
            ``model.named_parameters()``; names may carry Opacus' ``_module.`` prefix.
        global_weights: name -> the global weights received at the start of the round.
        mu: the proximal coefficient (``proximal-mu`` from the coordinator); 0 does nothing.
    """
    if mu < 0:
        raise ValueError(f"proximal mu must be >= 0, got {mu}")
    if mu == 0:
        return
    with torch.no_grad():
        for name, param in params:
            if not param.requires_grad:
                continue
            reference = _global_weight(global_weights, name)
            if reference.shape != param.shape:
                raise ValueError(
                    f"global weight {name!r} has shape {tuple(reference.shape)}, the local "
                    f"parameter has {tuple(param.shape)}; the site's model does not match the "
                    "coordinator's shared layers"
                )
            proximal = (param.detach() - reference.to(device=param.device, dtype=param.dtype)) * mu
            if param.grad is None:
                param.grad = proximal
            else:
                param.grad.add_(proximal)


def dp_step_with_proximal(
    optimizer: torch.optim.Optimizer,
    named_shared_params: Iterable[tuple[str, nn.Parameter]],
    global_weights: Mapping[str, torch.Tensor],
    mu: float,
) -> bool:
    """One optimizer step with the proximal gradient added where DP can not drop it.

    Use instead of ``optimizer.step()`` after ``loss.backward()`` (and do NOT add the
    proximal term to the loss).

    Args:
        optimizer: an Opacus ``DPOptimizer`` (any subclass, ghost clipping included) or a
            plain torch optimizer when DP is off.
        named_shared_params: ``(name, parameter)`` pairs of the shared layers.
        global_weights: name -> global weights at the start of the round.
        mu: the proximal coefficient; 0 makes this a plain step.

    Returns:
        ``True`` if the weights were updated, ``False`` if Opacus skipped the step (gradient
        accumulation via ``signal_skip_step``).
    """
    if isinstance(optimizer, DPOptimizer):
        if not optimizer.pre_step():  # clip + noise + scale + accountant hook
            return False
        add_proximal_gradient(named_shared_params, global_weights, mu)
        optimizer.original_optimizer.step()
        return True
    add_proximal_gradient(named_shared_params, global_weights, mu)
    optimizer.step()
    return True


def _global_weight(global_weights: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    if name in global_weights:
        return global_weights[name]
    stripped = name
    while stripped.startswith(_WRAPPER_PREFIX):
        stripped = stripped[len(_WRAPPER_PREFIX) :]
        if stripped in global_weights:
            return global_weights[stripped]
    raise KeyError(
        f"shared parameter {name!r} has no global weight (the coordinator sent "
        f"{len(global_weights)} tensors, e.g. {sorted(global_weights)[:3]}); pass only the shared "
        "layers' parameters, named as in the coordinator's state dict"
    )
