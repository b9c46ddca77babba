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
layer is one of them. ``client.dp.ghost_clipping`` uses it to clip each patient's summed gradient in
the same single backward pass that image-level ghost clipping uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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
