"""Per-patient gradient norms from one backward pass, without per-image gradients (group ghost norms).

Patient-level DP clips each patient's *summed* gradient ``G_g = sum_{i in g} grad_i``. Opacus'
per-sample modes materialise every image's gradient (``n x |params|`` values: 4.7 M per image for
ResNet-18's ``layer4.1``) only for ``client.dp.patient_sampling`` to add them up per patient. The
norm of ``G_g`` needs none of them. For a layer with input rows ``a_{i,t}`` and output-gradient rows
``b_{i,t}`` (``t`` the positions of a convolution's unfolded input, one row for a linear layer), the
weight gradient of patient ``g`` is ``sum_{i in g, t} a_{i,t}^T b_{i,t}``, so

    ||G_g||^2 = sum_{(i,t), (j,s) in g} (a_{i,t} . a_{j,s}) (b_{i,t} . b_{j,s})

(the ghost-norm identity with the patient's images as one sequence). Where the Gram products cost
more than the patient's gradient itself (``(|g| T)^2 (D + O) > |g| T D O``), the gradient is formed
once per patient instead. A bias adds ``||sum_{i,t} b_{i,t}||^2``; a per-channel scale/shift adapter
(``ChannelAffine``) has few values, so its per-image gradients are summed per patient directly.

:func:`layer_group_squared_norms` is exact (to float rounding) for ``nn.Linear``, ``nn.Conv2d`` with
``groups = 1`` and zero padding, and ``ChannelAffine``; :func:`supports_patient_norms` says whether a
layer is one of them. :func:`patient_clipped_backward` uses it to clip each patient's summed gradient in
the same single backward pass that image-level ghost clipping uses (``client.dp.ghost_clipping``'s first
pass and its direct weight gradients).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from torch import nn

from client.dp.ghost_clipping import DirectWeightGradients, GhostClippingError, checked_leaves, reduced_loss
from common.models.opacus_compat import ChannelAffine

_GRAM_ROWS_LIMIT = 4096
"""Largest number of rows (images x positions) of one batch whose Gram matrices are formed at once."""


def supports_patient_norms(layer: nn.Module) -> bool:
    """Whether :func:`layer_group_squared_norms` computes this layer's per-patient norms exactly."""
    if type(layer) in (nn.Linear, ChannelAffine):
        return True
    if type(layer) is nn.Conv2d:
        return layer.groups == 1 and layer.padding_mode == "zeros" and not isinstance(layer.padding, str)
    return False


def _rows(layer: nn.Module, inputs: torch.Tensor, output_grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n, T, D)`` input rows and ``(n, T, O)`` output-gradient rows of a linear or conv layer."""
    n = len(inputs)
    if isinstance(layer, nn.Conv2d):
        unfolded = F.unfold(inputs, layer.kernel_size, dilation=layer.dilation, padding=layer.padding,
                            stride=layer.stride)  # (n, C*kh*kw, T)
        return unfolded.transpose(1, 2), output_grad.reshape(n, output_grad.shape[1], -1).transpose(1, 2)
    return inputs.reshape(n, -1, inputs.shape[-1]), output_grad.reshape(n, -1, output_grad.shape[-1])


def layer_group_squared_norms(layer: nn.Module, inputs: torch.Tensor, output_grad: torch.Tensor,
                              group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``||sum_{i in g} grad_i(layer's parameters)||^2`` for every group ``g``, shape ``(num_groups,)``.

    Args:
        layer: a layer :func:`supports_patient_norms` accepts, every parameter of it trainable.
        inputs: the layer's input in the forward, ``(n, ...)``.
        output_grad: the gradient of the loss with respect to the layer's output, ``(n, ...)``;
            each sample's row is that sample's own gradient (samples do not interact).
        group: ``(n,)`` group index of each sample, in ``0 .. num_groups - 1``.
        num_groups: the number of groups.
    """
    if not supports_patient_norms(layer):
        raise TypeError(f"per-patient gradient norms are not implemented for {type(layer).__name__}")
    dtype = output_grad.dtype
    inputs = inputs.to(dtype)
    group = group.to(output_grad.device)
    squared = output_grad.new_zeros(num_groups)
    if isinstance(layer, ChannelAffine):
        if layer.scale.requires_grad:
            squared += _summed_by_group((inputs * output_grad).sum(dim=(2, 3)), group, num_groups).pow(2).sum(1)
        if layer.shift.requires_grad:
            squared += _summed_by_group(output_grad.sum(dim=(2, 3)), group, num_groups).pow(2).sum(1)
        return squared
    a, b = _rows(layer, inputs, output_grad)
    if layer.weight.requires_grad:
        squared += _weight_squared_norms(a, b, group, num_groups)
    if getattr(layer, "bias", None) is not None and layer.bias.requires_grad:
        squared += _summed_by_group(b.sum(dim=1), group, num_groups).pow(2).sum(1)
    return squared


