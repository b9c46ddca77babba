"""Ghost-clipping backward whose first pass computes no parameter gradients.

Opacus 1.6's ghost clipping (``DPTensorFastGradientClipping.backward``) runs two backward
passes. The first, on the batch-reduced loss, exists only so that Opacus' layer hooks see each
trainable layer's output gradient and compute the per-sample gradient norms; autograd also
computes every parameter gradient there, and Opacus throws it away (``optimizer.zero_grad()``).
The second pass, on ``sum_i c_i * loss_i`` with the clipping coefficients ``c_i`` and the hooks
off, computes the gradients that are kept.

:func:`ghost_clipped_backward` does the same with a pruned first pass:
``torch.autograd.grad(reduced_loss, <the tail's input leaves>)``. Autograd then propagates only
the gradients that lead to the inputs, every trainable layer's backward hook still sees its
output gradient (so the norms are the same numbers), and no layer computes its weight gradient.
The second pass is ``backward(inputs=<trainable parameters>)``, so it computes no gradient for
the inputs. The result is what Opacus' backward leaves: ``p.grad = sum_i c_i * grad_i(p)`` for
every trainable parameter, ready for ``DPOptimizerFastGradientClipping.pre_step``/``step``
(which adds the noise and, for ``loss_reduction="mean"``, divides by the expected batch size).

The pruning relies on every trainable layer's output depending on the inputs passed as
``input_leaves``. A layer whose output does not (a learned position embedding added to the
sequence, a branch fed by a tensor that is not among the leaves) gets no per-sample norm in the
first pass; the function then raises :class:`GhostClippingError` instead of clipping with a
stale norm.

When every trainable layer is an ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` or a BatchNorm adapter
(``common.models.opacus_compat.ChannelAffine``),
:class:`DirectWeightGradients` replaces the second pass: it keeps each layer's input and output
gradient from the first pass, and the clipped summed weight gradient of a layer is one
weight-gradient product of that input with the output gradient scaled per sample by the
clipping coefficient (the second pass's output gradient is exactly that, as samples do not
interact), so no gradient is propagated a second time through the layers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from opacus.utils.module_utils import trainable_parameters
from torch import nn
from torch.utils.hooks import RemovableHandle

from common.models.opacus_compat import ChannelAffine

logger = logging.getLogger(__name__)


class GhostClippingError(RuntimeError):
    """The pruned ghost-clipping backward cannot clip this model or this call correctly."""


_DIRECT_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)
"""Layers whose clipped weight gradient :class:`DirectWeightGradients` computes itself (exact
types: a subclass may compute something else in its forward)."""


def _direct_layer_supported(layer: nn.Module) -> bool:
    if type(layer) is ChannelAffine:
        return True
    if type(layer) not in _DIRECT_LAYER_TYPES:
        return False
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        return layer.padding_mode == "zeros" and not isinstance(layer.padding, str) and not layer.transposed
    return True


@dataclass
class _LayerCapture:
    """One layer's input and output gradient of the latest forward / first backward pass."""

    layer: nn.Module
    inputs: torch.Tensor | None = None
    output_grad: torch.Tensor | None = None
    forwards: int = 0
    handles: list[RemovableHandle] = field(default_factory=list)

    def clear(self) -> None:
        self.inputs = None
        self.output_grad = None
        self.forwards = 0


