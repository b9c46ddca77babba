"""One local-training mode of the benchmark: throughput and peak memory, in a process of its own.

``simulations.benchmarks.benchmark`` starts this module once per mode (``python -m
simulations.benchmarks.bench_training --mode MODE --spec JSON``) so that every mode's peak memory (max RSS
on CPU, ``torch.cuda.max_memory_allocated`` on CUDA) is its own. The result is printed as one
line ``BENCH_RESULT {json}`` on stdout.

Modes (same model, same synthetic data, same noise multiplier and clipping bound):

* ``plain_dp``: the recipe of Flower's Opacus example: the whole model forward every step,
  ``make_private`` on the whole model (frozen parameters have ``requires_grad=False``), Opacus
  hooks mode, Poisson sampling.
* ``plain_nonprivate``: the same full-model loop without Opacus (context figure).
* ``fedtl_dp``: fedtl's client path: the frozen trunk computed once
  (``client.trunk_feature_cache.compute_trunk_features``, timed separately), then the shipping
  ``client.dp.local_training.train_tail`` with DP on (ghost clipping with fedtl's norm samplers and
  its pruned backward, ``client.dp.ghost_clipping``; Poisson sampling, FedProx step, privacy
  ledger). It also checks on one batch that the per-sample norms and the clipped, summed
  gradients of the shipping backward equal those of Opacus' stock ghost backward
  (``equivalence``).
* ``fedtl_nonprivate``: the same path with DP off.
* ``profile_dp_step``: per-phase milliseconds of one non-private step, one step with Opacus'
  stock ghost backward and one with the shipping backward (:mod:`simulations.benchmarks.bench_dp_profile`).

Images and labels are random (seeded): only speed and memory are measured. Each timed phase
records wall-clock seconds (``images_per_s``) and the process's CPU seconds
(``images_per_cpu_s``): on a machine shared with other work, the CPU-time figure of a
single-threaded run (``--threads 1``) is the one that does not depend on the others' load.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import resource
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

logger = logging.getLogger(__name__)

RESULT_PREFIX = "BENCH_RESULT "
"""Marks the stdout line that carries a worker's JSON result."""

MODES: tuple[str, ...] = (
    "plain_dp",
    "plain_nonprivate",
    "fedtl_dp",
    "fedtl_nonprivate",
    "profile_dp_step",
)


@dataclass(frozen=True)
class TrainingBenchSpec:
    """What every training mode of one benchmark run shares.

    Attributes:
        architecture: torchvision architecture of the FedModel (``common.config.ModelConfig``).
        image_size: square input side in pixels.
        in_channels: 1 (grayscale) or 3.
        num_classes: classifier outputs.
        shared: module prefixes trained and shared (``[policy] shared``).
        local: module prefixes trained and kept at the site (``[policy] local``).
        batch_size: (expected) images per step.
        train_images: images at the site for the fedtl modes (one epoch = ``ceil(n / batch)`` steps).
        timed_epochs: local epochs in the timed ``train_tail`` call of the fedtl modes.
        plain_steps: timed steps of the plain modes (they are slow on CPU).
        plain_warmup_steps: untimed steps before those.
        noise_multiplier: DP-SGD noise multiplier, the same in every DP mode.
        max_grad_norm: per-sample clipping bound, the same in every DP mode.
        target_epsilon: the fedtl ledger's target (it must plan ``noise_multiplier``).
        delta: the fedtl ledger's delta.
        planned_steps: the fedtl ledger's planned steps (all rounds).
        learning_rate: SGD learning rate.
        momentum: SGD momentum.
        proximal_mu: FedProx coefficient used by ``train_tail`` (fedtl's default strategy).
        device: ``"cpu"`` or ``"cuda"``.
        threads: torch CPU threads.
        seed: seed of the synthetic data and of the weights.
        extra: settings recorded with the spec that the workers do not read (planned rounds and
            local epochs, used by the orchestrator for the noise plan and the amortisation).
    """

    architecture: str = "resnet18"
    image_size: int = 64
    in_channels: int = 1
    num_classes: int = 2
    shared: tuple[str, ...] = ("stages.layer4",)
    local: tuple[str, ...] = ("head",)
    batch_size: int = 64
    train_images: int = 1024
    timed_epochs: int = 2
    plain_steps: int = 5
    plain_warmup_steps: int = 1
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    target_epsilon: float = 8.0
    delta: float = 1e-4
    planned_steps: int = 80
    learning_rate: float = 0.05
    momentum: float = 0.9
    proximal_mu: float = 0.01
    device: str = "cpu"
    threads: int = 1
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TrainingBenchSpec:
        raw = json.loads(text)
        for key in ("shared", "local"):
            if key in raw:
                raw[key] = tuple(raw[key])
        return cls(**raw)


