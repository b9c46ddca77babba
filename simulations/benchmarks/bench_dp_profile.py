"""Where a DP-SGD step of fedtl's tail spends its time (one batch of cached trunk features).

Times, as medians over repeated steps of the same batch, the phases of:

* a non-private step: forward, backward, optimizer step;
* an Opacus ghost-clipping step with Opacus' stock backward (``ghost_stock``): forward, first
  backward (the layer hooks compute per-sample norms; autograd also computes parameter
  gradients that Opacus discards), second backward (the clipping-weighted loss), the DP
  optimizer's pre-step (clip bookkeeping, noise, scaling) and the parameter update; the time
  spent inside the norm samplers (``GradSampleModuleFastGradientClipping.NORM_SAMPLERS``) is
  measured separately, as part of the first backward;
* the step as ``client.dp.local_training.train_tail`` runs it (``ghost_shipping``): the same with
  ``client.dp.ghost_clipping.ghost_clipped_backward``, whose first pass computes input gradients
  only and which, for a tail of convolutions and linear layers, computes the clipped weight
  gradients directly instead of a second pass (``DirectWeightGradients``), timed as a whole
  (``backward_both_passes``), and the noise step of ``client.dp.fused_noise_optimizer``.

Run inside a benchmark worker process (``simulations.benchmarks.bench_training``); see
:func:`profile_dp_step`.
"""

from __future__ import annotations

import contextlib
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.dp.fused_noise_optimizer import use_fused_noise
from client.dp.ghost_clipping import DirectWeightGradients, ghost_clipped_backward


class _PhaseClock:
    """Accumulates wall time per named phase for the current step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.current: dict[str, float] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        yield
        self._sync()
        self.current[name] = self.current.get(name, 0.0) + time.perf_counter() - start


@contextlib.contextmanager
def _timed_norm_samplers(clock: _PhaseClock) -> Iterator[None]:
    """Wrap every registered ghost norm sampler so its time adds to the phase ``norm_samplers``."""
    registry = GradSampleModuleFastGradientClipping.NORM_SAMPLERS
    originals = dict(registry)

    def wrap(function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            with clock.phase("norm_samplers"):
                return function(*args, **kwargs)

        return timed

    for layer_type, function in originals.items():
        registry[layer_type] = wrap(function)
    try:
        yield
    finally:
        registry.clear()
        registry.update(originals)


def _medians(samples: list[dict[str, float]]) -> dict[str, float]:
    names = sorted({name for sample in samples for name in sample})
    return {name: round(1000 * statistics.median(s.get(name, 0.0) for s in samples), 2) for name in names}


class _NonPrivateStep:
    """A plain SGD step on its own copy of the tail."""

    def __init__(self, tail: nn.Module) -> None:
        self.tail = tail
        self.optimizer = torch.optim.SGD([p for p in tail.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
        self.criterion = nn.CrossEntropyLoss()

    def __call__(self, batch: torch.Tensor, clinical: torch.Tensor, target: torch.Tensor, clock: _PhaseClock) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with clock.phase("forward"):
            loss = self.criterion(self.tail(batch, clinical), target)
        with clock.phase("backward"):
            loss.backward()
        with clock.phase("optimizer_step"):
            self.optimizer.step()

    def close(self) -> None:
        """Nothing to release."""


class _GhostStep:
    """An Opacus ghost-clipping step (stock or shipping backward) on its own copy of the tail."""

    def __init__(self, tail: nn.Module, batch: torch.Tensor, clinical: torch.Tensor, target: torch.Tensor,
                 max_grad_norm: float, shipping: bool) -> None:
        self.tail = tail
        self.shipping = shipping
        optimizer = torch.optim.SGD([p for p in tail.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
        loader = DataLoader(TensorDataset(batch.cpu(), clinical.cpu(), target.cpu()), batch_size=len(batch))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.dp_module, self.dp_optimizer, self.criterion, _ = PrivacyEngine().make_private(
                module=tail, optimizer=optimizer, criterion=nn.CrossEntropyLoss(), data_loader=loader,
                noise_multiplier=1.0, max_grad_norm=max_grad_norm, poisson_sampling=False,
                grad_sample_mode="ghost",
            )
        if shipping:
            self.dp_optimizer = use_fused_noise(self.dp_optimizer)
        self.direct = DirectWeightGradients.attach(tail) if shipping else None

    def __call__(self, batch: torch.Tensor, clinical: torch.Tensor, target: torch.Tensor, clock: _PhaseClock) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.dp_optimizer.zero_grad(set_to_none=True)
            with clock.phase("forward"):
                if self.shipping:
                    batch = batch.detach().requires_grad_(True)  # as train_tail makes its inputs leaves
                loss = self.criterion(self.dp_module(batch, clinical), target)
            with clock.phase("backward_both_passes"):
                if self.shipping:
                    ghost_clipped_backward(loss, self.dp_module, [batch], self.direct)
                else:
                    _stock_two_pass_backward(loss, self.dp_module, clock)
            with clock.phase("dp_pre_step_clip_noise"):
                self.dp_optimizer.pre_step()
            with clock.phase("optimizer_step"):
                self.dp_optimizer.original_optimizer.step()

    def close(self) -> None:
        """Remove the Opacus hooks (and the direct-gradient hooks)."""
        if self.direct is not None:
            self.direct.close()
        self.dp_module._close()


def _stock_two_pass_backward(loss: Any, dp_module: Any, clock: _PhaseClock) -> None:
    """Opacus' stock ghost backward (``DPTensorFastGradientClipping.backward``), each pass timed."""
    reduced = torch.mean(loss.loss_per_sample, dim=0)
    params = list(dp_module.trainable_parameters)
    with clock.phase("first_backward"):
        reduced.backward(retain_graph=True)
    for p in params:
        p.grad = None
    with clock.phase("clipping_coefficients"):
        coeff = dp_module.get_clipping_coef()
    second = torch.sum(coeff * loss.loss_per_sample)
    dp_module.disable_hooks()
    try:
        with clock.phase("second_backward"):
            second.backward()
    finally:
        dp_module.enable_hooks()


