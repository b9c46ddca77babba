"""Micro-benchmark: DP-SGD step throughput on ResNet-18 layer4 + fc with the ghost conv norm samplers.

The trainable part is torchvision ResNet-18's ``layer4`` + ``fc`` (BatchNorm frozen as
``FrozenBatchNorm2d``, ReLUs not in-place, residual sum out of place); its input is what a cached
frozen trunk would hand it for 64x64 images: ``batch x 256 x 4 x 4``. Random weights, random
data: only speed is measured.

Modes:
  nonprivate     plain SGD
  ghost          Opacus ghost clipping with common.conv_norm_samplers registered
  ghost-stock    Opacus ghost clipping as shipped (convs fall back to per-sample gradients)
  hooks          Opacus per-sample gradients (hooks)

Run:  .venv/bin/python -m simulations.bench_conv_norms --batch 64 --steps 20 --threads 2
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn as nn
from opacus import PrivacyEngine
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from torch.utils.data import DataLoader, TensorDataset
from torchvision.models import resnet18
from torchvision.models.resnet import BasicBlock
from torchvision.ops.misc import FrozenBatchNorm2d

from common import conv_norm_samplers

logger = logging.getLogger(__name__)

MODES = ("nonprivate", "ghost", "ghost-stock", "hooks")


def _out_of_place_basic_block_forward(self: BasicBlock, x: torch.Tensor) -> torch.Tensor:
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return self.relu(out + identity)


def build_head(num_classes: int) -> nn.Module:
    """ResNet-18 layer4 + avgpool + fc, BN frozen, ReLU not in-place (random weights)."""
    BasicBlock.forward = _out_of_place_basic_block_forward  # benchmark-only monkeypatch
    model = resnet18(num_classes=num_classes, norm_layer=FrozenBatchNorm2d)
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    return nn.Sequential(model.layer4, model.avgpool, nn.Flatten(1), model.fc)


def _make_step(mode: str, batch: int, device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], None]:
    head = build_head(num_classes=2).to(device).train()
    optimizer = torch.optim.SGD(head.parameters(), lr=0.01, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    if mode == "nonprivate":

        def step(x: torch.Tensor, y: torch.Tensor) -> None:
            optimizer.zero_grad()
            criterion(head(x), y).backward()
            optimizer.step()

        return step

    registry = GradSampleModuleFastGradientClipping.NORM_SAMPLERS
    if mode == "ghost-stock":
        registry.pop(nn.Conv2d, None)
    else:
        conv_norm_samplers.register_conv_norm_samplers()
    dataset = TensorDataset(torch.zeros(batch, 256, 4, 4), torch.zeros(batch, dtype=torch.long))
    loader = DataLoader(dataset, batch_size=batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = PrivacyEngine().make_private(
            module=head,
            optimizer=optimizer,
            data_loader=loader,
            criterion=criterion,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            poisson_sampling=False,
            grad_sample_mode="ghost" if mode.startswith("ghost") else "hooks",
        )
    # ghost mode also returns a wrapped criterion that runs the double backward
    private, dp_optimizer = wrapped[0], wrapped[1]
    dp_criterion = wrapped[2] if len(wrapped) == 4 else criterion

    def dp_step(x: torch.Tensor, y: torch.Tensor) -> None:
        dp_optimizer.zero_grad()
        dp_criterion(private(x), y).backward()
        dp_optimizer.step()

    return dp_step


def measure(mode: str, batch: int, steps: int, device: torch.device) -> float:
    """Images per second of ``steps`` timed training steps (after 3 warm-up steps)."""
    step = _make_step(mode, batch, device)
    x = torch.randn(batch, 256, 4, 4, device=device)
    y = torch.randint(0, 2, (batch,), device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):
            step(x, y)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step(x, y)
        if device.type == "cuda":
            torch.cuda.synchronize()
    conv_norm_samplers.register_conv_norm_samplers()  # undo ghost-stock's removal
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=64, help="images per step")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="'cpu' or 'cuda'")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    results = {mode: measure(mode, args.batch, args.steps, device) for mode in args.modes}
    base = results.get("nonprivate")
    print(f"ResNet-18 layer4+fc, input {args.batch}x256x4x4, device={device}, threads={args.threads}")
    for mode, rate in results.items():
        slowdown = f"  ({base / rate:.2f}x non-private step time)" if base else ""
        print(f"{mode:12s} {rate:9.1f} images/s{slowdown}")


if __name__ == "__main__":
    main()