# ---------------------------------------------------------------------------------- helpers


def _max_rss_mib() -> float:
    """This process's peak resident set size so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _proc_status_mib(field_name: str) -> float | None:
    """``VmHWM`` (peak RSS since the last reset) or ``VmRSS`` from /proc/self/status, in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class _MemoryMeter:
    """Peak memory of a phase.

    CUDA: ``torch.cuda.max_memory_allocated`` after resetting the peak. CPU: the process's peak
    RSS during the phase (``VmHWM`` after resetting it), reported as the peak itself and as its
    growth over the RSS at the phase's start; where the mark cannot be reset, the growth of
    ``ru_maxrss`` (which misses a phase whose peak is below an earlier one).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device

    @contextlib.contextmanager
    def phase(self, into: dict[str, float], name: str) -> Iterator[None]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            resettable = _reset_peak_rss() and _proc_status_mib("VmHWM") is not None
            before = (_proc_status_mib("VmRSS") or 0.0) if resettable else _max_rss_mib()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
            into[f"{name}_cuda_peak_mib"] = round(peak, 1)
            into[f"{name}_cuda_peak_above_start_mib"] = round(peak - before, 1)
        elif resettable:
            peak = _proc_status_mib("VmHWM") or 0.0
            into[f"{name}_peak_rss_mib"] = round(peak, 1)
            into[f"{name}_peak_rss_growth_mib"] = round(peak - before, 1)
        else:
            into[f"{name}_max_rss_growth_mib"] = round(_max_rss_mib() - before, 1)
        into["max_rss_mib"] = round(_max_rss_mib(), 1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model_and_groups(spec: TrainingBenchSpec) -> tuple[Any, Any, Any]:
    """The FedModel (random weights, DP-safe), its layer policy and parameter groups."""
    from common.models.backbones import build_backbone
    from common.config import ModelConfig
    from common.models.layer_policy import LayerPolicy, apply_policy

    torch.manual_seed(spec.seed)
    config = ModelConfig(
        architecture=spec.architecture,  # type: ignore[arg-type]
        num_classes=spec.num_classes,
        in_channels=spec.in_channels,  # type: ignore[arg-type]
        image_size=spec.image_size,
    )
    model = build_backbone(config, load_weights=False)
    policy = LayerPolicy(shared=spec.shared, local=spec.local)
    groups = apply_policy(model, policy)
    return model, policy, groups


def _synthetic(spec: TrainingBenchSpec, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(spec.seed + 1)
    images = torch.randn(count, spec.in_channels, spec.image_size, spec.image_size, generator=generator)
    labels = torch.randint(0, spec.num_classes, (count,), generator=generator)
    return images, labels


# ------------------------------------------------------------------------------- plain modes


def run_plain(spec: TrainingBenchSpec, private: bool) -> dict[str, Any]:
    """The full-model loop of Flower's Opacus example (``private``) or its non-private twin."""
    device = torch.device(spec.device)
    model, _policy, _groups = _model_and_groups(spec)
    model.to(device).train()
    total_steps = spec.plain_warmup_steps + spec.plain_steps
    images, labels = _synthetic(spec, spec.batch_size * total_steps)
    loader = DataLoader(TensorDataset(images, labels), batch_size=spec.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(spec.seed))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=spec.learning_rate, momentum=spec.momentum)
    criterion = nn.CrossEntropyLoss()
    call: nn.Module = model
    if private:
        from opacus import PrivacyEngine

        call, optimizer, loader = PrivacyEngine(accountant="rdp").make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=spec.noise_multiplier,
            max_grad_norm=spec.max_grad_norm,
            poisson_sampling=True,
            grad_sample_mode="hooks",
        )
    meter = _MemoryMeter(device)
    result: dict[str, Any] = {}
    samples = 0
    steps = 0
    start = cpu_start = 0.0
    with meter.phase(result, "train"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus' hook warnings, once per step
        for index, (x, y) in enumerate(loader):
            if index == spec.plain_warmup_steps:
                _sync(device)
                start = time.perf_counter()
                cpu_start = time.process_time()
            if len(y) == 0:  # Poisson sampling drew nothing: nothing to time
                continue
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(call(x.to(device)), y.to(device))
            loss.backward()
            optimizer.step()
            if index >= spec.plain_warmup_steps:
                samples += len(y)
                steps += 1
        _sync(device)
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    result.update(samples=samples, steps=steps, seconds=round(seconds, 4), cpu_seconds=round(cpu_seconds, 4),
                  images_per_s=samples / seconds if seconds > 0 else float("nan"),
                  images_per_cpu_s=samples / cpu_seconds if cpu_seconds > 0 else float("nan"))
    return result


# ------------------------------------------------------------------------------- fedtl modes


@contextlib.contextmanager
def _count_samples(tail: nn.Module, counter: list[int]) -> Iterator[None]:
    """Add the batch size of every forward call of ``tail`` to ``counter[0]``."""

    def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
        counter[0] += len(args[0])

    handle = tail.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _site_ledger(spec: TrainingBenchSpec, num_images: int, ledger_dir: Path) -> Any:
    """The site's privacy ledger for ``num_images`` training images (planned on first use, then loaded)."""
    from client.privacy.privacy_budget import PrivacyLedger
    from client.privacy.privacy_plan import sample_rate_for

    return PrivacyLedger.load_or_create(
        ledger_dir / f"ledger-{num_images}.json",
        target_epsilon=spec.target_epsilon,
        delta=spec.delta,
        sample_rate=sample_rate_for(num_images, spec.batch_size),
        planned_steps=spec.planned_steps,
    )


def _train_tail_call(
    spec: TrainingBenchSpec,
    model: Any,
    groups: Any,
    boundary: int,
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    private: bool,
    epochs: int,
    ledger_dir: Path,
    counter: list[int],
) -> tuple[Any, Any]:
    """One call of the shipping ``client.dp.local_training.train_tail`` on cached trunk features.

    Returns the ``TrainingOutcome`` and the ledger (None without DP). ``counter[0]`` grows by the
    images the tail processed.
    """
    from client.dp.local_training import train_tail
    from common.config import PrivacyConfig, TrainingConfig

    device = torch.device(spec.device)
    named = dict(model.named_parameters())
    named_shared = [(name, named[name]) for name in groups.shared if name in named]
    named_local = [(name, named[name]) for name in groups.local if name in named]
    training = TrainingConfig(batch_size=spec.batch_size, local_epochs=epochs,
                              learning_rate=spec.learning_rate, momentum=spec.momentum)
    privacy = PrivacyConfig(enabled=private, unit="image", target_epsilon=spec.target_epsilon, target_delta=spec.delta,
                            max_grad_norm=spec.max_grad_norm, grad_sample_mode="ghost")
    ledger = _site_ledger(spec, len(features), ledger_dir) if private else None
    tail = model.tail(boundary)
    with _count_samples(tail, counter):
        outcome = train_tail(
            tail,
            features,
            torch.zeros(len(features), 0),
            labels,
            named_shared=named_shared,
            named_local=named_local,
            training=training,
            privacy=privacy,
            ledger=ledger,
            global_shared={name: p.detach().clone() for name, p in named_shared},
            proximal_mu=spec.proximal_mu,
            class_weights=None,
            device=device,
            seed=spec.seed,
        )
    return outcome, ledger


def run_fedtl(spec: TrainingBenchSpec, private: bool) -> dict[str, Any]:
    """Trunk once, then ``train_tail`` (warm-up call, then the timed call)."""
    from client.privacy.privacy_plan import sample_rate_for
    from client.trunk_feature_cache import compute_trunk_features
    from common.models.layer_policy import first_trainable_stage

    device = torch.device(spec.device)
    model, policy, groups = _model_and_groups(spec)
    model.to(device)
    boundary = first_trainable_stage(model, policy)
    images, labels = _synthetic(spec, spec.train_images)
    meter = _MemoryMeter(device)
    result: dict[str, Any] = {"trunk_boundary": boundary, "trunk_stages": model.stage_names[:boundary]}

    with meter.phase(result, "trunk"):
        _sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        features = compute_trunk_features(model, images, boundary, device)
        _sync(device)
        trunk_s = time.perf_counter() - start
        trunk_cpu_s = time.process_time() - cpu_start
    result.update(trunk_seconds=round(trunk_s, 4), trunk_images_per_s=len(images) / trunk_s,
                  trunk_cpu_seconds=round(trunk_cpu_s, 4),
                  trunk_feature_shape=list(features.shape[1:]),
                  trunk_feature_mib=round(features.numel() * features.element_size() / 2**20, 2))
    del images

    if private:
        result["equivalence"] = check_shipping_ghost_backward(spec, model, boundary, features, labels)

    counter = [0]
    with tempfile.TemporaryDirectory(prefix="fedtl-bench-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warm = min(len(features), 2 * spec.batch_size)
        with meter.phase(result, "train"):  # memory: warm-up and timed call; time: timed call only
            # warm-up: a short call with its own ledger (allocator, first-call costs)
            _train_tail_call(spec, model, groups, boundary, features[:warm], labels[:warm], private=private,
                             epochs=1, ledger_dir=Path(tmp), counter=[0])
            if private:
                # the noise plan is made once per site for the whole federation (like the trunk pass):
                # timed on its own line, not inside the round's training
                plan_start = time.perf_counter()
                _site_ledger(spec, len(features), Path(tmp))
                result["ledger_plan_seconds"] = round(time.perf_counter() - plan_start, 4)
            _sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            outcome, ledger = _train_tail_call(spec, model, groups, boundary, features, labels, private=private,
                                               epochs=spec.timed_epochs, ledger_dir=Path(tmp), counter=counter)
            _sync(device)
            seconds = time.perf_counter() - start
            cpu_seconds = time.process_time() - cpu_start
    result.update(
        samples=counter[0],
        cpu_seconds=round(cpu_seconds, 4),
        images_per_cpu_s=counter[0] / cpu_seconds if cpu_seconds > 0 else float("nan"),
        steps=outcome.steps,
        epochs=spec.timed_epochs,
        seconds=round(seconds, 4),
        images_per_s=counter[0] / seconds if seconds > 0 else float("nan"),
        mean_loss=outcome.mean_loss,
        sample_rate=sample_rate_for(len(features), spec.batch_size),
    )
    if ledger is not None:
        result["ledger_noise_multiplier"] = ledger.noise_multiplier
        result["ledger_epsilon_after_call"] = ledger.spent_epsilon()
    return result


def check_shipping_ghost_backward(
    spec: TrainingBenchSpec, model: Any, boundary: int, features: torch.Tensor, labels: torch.Tensor
) -> dict[str, float]:
    """Per-sample norms and clipped summed gradients of one batch: Opacus' stock ghost backward
    (``loss.backward()``) vs the shipping ``client.dp.ghost_clipping.ghost_clipped_backward`` (with
    ``DirectWeightGradients`` where the tail allows it, as in ``train_tail``).

    Returns the largest relative differences (0 would be bit-identical).
    """
    from opacus import PrivacyEngine

    from client.dp.ghost_clipping import DirectWeightGradients, ghost_clipped_backward

    device = torch.device(spec.device)
    batch = features[: spec.batch_size].to(device)
    target = labels[: spec.batch_size].to(device)
    clinical = torch.zeros(len(batch), 0, device=device)
    original_state = {k: v.clone() for k, v in model.state_dict().items()}
    results: list[tuple[torch.Tensor, list[torch.Tensor]]] = []
    for shipping in (False, True):
        model.load_state_dict(original_state)
        tail = model.tail(boundary).to(device).train()
        params = [p for p in tail.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=spec.learning_rate)
        loader = DataLoader(TensorDataset(batch.cpu(), clinical.cpu(), target.cpu()), batch_size=len(batch))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dp_module, dp_optimizer, criterion, _ = PrivacyEngine().make_private(
                module=tail, optimizer=optimizer, criterion=nn.CrossEntropyLoss(), data_loader=loader,
                noise_multiplier=0.0, max_grad_norm=spec.max_grad_norm, poisson_sampling=False,
                grad_sample_mode="ghost",
            )
        direct = DirectWeightGradients.attach(tail) if shipping else None  # as train_tail does
        try:
            dp_optimizer.zero_grad(set_to_none=True)
            if shipping:
                leaf = batch.detach().requires_grad_(True)
                ghost_clipped_backward(criterion(dp_module(leaf, clinical), target), dp_module, [leaf], direct)
            else:
                criterion(dp_module(batch, clinical), target).backward()
            norms = dp_module.per_sample_gradient_norms.detach().clone()
            grads = [p.grad.detach().clone() for p in params]
        finally:
            if direct is not None:
                direct.close()
            dp_module._close()
        results.append((norms, grads))
    model.load_state_dict(original_state)
    (norms_a, grads_a), (norms_b, grads_b) = results
    norm_diff = float(((norms_a - norms_b).abs() / norms_a.abs().clamp_min(1e-12)).max())
    grad_diff = max(
        float((a - b).abs().max() / a.abs().max().clamp_min(1e-12)) for a, b in zip(grads_a, grads_b)
    )
    return {"max_rel_diff_per_sample_norms": norm_diff, "max_rel_diff_clipped_grads": grad_diff}


def run_profile(spec: TrainingBenchSpec, repeats: int = 7) -> dict[str, Any]:
    """Per-phase timing of the DP step on one batch of cached trunk features."""
    from client.trunk_feature_cache import compute_trunk_features
    from common.models.layer_policy import first_trainable_stage
    from simulations.benchmarks.bench_dp_profile import profile_dp_step

    device = torch.device(spec.device)
    model, policy, _groups = _model_and_groups(spec)
    model.to(device)
    boundary = first_trainable_stage(model, policy)
    images, labels = _synthetic(spec, spec.batch_size)
    features = compute_trunk_features(model, images, boundary, device)
    return profile_dp_step(lambda: copy.deepcopy(model.tail(boundary)), features, labels, batch_size=spec.batch_size,
                           max_grad_norm=spec.max_grad_norm, device=device, repeats=repeats)


# ---------------------------------------------------------------------------------- entry point


def run_mode(mode: str, spec: TrainingBenchSpec) -> dict[str, Any]:
    """Run one mode in this process and return its figures."""
    torch.set_num_threads(spec.threads)
    if mode == "plain_dp":
        figures = run_plain(spec, private=True)
    elif mode == "plain_nonprivate":
        figures = run_plain(spec, private=False)
    elif mode == "fedtl_dp":
        figures = run_fedtl(spec, private=True)
    elif mode == "fedtl_nonprivate":
        figures = run_fedtl(spec, private=False)
    elif mode == "profile_dp_step":
        figures = run_profile(spec)
    else:
        raise ValueError(f"unknown benchmark mode {mode!r}; use one of {', '.join(MODES)}")
    figures["mode"] = mode
    figures["torch_threads"] = torch.get_num_threads()
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", required=True, choices=MODES)
    parser.add_argument("--spec", required=True, help="TrainingBenchSpec as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    spec = TrainingBenchSpec.from_json(args.spec)
    figures = run_mode(args.mode, spec)
    print(RESULT_PREFIX + json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