class DirectWeightGradients:
    """Clipped summed weight gradients straight from the first pass's activations and output gradients.

    Attach it to the module Opacus wraps with :meth:`attach` (it declines, returning None, when
    some trainable parameter does not sit directly in a supported layer), pass it to
    :func:`ghost_clipped_backward`, and :meth:`close` it when training ends (it removes its hooks).
    Its hooks keep, in training mode with gradients on, each supported layer's input and the
    gradient of its output; they hold references to tensors the autograd graph keeps anyway.
    """

    def __init__(self, captures: dict[str, _LayerCapture]) -> None:
        self._captures = captures

    @classmethod
    def attach(cls, module: nn.Module) -> DirectWeightGradients | None:
        """Hook every layer holding trainable parameters, or return None where one is not supported.

        Args:
            module: the tail before or after Opacus wrapped it (the layers are the same objects).
        """
        captures: dict[str, _LayerCapture] = {}
        for name, layer in module.named_modules():
            own = [p for p in layer.parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            if not _direct_layer_supported(layer):
                logger.debug("direct weight gradients off: layer %s (%s) is not supported", name, type(layer).__name__)
                return None
            captures[name] = _LayerCapture(layer)
        if not captures:
            return None
        direct = cls(captures)
        for capture in captures.values():
            capture.handles.append(capture.layer.register_forward_hook(direct._forward_hook(capture)))
        return direct

    @staticmethod
    def _forward_hook(capture: _LayerCapture):  # noqa: ANN205 - a torch forward hook
        def hook(layer: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if not (layer.training and torch.is_grad_enabled() and output.requires_grad):
                return
            capture.forwards += 1
            if not args or not isinstance(args[0], torch.Tensor):  # called with keywords: not captured
                capture.inputs = None
                return
            capture.inputs = args[0].detach()

            def keep_output_grad(grad: torch.Tensor) -> None:
                capture.output_grad = grad.detach()

            output.register_hook(keep_output_grad)

        return hook

    def clear(self) -> None:
        """Forget what the latest step captured (:func:`ghost_clipped_backward` does it when done)."""
        for capture in self._captures.values():
            capture.clear()

    def captured_forward(self) -> bool:
        """Whether every hooked layer ran exactly once in the latest forward."""
        return all(capture.forwards == 1 and capture.inputs is not None for capture in self._captures.values())

    def captured(self) -> list[tuple[nn.Module, torch.Tensor, torch.Tensor]]:
        """``(layer, input, output gradient)`` of every hooked layer from the latest forward and first pass.

        Raises:
            GhostClippingError: a layer's output gradient is missing (see :meth:`accumulate_clipped_gradients`).
        """
        self._require_output_grads()
        return [(c.layer, c.inputs, c.output_grad) for c in self._captures.values()]  # type: ignore[misc]

    def _require_output_grads(self) -> None:
        missing = [name for name, capture in self._captures.items() if capture.output_grad is None]
        if missing:
            raise GhostClippingError(
                f"direct weight gradients: layer(s) {', '.join(missing[:8])} got no output gradient in the first "
                'pass; set privacy.grad_sample_mode = "hooks" for this model'
            )

    def accumulate_clipped_gradients(self, scale: torch.Tensor) -> None:
        """Add ``sum_i scale_i * grad_i`` of every hooked layer's parameters to their ``.grad``.

        Args:
            scale: per-sample factor ``(n,)`` applied to the first pass's output gradients (the
                clipping coefficient, times the batch size when that pass averaged the loss).

        Raises:
            GhostClippingError: a layer's output gradient is missing (its output did not lead
                to the loss through the inputs the first pass differentiated).
        """
        self._require_output_grads()
        with torch.no_grad():
            for capture in self._captures.values():
                assert capture.inputs is not None and capture.output_grad is not None
                grad_out = capture.output_grad
                grad_out = grad_out * scale.to(grad_out.dtype).view(-1, *([1] * (grad_out.dim() - 1)))
                if isinstance(capture.layer, ChannelAffine):
                    layer = capture.layer
                    if layer.scale.requires_grad:
                        _accumulate(layer.scale, (capture.inputs.to(grad_out.dtype) * grad_out).sum(dim=(0, 2, 3)))
                    if layer.shift.requires_grad:
                        _accumulate(layer.shift, grad_out.sum(dim=(0, 2, 3)))
                    capture.clear()
                    continue
                weight_grad, bias_grad = _weight_and_bias_gradients(capture.layer, capture.inputs, grad_out)
                _accumulate(capture.layer.weight, weight_grad)
                if capture.layer.bias is not None and bias_grad is not None:
                    _accumulate(capture.layer.bias, bias_grad)
                capture.clear()

    def close(self) -> None:
        """Remove the hooks and drop the captured tensors."""
        for capture in self._captures.values():
            for handle in capture.handles:
                handle.remove()
            capture.handles.clear()
            capture.clear()


class TrainableInputLeaves:
    """Makes the inputs of the first trainable layers the leaves the pruned first pass differentiates to.

    A forward pre-hook on every layer that holds trainable parameters replaces each floating-point
    positional input that does not already require gradients (it comes from frozen layers, the
    cached trunk or the clinical values) by a detached copy that does, and records it. Inputs
    produced by earlier trainable layers are left alone. So the first pass propagates exactly as
    far down as the trainable layers, like Opacus' stock backward: a frozen block inside the tail
    (``layer4.0`` when only ``layer4.1`` is shared) or a frozen trunk the tail still runs (no trunk
    cache) costs its forward only. Values are unchanged, so are the activations Opacus captures.

    Use :meth:`attach` on the tail, :meth:`start_batch` before each forward, :meth:`leaves` for
    :func:`ghost_clipped_backward`, and :meth:`close` at the end.
    """

    def __init__(self) -> None:
        self._leaves: list[torch.Tensor] = []
        self._handles: list[RemovableHandle] = []

    @classmethod
    def attach(cls, module: nn.Module) -> TrainableInputLeaves:
        """Hook every submodule of ``module`` that has trainable parameters of its own."""
        tracker = cls()
        for layer in module.modules():
            if any(p.requires_grad for p in layer.parameters(recurse=False)):
                tracker._handles.append(layer.register_forward_pre_hook(tracker._pre_hook))
        return tracker

    def _pre_hook(self, layer: nn.Module, args: tuple[object, ...]) -> tuple[object, ...] | None:
        if not (layer.training and torch.is_grad_enabled()):
            return None
        changed = False
        new_args = []
        for arg in args:
            if isinstance(arg, torch.Tensor) and arg.is_floating_point() and not arg.requires_grad and arg.numel():
                arg = arg.detach().requires_grad_(True)
                self._leaves.append(arg)
                changed = True
            new_args.append(arg)
        return tuple(new_args) if changed else None

    def start_batch(self) -> None:
        """Forget the previous batch's leaves (call before each forward)."""
        self._leaves = []

    def leaves(self) -> list[torch.Tensor]:
        """The leaves the latest forward made."""
        return list(self._leaves)

    def close(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._leaves = []


def _weight_and_bias_gradients(
    layer: nn.Module, inputs: torch.Tensor, grad_out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight (and bias) gradient of ``layer`` for ``inputs`` and output gradient ``grad_out``."""
    if isinstance(layer, nn.Linear):
        flat_out = grad_out.reshape(-1, grad_out.shape[-1])
        weight_grad = flat_out.t().mm(inputs.reshape(-1, inputs.shape[-1]).to(flat_out.dtype))
        bias_grad = flat_out.sum(dim=0) if layer.bias is not None else None
        return weight_grad, bias_grad
    assert isinstance(layer, (nn.Conv1d, nn.Conv2d))
    has_bias = layer.bias is not None
    _, weight_grad, bias_grad = torch.ops.aten.convolution_backward(
        grad_out,
        inputs.to(grad_out.dtype),
        layer.weight,
        [layer.out_channels] if has_bias else None,
        list(layer.stride),
        list(layer.padding),
        list(layer.dilation),
        False,
        [0] * len(layer.stride),
        layer.groups,
        [False, True, has_bias],
    )
    return weight_grad, bias_grad if has_bias else None


def _accumulate(param: nn.Parameter, grad: torch.Tensor) -> None:
    grad = grad.to(param.dtype)
    if param.grad is None:
        param.grad = grad
    else:
        param.grad.add_(grad)


def reduced_loss(loss: DPTensorFastGradientClipping) -> torch.Tensor:
    """The batch loss of Opacus' first pass: mean or sum of the per-sample losses."""
    if loss.loss_reduction == "mean":
        return torch.mean(loss.loss_per_sample, dim=0)
    if loss.loss_reduction == "sum":
        return torch.sum(loss.loss_per_sample, dim=0)
    raise GhostClippingError(
        f"loss_reduction = {loss.loss_reduction!r} is not supported by ghost clipping; "
        "make_private(..., loss_reduction=) must be 'mean' or 'sum'"
    )


def ghost_clipped_backward(
    loss: DPTensorFastGradientClipping,
    dp_module: GradSampleModuleFastGradientClipping,
    input_leaves: Sequence[torch.Tensor],
    direct: DirectWeightGradients | None = None,
) -> None:
    """Opacus' two-pass ghost-clipping backward, with a first pass that skips parameter gradients.

    After the call every trainable parameter ``p`` of ``dp_module`` holds in ``p.grad`` the sum
    over the batch of its per-sample gradients, each sample scaled by the clipping coefficient
    ``min(1, max_grad_norm / (||g_i|| + 1e-6))`` of its whole gradient: what ``loss.backward()``
    leaves in ghost mode (the same numbers with the second pass; equal to float rounding with
    ``direct``); the DP optimizer's ``step()`` then adds noise and
    scales. ``dp_module.per_sample_gradient_norms`` holds this batch's norms.

    Args:
        loss: what the criterion returned by ``PrivacyEngine.make_private(...,
            grad_sample_mode="ghost")`` gave for this batch.
        dp_module: the module ``make_private`` returned (the one whose forward produced ``loss``).
        input_leaves: the tensors the forward started from that every trainable layer's output
            depends on (the cached trunk features and, when present, the clinical values), each
            made to require gradients before the forward (``x.detach().requires_grad_(True)``).
            Their ``.grad`` is left untouched.
        direct: the :class:`DirectWeightGradients` attached to ``dp_module``'s layers, to skip
            the second pass; None (or a forward it did not capture completely) runs the second
            pass.

    Raises:
        GhostClippingError: ``loss`` came from another module, no leaf requires gradients, the
            loss reduction is neither "mean" nor "sum", or a trainable parameter got no
            per-sample norm in the first pass (its layer's output does not depend on
            ``input_leaves``); the message names the parameters. Use
            ``privacy.grad_sample_mode = "hooks"`` for such a model.
    """
    try:
        _pruned_backward(loss, dp_module, input_leaves, direct)
    finally:
        if direct is not None:
            direct.clear()


def checked_leaves(loss: DPTensorFastGradientClipping, dp_module: GradSampleModuleFastGradientClipping,
                   input_leaves: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The leaves of ``input_leaves`` that require gradients, after checking ``loss`` came from ``dp_module``.

    Raises:
        GhostClippingError: another module computed ``loss``, or no leaf requires gradients.
    """
    if loss.module is not dp_module:
        raise GhostClippingError(
            "ghost_clipped_backward: the loss was computed by another module than dp_module; pass the "
            "module that make_private returned together with the loss of its criterion"
        )
    leaves = [t for t in input_leaves if t.requires_grad]
    if not leaves:
        raise GhostClippingError(
            "ghost_clipped_backward: none of input_leaves requires gradients; before the forward make the "
            "tail's float inputs leaves with x = x.detach().requires_grad_(True)"
        )
    return leaves


def _pruned_backward(
    loss: DPTensorFastGradientClipping,
    dp_module: GradSampleModuleFastGradientClipping,
    input_leaves: Sequence[torch.Tensor],
    direct: DirectWeightGradients | None,
) -> None:
    leaves = checked_leaves(loss, dp_module, input_leaves)
    first_loss = reduced_loss(loss)
    named_params = list(trainable_parameters(dp_module._module))
    for _name, param in named_params:
        param._norm_sample = None  # a norm left from an earlier batch must not pass for this one's

    use_direct = direct is not None and direct.captured_forward()
    if direct is not None and not use_direct:
        logger.debug("direct weight gradients: the forward was not captured completely; running the second pass")
    # Pass 1: input gradients only; the layer hooks compute the per-sample norms on the way.
    torch.autograd.grad(first_loss, leaves, retain_graph=not use_direct, allow_unused=True)
    missing = [
        name
        for name, param in named_params
        if getattr(param, "_forward_counter", 0) != 0 or getattr(param, "_norm_sample", None) is None
    ]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise GhostClippingError(
            f"fast ghost clipping: {len(missing)} trainable parameter(s) got no per-sample gradient norm in "
            f"the first backward pass: {shown}. Their layer's output does not depend on the tail's inputs "
            "(or the layer did not run in this forward), so the pruned first pass never reaches it. Set "
            'privacy.grad_sample_mode = "hooks" in the configuration for this model, or freeze those '
            "parameters."
        )

    loss.optimizer.zero_grad()
    coeff = dp_module.get_clipping_coef()
    if use_direct:
        assert direct is not None
        batch = loss.loss_per_sample.shape[0]
        scale = coeff * batch if loss.loss_reduction == "mean" else coeff
        direct.accumulate_clipped_gradients(scale)
        return

    # Pass 2: the clipping-weighted loss, parameter gradients only, hooks off (as Opacus does).
    second_loss = torch.sum(coeff.to(loss.loss_per_sample.device) * loss.loss_per_sample)
    dp_module.disable_hooks()
    try:
        second_loss.backward(inputs=[param for _name, param in named_params])
    finally:
        dp_module.enable_hooks()