def profile_dp_step(tail_factory: Callable[[], nn.Module], features: torch.Tensor, labels: torch.Tensor,
                    *, batch_size: int, max_grad_norm: float, device: torch.device,
                    repeats: int = 5) -> dict[str, Any]:
    """Median milliseconds per phase of a non-private, a stock ghost and a shipping ghost step.

    The three variants run round-robin (one step each per repeat) on independent copies of the
    tail, so that load from other processes hits them alike.

    Args:
        tail_factory: returns a fresh, independent tail module (trainable parameters set), e.g.
            ``lambda: copy.deepcopy(model.tail(boundary))``.
        features: cached trunk outputs; the first ``batch_size`` are used.
        labels: their labels.
        batch_size: images in the profiled batch.
        max_grad_norm: clipping bound.
        device: where to run.
        repeats: timed steps per variant (after one warm-up step each).
    """
    batch = features[:batch_size].to(device)
    target = labels[:batch_size].to(device)
    clinical = torch.zeros(len(batch), 0, device=device)
    clock = _PhaseClock(device)
    steps: dict[str, Any] = {
        "nonprivate": _NonPrivateStep(tail_factory().to(device).train()),
        "ghost_stock": _GhostStep(tail_factory().to(device).train(), batch, clinical, target, max_grad_norm,
                                  shipping=False),
        "ghost_shipping": _GhostStep(tail_factory().to(device).train(), batch, clinical, target, max_grad_norm,
                                     shipping=True),
    }
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in steps}
    try:
        with _timed_norm_samplers(clock):
            for index in range(repeats + 1):
                for name, step in steps.items():
                    clock.current = {}
                    step(batch, clinical, target, clock)
                    if index > 0:  # the first round warms up
                        samples[name].append(clock.current)
    finally:
        for step in steps.values():
            step.close()
    figures: dict[str, Any] = {"batch_size": len(batch), "repeats": repeats, "unit": "ms (median)"}
    top = ("forward", "backward", "backward_both_passes", "dp_pre_step_clip_noise", "optimizer_step")
    for name, runs in samples.items():
        phases = _medians(runs)
        phases["step_total"] = round(statistics.median(sum(run.get(k, 0.0) for k in top) for run in runs) * 1000, 2)
        if "first_backward" in phases:
            phases["first_pass_without_norm_samplers"] = round(
                phases["first_backward"] - phases.get("norm_samplers", 0.0), 2
            )
        figures[name] = phases
    return figures