def _summed_by_group(per_sample: torch.Tensor, group: torch.Tensor, num_groups: int) -> torch.Tensor:
    summed = per_sample.new_zeros((num_groups, *per_sample.shape[1:]))
    return summed.index_add_(0, group, per_sample)


def _weight_squared_norms(a: torch.Tensor, b: torch.Tensor, group: torch.Tensor, num_groups: int) -> torch.Tensor:
    n, positions, d = a.shape
    o = b.shape[-1]
    rows = n * positions
    if rows * (d + o) <= d * o and rows <= _GRAM_ROWS_LIMIT:  # Gram products of the whole batch, masked per group
        row_group = group.repeat_interleave(positions)
        flat_a, flat_b = a.reshape(rows, d), b.reshape(rows, o)
        same = row_group[:, None] == row_group[None, :]
        pair_terms = (flat_a @ flat_a.T) * (flat_b @ flat_b.T) * same
        return _summed_by_group(pair_terms.sum(dim=1), row_group, num_groups)
    squared = a.new_zeros(num_groups)
    for g in range(num_groups):
        members = (group == g).nonzero().flatten()
        if len(members) == 0:
            continue
        group_a = a[members].reshape(-1, d)
        group_b = b[members].reshape(-1, o)
        if len(group_a) * (d + o) <= d * o:
            squared[g] = ((group_a @ group_a.T) * (group_b @ group_b.T)).sum()
        else:
            squared[g] = (group_a.T @ group_b).pow(2).sum()
    return squared


def tail_supports_patient_norms(module: nn.Module) -> bool:
    """Whether every submodule of ``module`` that holds trainable parameters is one the per-patient norms cover."""
    layers = [layer for layer in module.modules() if any(p.requires_grad for p in layer.parameters(recurse=False))]
    return bool(layers) and all(supports_patient_norms(layer) for layer in layers)


def patient_clipped_backward(
    loss: DPTensorFastGradientClipping,
    dp_module: GradSampleModuleFastGradientClipping,
    input_leaves: Sequence[torch.Tensor],
    direct: DirectWeightGradients | None,
    groups: torch.Tensor,
) -> None:
    """One backward pass that clips each group's (patient's) *summed* gradient: patient-level DP-SGD.

    After the call every trainable parameter ``p`` holds in ``p.grad`` ``sum_g c_g sum_{i in g} grad_i(p)``
    with ``c_g = min(1, max_grad_norm / (||sum_{i in g} grad_i|| + 1e-6))``, ready for the DP optimizer's
    step, and ``dp_module.per_sample_gradient_norms`` holds the groups' norms. Opacus' own norm hooks are
    not needed (``dp_module.disable_hooks()``); the first pass and the weight gradients are
    ``client.dp.ghost_clipping``'s.

    Args:
        loss, dp_module, input_leaves, direct: as for ``client.dp.ghost_clipping.ghost_clipped_backward``.
        groups: ``(n,)`` one code per sample, equal for the images of one patient.

    Raises:
        GhostClippingError: ``direct`` is missing or did not capture every trainable layer exactly once,
            a layer has no exact patient norm, or ``groups`` does not match the batch.
    """
    try:
        leaves = checked_leaves(loss, dp_module, input_leaves)
        if direct is None or not direct.captured_forward():
            raise GhostClippingError(
                "ghost clipping per patient needs direct weight gradients of every trainable layer, each run once "
                'in the forward; set privacy.grad_sample_mode = "hooks" for this model'
            )
        batch = loss.loss_per_sample.shape[0]
        if len(groups) != batch:
            raise GhostClippingError(f"ghost clipping per patient: {len(groups)} group codes for {batch} samples")
        # The first pass: input gradients only; the captures keep each layer's output gradient on the way.
        torch.autograd.grad(reduced_loss(loss), leaves, allow_unused=True)
        captured = direct.captured()
        unsupported = [type(layer).__name__ for layer, _, _ in captured if not supports_patient_norms(layer)]
        if unsupported:
            raise GhostClippingError(
                f"ghost clipping per patient: no exact patient norm for {', '.join(sorted(set(unsupported)))}; "
                'set privacy.grad_sample_mode = "hooks" for this model'
            )
        _, group = torch.unique(groups, return_inverse=True)
        num_groups = int(group.max()) + 1
        grad_scale = batch if loss.loss_reduction == "mean" else 1  # the first pass averaged the loss
        with torch.no_grad():
            squared = sum(layer_group_squared_norms(layer, inputs, output_grad, group, num_groups)
                          for layer, inputs, output_grad in captured)
        assert isinstance(squared, torch.Tensor)
        norms = squared.sqrt() * grad_scale
        coeff = (dp_module.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        dp_module.per_sample_gradient_norms = norms
        loss.optimizer.zero_grad()
        direct.accumulate_clipped_gradients(coeff[group.to(coeff.device)] * grad_scale)
    finally:
        if direct is not None:
            direct.clear()
