"""The pruned ghost-clipping backward clips exactly like Opacus and like the DP-SGD definition.

``client.dp.ghost_clipping.ghost_clipped_backward`` must leave in ``p.grad`` the sum over the batch
of every sample's gradient, clipped to ``max_grad_norm`` as a whole, the same numbers as Opacus'
stock ghost backward, for a tiny conv + linear tail with a clinical branch and for fedtl's real
resnet18 tail; it must refuse a model it cannot clip; and ``train_tail`` must keep its
accounting when it uses it.
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

import common.models.conv_norm_samplers  # noqa: F401 - the convolution norm samplers train_tail uses
from client.dp.ghost_clipping import (
    DirectWeightGradients,
    GhostClippingError,
    TrainableInputLeaves,
    ghost_clipped_backward,
)
from client.dp import local_training
from client.dp.local_training import train_tail
from client.privacy.privacy_budget import PrivacyLedger
from client.privacy.privacy_plan import sample_rate_for, steps_per_epoch
from common.models.backbones import build_backbone
from common.models.layer_policy import first_trainable_stage
from common.config import ModelConfig, PrivacyConfig, TrainingConfig
from common.models.layer_policy import apply_policy, default_policy

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class TinyTail(nn.Module):
    """Conv + pooled features fused with a clinical branch, then a linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, kernel_size=3, padding=1)
        self.clinical = nn.Linear(2, 3)
        self.classifier = nn.Linear(6 + 3, 3)

    def forward(self, h: torch.Tensor, clinical: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(F.relu(self.conv(h)), 1).flatten(1)
        return self.classifier(torch.cat([pooled, self.clinical(clinical)], dim=1))


class TailWithConstantBranch(nn.Module):
    """A trainable layer (``offset``) fed by a constant: its output does not depend on the inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Linear(4, 3)
        self.offset = nn.Linear(1, 3)

    def forward(self, h: torch.Tensor, clinical: torch.Tensor) -> torch.Tensor:
        return self.features(h) + self.offset(h.new_ones(len(h), 1))


def tiny_batch() -> tuple[TinyTail, Batch]:
    torch.manual_seed(0)
    return TinyTail(), (torch.randn(6, 4, 8, 8), torch.randn(6, 2), torch.tensor([0, 1, 2, 2, 1, 0]))


def resnet18_batch() -> tuple[nn.Module, Batch]:
    """fedtl's resnet18 tail under its default layer policy, on trunk features of 32x32 images."""
    torch.manual_seed(0)
    config = ModelConfig(architecture="resnet18", num_classes=2, in_channels=1, image_size=32,
                         clinical_features=["age"])
    model = build_backbone(config, load_weights=False)
    policy = default_policy("resnet18")
    apply_policy(model, policy)
    start = first_trainable_stage(model, policy)
    images, clinical = torch.randn(4, 1, 32, 32), torch.randn(4, 1)
    with torch.no_grad():
        features = model.forward_stages(images, 0, start)
    return model.tail(start).train(), (features, clinical, torch.tensor([0, 1, 1, 0]))


def clipped_sum_by_loop(tail: nn.Module, batch: Batch, max_grad_norm: float) -> dict[str, torch.Tensor]:
    """DP-SGD by definition: each sample's gradient, scaled by min(1, C / (||g|| + 1e-6)), summed."""
    h, clinical, labels = batch
    trainable = {name: p for name, p in tail.named_parameters() if p.requires_grad}
    total = {name: torch.zeros_like(p) for name, p in trainable.items()}
    for i in range(len(labels)):
        grads = torch.autograd.grad(
            F.cross_entropy(tail(h[i : i + 1], clinical[i : i + 1]), labels[i : i + 1]), list(trainable.values())
        )
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        scale = (max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
        for name, grad in zip(trainable, grads):
            total[name] += scale * grad
    return total


def per_sample_norms_by_loop(tail: nn.Module, batch: Batch) -> torch.Tensor:
    h, clinical, labels = batch
    trainable = [p for p in tail.parameters() if p.requires_grad]
    norms = []
    for i in range(len(labels)):
        grads = torch.autograd.grad(F.cross_entropy(tail(h[i : i + 1], clinical[i : i + 1]), labels[i : i + 1]),
                                    trainable)
        norms.append(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
    return torch.stack(norms)


def ghost_gradients(
    tail: nn.Module, batch: Batch, max_grad_norm: float, *, pruned: bool, loss_reduction: str = "mean",
    direct: bool = False, tracked: bool = False,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``p.grad`` after one ghost-clipping backward and the per-sample norms.

    ``pruned=False``: Opacus' stock backward; ``pruned=True``: ``ghost_clipped_backward`` with a
    second pass, or with ``direct=True`` with the weight gradients computed directly; ``tracked=True``
    takes the leaves from ``TrainableInputLeaves`` (as ``train_tail`` does) instead of the tail's inputs.
    """
    h, clinical, labels = batch
    trainable = {name: p for name, p in tail.named_parameters() if p.requires_grad}
    dp_module = GradSampleModuleFastGradientClipping(tail, max_grad_norm=max_grad_norm, loss_reduction=loss_reduction,
                                                     use_ghost_clipping=True)
    capture = DirectWeightGradients.attach(tail) if direct else None
    assert capture is not None or not direct, "direct weight gradients declined a conv/linear tail"
    tracker = TrainableInputLeaves.attach(tail) if tracked else None
    try:
        optimizer = DPOptimizerFastGradientClipping(
            torch.optim.SGD(list(trainable.values()), lr=0.1), noise_multiplier=0.0, max_grad_norm=max_grad_norm,
            expected_batch_size=len(labels), loss_reduction=loss_reduction,
        )
        criterion = DPLossFastGradientClipping(dp_module, optimizer, nn.CrossEntropyLoss(reduction=loss_reduction),
                                               loss_reduction)
        optimizer.zero_grad(set_to_none=True)
        if pruned and tracker is not None:
            tracker.start_batch()
            loss = criterion(dp_module(h, clinical), labels)
            ghost_clipped_backward(loss, dp_module, tracker.leaves(), capture)
        elif pruned:
            leaves = [h.detach().requires_grad_(True), clinical.detach().requires_grad_(True)]
            ghost_clipped_backward(criterion(dp_module(*leaves), labels), dp_module, leaves, capture)
            assert all(leaf.grad is None for leaf in leaves), "the pruned backward must not fill the inputs' .grad"
        else:
            criterion(dp_module(h, clinical), labels).backward()
        grads = {name: p.grad.detach().clone() for name, p in trainable.items()}
        norms = dp_module.per_sample_gradient_norms.detach().clone()
    finally:
        if capture is not None:
            capture.close()
        if tracker is not None:
            tracker.close()
        dp_module._close()
        for p in trainable.values():
            p.grad = None
    return grads, norms


def _assert_same_gradients(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rtol: float) -> None:
    assert set(actual) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=rtol, atol=rtol * float(value.abs().max()), msg=name)


def _clip_between_smallest_and_largest(tail: nn.Module, batch: Batch) -> float:
    """A clipping bound that clips some samples and leaves others whole."""
    return float(per_sample_norms_by_loop(tail, batch).median())


@pytest.mark.parametrize("make", [tiny_batch, resnet18_batch], ids=["conv_linear_tail", "resnet18_tail"])
@pytest.mark.parametrize("loss_reduction", ["mean", "sum"])
def test_pruned_backward_with_a_second_pass_gives_opacus_stock_ghost_gradients(make, loss_reduction: str) -> None:
    tail, batch = make()
    max_grad_norm = _clip_between_smallest_and_largest(tail, batch)
    stock, stock_norms = ghost_gradients(tail, batch, max_grad_norm, pruned=False, loss_reduction=loss_reduction)
    pruned, pruned_norms = ghost_gradients(tail, batch, max_grad_norm, pruned=True, loss_reduction=loss_reduction)
    torch.testing.assert_close(pruned_norms, stock_norms, rtol=1e-6, atol=1e-9)
    assert set(pruned) == set(stock)
    for name in stock:
        torch.testing.assert_close(pruned[name], stock[name], rtol=1e-6, atol=1e-9, msg=name)


@pytest.mark.parametrize("make", [tiny_batch, resnet18_batch], ids=["conv_linear_tail", "resnet18_tail"])
@pytest.mark.parametrize("loss_reduction", ["mean", "sum"])
def test_direct_weight_gradients_give_opacus_stock_ghost_gradients(make, loss_reduction: str) -> None:
    tail, batch = make()
    max_grad_norm = _clip_between_smallest_and_largest(tail, batch)
    stock, stock_norms = ghost_gradients(tail, batch, max_grad_norm, pruned=False, loss_reduction=loss_reduction)
    direct, direct_norms = ghost_gradients(tail, batch, max_grad_norm, pruned=True, loss_reduction=loss_reduction,
                                           direct=True)
    torch.testing.assert_close(direct_norms, stock_norms, rtol=1e-6, atol=1e-9)
    _assert_same_gradients(direct, stock, rtol=1e-5)


@pytest.mark.parametrize("make", [tiny_batch, resnet18_batch], ids=["conv_linear_tail", "resnet18_tail"])
@pytest.mark.parametrize("direct", [False, True], ids=["second_pass", "direct_weight_gradients"])
def test_pruned_backward_gives_the_clipped_sum_of_per_sample_gradients(make, direct: bool) -> None:
    tail, batch = make()
    expected_norms = per_sample_norms_by_loop(tail, batch)
    max_grad_norm = float(expected_norms.median())
    assert (expected_norms > max_grad_norm).any() and (expected_norms < max_grad_norm).any()
    expected = clipped_sum_by_loop(tail, batch, max_grad_norm)

    grads, norms = ghost_gradients(tail, batch, max_grad_norm, pruned=True, direct=direct)

    torch.testing.assert_close(norms, expected_norms, rtol=1e-4, atol=1e-7)
    _assert_same_gradients(grads, expected, rtol=1e-4)


def test_direct_weight_gradients_decline_a_model_with_another_trainable_layer_type() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    assert DirectWeightGradients.attach(model) is None
    model[1].requires_grad_(False)  # a frozen normalisation layer is no obstacle
    direct = DirectWeightGradients.attach(model)
    assert direct is not None
    direct.close()


def test_a_trainable_layer_that_does_not_see_the_inputs_raises_an_error_naming_it() -> None:
    torch.manual_seed(0)
    tail = TailWithConstantBranch()
    batch = (torch.randn(3, 4), torch.zeros(3, 0), torch.tensor([0, 1, 2]))
    with pytest.raises(GhostClippingError, match=r"offset\.weight.*grad_sample_mode = \"hooks\""):
        ghost_gradients(tail, batch, 1.0, pruned=True)


def test_inputs_that_do_not_require_gradients_are_refused() -> None:
    tail, (h, clinical, labels) = tiny_batch()
    dp_module = GradSampleModuleFastGradientClipping(tail, max_grad_norm=1.0, use_ghost_clipping=True)
    try:
        optimizer = DPOptimizerFastGradientClipping(torch.optim.SGD(tail.parameters(), lr=0.1), noise_multiplier=0.0,
                                                    max_grad_norm=1.0, expected_batch_size=len(labels))
        criterion = DPLossFastGradientClipping(dp_module, optimizer, nn.CrossEntropyLoss())
        loss = criterion(dp_module(h, clinical), labels)
        with pytest.raises(GhostClippingError, match="requires_grad_"):
            ghost_clipped_backward(loss, dp_module, [h, clinical])
    finally:
        dp_module._close()


# ------------------------------------------------------------------------------ train_tail


def _train(
    tmp_path: Path, grad_sample_mode: str, class_weights: torch.Tensor | None = None
) -> tuple[dict[str, torch.Tensor], int, PrivacyLedger]:
    """Two DP epochs of ``train_tail`` on the tiny tail with clinical values; weights, steps, ledger."""
    tail, _ = tiny_batch()
    generator = torch.Generator().manual_seed(3)
    inputs, clinical = torch.randn(20, 4, 8, 8, generator=generator), torch.randn(20, 2, generator=generator)
    labels = torch.randint(0, 3, (20,), generator=generator)
    training = TrainingConfig(batch_size=5, local_epochs=2, learning_rate=0.1, momentum=0.9)
    privacy = PrivacyConfig(enabled=True, unit="image", target_epsilon=8.0, target_delta=1e-3, max_grad_norm=0.5,
                            grad_sample_mode=grad_sample_mode)
    ledger_path = tmp_path / f"ledger-{grad_sample_mode}-{len(list(tmp_path.iterdir()))}.json"
    ledger = PrivacyLedger.load_or_create(ledger_path, target_epsilon=8.0, delta=1e-3,
                                          sample_rate=sample_rate_for(20, 5), planned_steps=40)
    named = list(tail.named_parameters())
    named_shared = [(n, p) for n, p in named if not n.startswith("classifier")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcome = train_tail(
            tail, inputs, clinical, labels,
            named_shared=named_shared,
            named_local=[(n, p) for n, p in named if n.startswith("classifier")],
            training=training, privacy=privacy, ledger=ledger,
            global_shared={n: p.detach().clone() for n, p in named_shared}, proximal_mu=0.01,
            class_weights=class_weights, device=torch.device("cpu"), seed=7,
        )
    assert all(not hasattr(p, "_forward_counter") for p in tail.parameters()), "Opacus hooks were not removed"
    return {n: p.detach().clone() for n, p in tail.named_parameters()}, outcome.steps, ledger


def test_train_tail_in_ghost_mode_records_every_step_in_the_ledger(tmp_path: Path) -> None:
    _params, steps, ledger = _train(tmp_path, "ghost")
    expected_steps = 2 * steps_per_epoch(sample_rate_for(20, 5))
    assert steps == expected_steps
    assert ledger.steps_done == expected_steps and ledger.reserved_steps == 0
    assert ledger.spent_epsilon() > 0
    reloaded = PrivacyLedger.load(ledger.path)
    assert reloaded.steps_done == expected_steps


def test_train_tail_in_ghost_mode_ends_where_opacus_stock_ghost_backward_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same seed: the pruned backward changes neither the weights, nor the steps, nor the ledger."""
    assert DirectWeightGradients.attach(TinyTail()) is not None, "train_tail takes the direct path for this tail"
    weights = torch.tensor([1.0, 2.0, 0.5])
    pruned, pruned_steps, pruned_ledger = _train(tmp_path, "ghost", weights)

    def stock_backward(loss, dp_module, input_leaves, direct=None) -> None:  # noqa: ANN001 - Opacus' own backward
        loss.backward()

    monkeypatch.setattr(local_training, "ghost_clipped_backward", stock_backward)
    stock, stock_steps, stock_ledger = _train(tmp_path, "ghost", weights)
    assert pruned_steps == stock_steps
    assert pruned_ledger.history == stock_ledger.history
    for name in stock:
        torch.testing.assert_close(pruned[name], stock[name], rtol=1e-5, atol=1e-7, msg=name)


def test_train_tail_in_ghost_mode_trains_like_hooks_mode_with_the_same_seed(tmp_path: Path) -> None:
    """Same Poisson batches, same noise, same clipping: ghost and hooks end on the same weights.

    (Without class weights: with them, Opacus' hooks mode clips ``n w_i / sum(w) * grad l_i``
    while ghost mode clips ``w_i * grad l_i``.)
    """
    ghost, ghost_steps, ghost_ledger = _train(tmp_path, "ghost")
    hooks, hooks_steps, hooks_ledger = _train(tmp_path, "hooks")
    assert ghost_steps == hooks_steps
    assert ghost_ledger.history == hooks_ledger.history
    for name in hooks:
        torch.testing.assert_close(ghost[name], hooks[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("make", [tiny_batch, resnet18_batch], ids=["conv_linear_tail", "resnet18_tail"])
@pytest.mark.parametrize("direct", [False, True], ids=["second_pass", "direct_weight_gradients"])
def test_leaves_at_the_first_trainable_layers_give_opacus_stock_ghost_gradients(make, direct: bool) -> None:
    tail, batch = make()
    max_grad_norm = _clip_between_smallest_and_largest(tail, batch)
    stock, stock_norms = ghost_gradients(tail, batch, max_grad_norm, pruned=False)
    tracked, tracked_norms = ghost_gradients(tail, batch, max_grad_norm, pruned=True, direct=direct, tracked=True)
    torch.testing.assert_close(tracked_norms, stock_norms, rtol=1e-6, atol=1e-9)
    _assert_same_gradients(tracked, stock, rtol=1e-5)


def test_the_first_pass_stops_where_the_trainable_layers_start_not_at_the_tail_input() -> None:
    """Default resnet18 policy: the tail starts at layer4 but only layer4.1 (and the head) train, so the
    leaves are layer4.1's input and the clinical values; frozen layer4.0 runs forward only."""
    tail, (features, clinical, _labels) = resnet18_batch()
    tracker = TrainableInputLeaves.attach(tail)
    try:
        tracker.start_batch()
        tail(features, clinical)
        shapes = sorted(tuple(leaf.shape) for leaf in tracker.leaves())
    finally:
        tracker.close()
    with torch.no_grad():
        block_input = tail.stages["layer4"][0](features)
    assert shapes == sorted([tuple(block_input.shape), tuple(clinical.shape)])
    assert tuple(features.shape) not in shapes


def test_train_tail_in_ghost_mode_clips_a_layer_fed_by_a_constant_like_opacus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trainable layer whose input depends on no image still gets its per-sample norm and clipping."""

    def run(directory: Path) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        tail = TailWithConstantBranch()
        ledger = PrivacyLedger.load_or_create(directory / "ledger.json", target_epsilon=8.0, delta=1e-3,
                                              sample_rate=sample_rate_for(8, 4), planned_steps=10)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            train_tail(
                tail, torch.randn(8, 4, generator=torch.Generator().manual_seed(1)), torch.zeros(8, 0),
                torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]),
                named_shared=list(tail.named_parameters()), named_local=[],
                training=TrainingConfig(batch_size=4, local_epochs=1),
                privacy=PrivacyConfig(enabled=True, unit="image", target_delta=1e-3, grad_sample_mode="ghost"),
                ledger=ledger, global_shared=None, proximal_mu=0.0, class_weights=None,
                device=torch.device("cpu"), seed=0,
            )
        return {n: p.detach().clone() for n, p in tail.named_parameters()}

    (tmp_path / "pruned").mkdir()
    (tmp_path / "stock").mkdir()
    pruned = run(tmp_path / "pruned")

    def stock_backward(loss, dp_module, input_leaves, direct=None) -> None:  # noqa: ANN001 - Opacus' own backward
        loss.backward()

    monkeypatch.setattr(local_training, "ghost_clipped_backward", stock_backward)
    stock = run(tmp_path / "stock")
    for name in stock:
        torch.testing.assert_close(pruned[name], stock[name], rtol=1e-5, atol=1e-7, msg=name)
