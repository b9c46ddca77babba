"""Prototype (benchmark only): ghost clipping whose first backward pass skips parameter gradients.

Opacus 1.6's ghost clipping (``DPTensorFastGradientClipping.backward``) runs two backward
passes: the first, ``loss.mean().backward()``, only exists so that the layer hooks see each
layer's output gradient and compute the per-sample gradient norms, yet it also computes every
trainable parameter's gradient, which Opacus then throws away (``optimizer.zero_grad()``). The
second pass, on the clipping-weighted loss, computes the gradients that are kept.

This prototype makes the first pass ``torch.autograd.grad(loss, inputs=<the tail's inputs>)``:
autograd then only propagates input gradients through the layers (a convolution's backward
skips its weight-gradient half), the hooks still see every output gradient, and the norms are
the same numbers. The second pass is ``backward(inputs=<trainable parameters>)`` so that no
input gradient is computed there. Nothing else changes (clipping, noise, accounting).

It is installed by monkeypatching Opacus inside a benchmark worker process only
(:func:`fast_first_pass`), with a forward pre-hook on the tail (:func:`track_tail_inputs`) that
makes the tail's float inputs require gradients. If a hook did not fire in the first pass (a
trainable layer whose input does not depend on the tail's inputs, e.g. a learned position
embedding), the step raises instead of clipping with stale norms.

The equivalent production change is a few lines in ``client/local_training.py``; see the
benchmark report (``simulations/benchmark.py``) for the patch description.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from torch import nn

logger = logging.getLogger(__name__)


class _InputStash:
    """The float tensors the tail received in its latest forward call (made to require grad)."""

    def __init__(self) -> None:
        self.tensors: list[torch.Tensor] = []


_STASH = _InputStash()


def _make_leaf(value: object) -> object:
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel() > 0:
        leaf = value.detach().requires_grad_(True)
        _STASH.tensors.append(leaf)
        return leaf
    return value


def _pre_hook(_module: nn.Module, args: tuple[object, ...]) -> tuple[object, ...]:
    _STASH.tensors = []
    return tuple(_make_leaf(arg) for arg in args)


@contextlib.contextmanager
def track_tail_inputs(tail: nn.Module) -> Iterator[None]:
    """While active, the tail's float inputs become gradient-requiring leaves the first pass targets.

    Args:
        tail: the module Opacus wraps (``FedModel.tail(boundary)``).
    """
    handle = tail.register_forward_pre_hook(_pre_hook)
    try:
        yield
    finally:
        handle.remove()
        _STASH.tensors = []


def _fast_backward(self: DPTensorFastGradientClipping) -> None:
    """Drop-in for ``DPTensorFastGradientClipping.backward`` with a pruned first pass."""
    if self.loss_reduction == "mean":
        reduced_loss = torch.mean(self.loss_per_sample, dim=0)
    elif self.loss_reduction == "sum":
        reduced_loss = torch.sum(self.loss_per_sample, dim=0)
    else:
        raise ValueError(f"loss_reduction = {self.loss_reduction}; only 'sum' and 'mean' are supported")
    leaves = [t for t in _STASH.tensors if t.requires_grad]
    if not leaves:
        raise RuntimeError(
            "fast ghost prototype: the tail's inputs were not tracked; wrap the training call in "
            "simulations.bench_fast_ghost.track_tail_inputs(tail)"
        )
    torch.autograd.grad(reduced_loss, leaves, retain_graph=True, allow_unused=True)
    params = list(self.module.trainable_parameters)
    stale = [p for p in params if getattr(p, "_forward_counter", 0) != 0]
    if stale:
        raise RuntimeError(
            f"fast ghost prototype: {len(stale)} trainable parameter(s) got no per-sample norm in the "
            "first pass (their layer's input does not depend on the tail's inputs); use Opacus' stock "
            "two-pass backward for this model"
        )
    self.optimizer.zero_grad()
    coeff = self.module.get_clipping_coef()
    second_loss = torch.sum(coeff.to(self.loss_per_sample.device) * self.loss_per_sample)
    self.module.disable_hooks()
    try:
        second_loss.backward(inputs=params)
    finally:
        self.module.enable_hooks()


@contextlib.contextmanager
def fast_first_pass() -> Iterator[None]:
    """Monkeypatch Opacus' ghost-clipping backward with :func:`_fast_backward` while active."""
    original = DPTensorFastGradientClipping.backward
    DPTensorFastGradientClipping.backward = _fast_backward  # type: ignore[method-assign]
    try:
        yield
    finally:
        DPTensorFastGradientClipping.backward = original  # type: ignore[method-assign]
