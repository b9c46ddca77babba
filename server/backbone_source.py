"""The backbone the coordinator spreads: real pretrained weights when present, else our own.

ImageNet weights cannot be downloaded on an offline coordinator, so for the built-in default
the coordinator pretrains the backbone once on the synthetic "public source" dataset (a related
task, see ``common.data.synthetic_hospitals``), caches it as a fedtl checkpoint and fingerprints it.
When ``model.weights`` (a torchvision weights name in the local torch cache) or
``model.checkpoint`` is configured, that is used instead. The report names the source.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

import torchvision

from common.models.backbone_families import family
from common.models.backbones import build_backbone, from_torchvision_state
from common.config import FederationConfig, ModelConfig
from common.data.image_preprocessing import Preprocessing
from common.models.layer_policy import apply_policy, resolve_policy
from common.models.model_weights import (
    backbone_normalization,
    fingerprint,
    load_backbone_checkpoint,
    save_backbone_checkpoint,
)
from common.data.site_dataset import load_site_dataset
from common.data.synthetic_hospitals import PUBLIC_CLASS_NAMES, generate_public_source, generator_digest

logger = logging.getLogger(__name__)

PRETRAIN_IMAGES = 1200
PRETRAIN_EPOCHS = 3


@dataclass(frozen=True)
class PreparedBackbone:
    """What travels to a site once per fingerprint: frozen trunk + initial shared layers."""

    tensors: dict[str, torch.Tensor]
    shared: dict[str, torch.Tensor]
    fingerprint: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str

    def describe(self) -> dict[str, object]:
        return {
            "source": self.source,
            "fingerprint": self.fingerprint,
            "tensors": len(self.tensors),
            "shared_tensors": len(self.shared),
            "shared_parameters": int(sum(t.numel() for t in self.shared.values())),
            "backbone_parameters": int(sum(t.numel() for t in self.tensors.values())),
        }


def prepare_backbone(config: FederationConfig, cache_dir: Path, *, random_init: bool = False) -> PreparedBackbone:
    """Build the federation's backbone and cut out what travels (everything but the local head)."""
    model_config = config.model
    if random_init:
        torch.manual_seed(config.seed)
        model = build_backbone(model_config, load_weights=False)
        mean, std = backbone_normalization(model_config)
        source = "random-init"
    elif model_config.weights or model_config.checkpoint:
        model = build_backbone(model_config, load_weights=True)
        mean, std = backbone_normalization(model_config)
        source = f"torchvision:{model_config.weights}" if model_config.weights else f"checkpoint:{model_config.checkpoint}"
    else:
        checkpoint = pretrained_public_source_checkpoint(model_config, cache_dir, seed=config.seed)
        pretrained = model_config.model_copy(update={"checkpoint": checkpoint, "weights": None})
        model = build_backbone(pretrained, load_weights=True)
        mean, std = load_backbone_checkpoint(checkpoint).normalization
        source = f"pretrained on synthetic public source ({checkpoint.name})"
    groups = apply_policy(model, resolve_policy(config.policy, model_config.architecture))
    state = {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}
    local = set(groups.local)
    travelling = {name: tensor for name, tensor in state.items() if name not in local}
    shared = {name: state[name] for name in groups.shared}
    return PreparedBackbone(
        tensors=travelling,
        shared=shared,
        fingerprint=fingerprint(travelling),
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        source=source,
    )


def pretrained_checkpoint_path(model_config: ModelConfig, cache_dir: Path, *, seed: int) -> Path:
    """Where the pretrained checkpoint of this model and seed is cached.

    The key names everything that makes the checkpoint, the code included: a checkpoint pretrained by
    another version of this module or of the data generator is never reused.
    """
    key_text = (f"{model_config.model_dump_json(exclude={'weights', 'checkpoint'})}|{seed}|"
                f"{PRETRAIN_IMAGES}|{PRETRAIN_EPOCHS}|v2|{generator_digest()}|"
                f"{hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:8]}")
    key = hashlib.sha256(key_text.encode()).hexdigest()[:16]
    return Path(cache_dir) / f"backbone-{model_config.architecture}-{key}.pt"


def pretrained_public_source_checkpoint(model_config: ModelConfig, cache_dir: Path, *, seed: int) -> Path:
    """Pretrain (once) on the synthetic public source; later calls return the cached checkpoint.

    The torchvision model is trained as torchvision builds it (trainable BatchNorm, RGB input with
    the gray images replicated, its own 4-class classifier), exactly like an ImageNet checkpoint
    is made; it is then converted like real torchvision weights (first layer folded to gray,
    BatchNorm frozen, classifier dropped) and saved as a fedtl checkpoint.
    """
    path = pretrained_checkpoint_path(model_config, cache_dir, seed=seed)
    if path.exists():
        logger.info("using cached pretrained backbone %s", path.name)
        return path
    started = time.perf_counter()
    source_dir = Path(cache_dir) / f"public-source-{seed}-{model_config.image_size}px-g{generator_digest()}"
    manifest = generate_public_source(source_dir, num_images=PRETRAIN_IMAGES, seed=seed,
                                      image_size=model_config.image_size)
    mean, std = (0.5,) * model_config.in_channels, (0.25,) * model_config.in_channels
    data = load_site_dataset(
        manifest,
        preprocessing=Preprocessing(model_config.image_size, 1, (0.5,), (0.25,)),
        cache_dir=source_dir / "decoded",
        class_names=list(PUBLIC_CLASS_NAMES),
        frame_policy="middle",
        show_progress=False,
    )
    torch.manual_seed(seed)
    network = torchvision.models.get_model(model_config.architecture, weights=None,
                                           num_classes=len(PUBLIC_CLASS_NAMES),
                                           **family(model_config.architecture).builder_kwargs(model_config.image_size))
    _train_plainly(network, data.images.expand(-1, 3, -1, -1), data.labels, epochs=PRETRAIN_EPOCHS, seed=seed)
    state = {k: v for k, v in network.state_dict().items()}
    model = from_torchvision_state(model_config, state)
    save_backbone_checkpoint(path, model, (mean, std))
    logger.info("pretrained %s on %d public-source images in %.1f s -> %s", model_config.architecture,
                len(data.labels), time.perf_counter() - started, path.name)
    return path


def _train_plainly(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, epochs: int, seed: int) -> None:
    """Ordinary (non-private) training on public data, as an ImageNet backbone was trained."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    criterion = nn.CrossEntropyLoss()
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        progress = tqdm(range(0, len(order), 64), desc=f"pretraining backbone, epoch {epoch + 1}/{epochs}",
                        leave=False)
        for start in progress:
            idx = order[start : start + 64]
            optimizer.zero_grad()
            loss = criterion(model(images[idx]), labels[idx])
            loss.backward()
            optimizer.step()
            progress.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
