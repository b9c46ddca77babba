"""Load the model a site can use from its state directory, ready to predict.

A site's usable model is: the frozen backbone (``backbones/<fingerprint>.pt``, with the image
normalisation it was trained with), the global shared layers (``global_layers.pt``), the site's
local head (``local_head.pt``, when it has one) and its personal head (``personal_head.pt``: the
linear probe fitted on those global layers, with the site's own fine-tuned copy of them when
``training.personal_finetune_epochs`` made one), described by ``site_model.json``
(:mod:`client.inference.site_model_record`: configuration, operating point, test metrics). Every
missing or mismatched piece is a :class:`SiteModelError` naming the file and the fix.

:class:`SiteClassifier` is the whole chain as one ``nn.Module``: preprocessed images (and clinical
values when the model fuses them) -> class probabilities. ``predict``, the saliency maps and the
exported TorchScript file all run this same module, so they agree with each other.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from client.inference.operating_point import OperatingPoint
from client.inference.site_model_record import SiteModelError, read_record
from client.personal_head import LAYER_SOURCES, SHARED_PREFIX
from client.site_settings import resolve_device
from client.site_state import SiteState, SiteStateError
from common.config import FederationConfig
from common.data.image_preprocessing import Preprocessing
from common.models.backbones import build_backbone
from common.models.fed_model import FedModel
from common.models.layer_policy import apply_policy, resolve_policy

logger = logging.getLogger(__name__)


class PersonalHeadLayer(nn.Module):
    """The personal head (``client.personal_head.PersonalHead``) as a module: standardise, then linear, in float64."""

    def __init__(self, state: dict[str, Tensor]) -> None:
        super().__init__()
        for name in ("mean", "scale", "weight", "bias"):
            self.register_buffer(name, state[name].detach().double().clone())

    def forward(self, features: Tensor) -> Tensor:
        standardised = (features.double() - self.mean) / self.scale
        return (standardised @ self.weight.T + self.bias).float()


class SiteClassifier(nn.Module):
    """Preprocessed images ``(N, C, S, S)`` (+ clinical ``(N, K)``) -> probabilities ``(N, classes)``.

    With a personal head the logits are the personal head on the pooled trunk + shared-layer features
    (and the raw clinical values), exactly as the site evaluated it; without one (``training.personal_head
    = "none"``) they are the head trained with the shared layers.
    """

    def __init__(self, model: FedModel, personal: PersonalHeadLayer | None) -> None:
        super().__init__()
        self.model = model
        self.personal = personal

    @property
    def num_clinical(self) -> int:
        return int(self.model.num_clinical)

    def logits(self, images: Tensor, clinical: Tensor | None = None) -> Tensor:
        h = self.model.forward_stages(images)
        if self.personal is None:
            return self.model.head(h, clinical)
        features = self.model.head.features(h).float()
        if self.num_clinical:
            if clinical is None:
                raise ValueError(f"this model fuses {self.num_clinical} clinical value(s) per image: pass clinical=")
            features = torch.cat([features, clinical.float()], dim=1)
        return self.personal(features)

    def forward(self, images: Tensor, clinical: Tensor | None = None) -> Tensor:
        return self.logits(images, clinical).softmax(dim=1)


@dataclass
class SiteModel:
    """Everything needed to use the site's model on new studies."""

    classifier: SiteClassifier
    preprocessing: Preprocessing
    config: FederationConfig
    operating_point: OperatingPoint
    backbone_fingerprint: str
    backbone_source: str
    global_id: str
    last_trained_round: int | None
    test_metrics: dict[str, float] | None
    device: torch.device
    record: dict[str, Any] = field(repr=False, default_factory=dict)
    personal_layers: str = "global"  # the shared layers under the personal head: global, pretrained or fine-tuned

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.config.model.class_names)

    @property
    def clinical_features(self) -> tuple[str, ...]:
        return tuple(self.config.model.clinical_features)

    @property
    def frame_policy(self) -> str:
        return self.config.data.frame_policy


def load_site_model(state_dir: str | Path, device: str = "cpu") -> SiteModel:
    """The site's model from its state directory (see the module docstring); raises :class:`SiteModelError`."""
    root = Path(state_dir)
    if not root.is_dir():
        raise SiteModelError(f"--state-dir {root}: no such directory; give the site's state directory "
                             "(the --state-dir its fedtl-hospital start used)")
    record = read_record(root)
    config: FederationConfig = record["config"]
    fingerprint, global_id = record["backbone_fingerprint"], record["global_id"]
    state = SiteState(root)
    try:
        stored = state.load_backbone(fingerprint)
    except SiteStateError as error:
        raise SiteModelError(str(error)) from error
    if stored is None:
        raise SiteModelError(
            f"{state.backbone_path(fingerprint)} is missing: the backbone this site's model was fitted on. The site "
            "receives it again from the coordinator at the next round (it answers need-backbone); or restore the "
            "state directory from a backup."
        )
    backbone, meta = stored

    model = build_backbone(config.model, load_weights=False)
    groups = apply_policy(model, resolve_policy(config.policy, config.model.architecture))
    full = model.state_dict()
    full.update({name: tensor for name, tensor in backbone.items() if name in full})
    local = state.load_local_head(backbone_fingerprint=fingerprint)
    if local is not None and set(local) == set(groups.local):
        full.update(local)
    elif record["head"] == "none":
        raise SiteModelError(
            f"{state.local_head_path} is missing or does not fit this model: with training.personal_head = 'none' "
            "the site's model IS its trained local head. Restore the file from a backup, or train the site again."
        )
    held = state.load_global_layers()
    if held is None:
        raise SiteModelError(
            f"{state.global_layers_path} is missing or unreadable: the global shared layers of the site's model. "
            "The site receives them again at the next federated round; or restore the file from a backup."
        )
    if held[0] != global_id:
        raise SiteModelError(
            f"{state.global_layers_path} holds global layers {held[0][:12]}, but the site's personal head was fitted "
            f"on {global_id[:12]}: the site received new global layers and has not evaluated them yet. Let the "
            "federation's next evaluation finish (the site then fits its head on the layers it holds)."
        )
    missing = set(groups.shared) - set(held[1])
    if missing:
        raise SiteModelError(f"{state.global_layers_path} lacks shared tensors {sorted(missing)[:3]} of this model; "
                             "it belongs to another configuration. Restore the site's own file.")
    full.update({name: held[1][name] for name in groups.shared})

    personal = None
    personal_layers = "global"
    if record["head"] == "linear_probe":
        stored_head = state.load_personal_head()
        if stored_head is None:
            raise SiteModelError(f"{state.personal_head_path} is missing or unreadable: the site's personal head. "
                                 "It is fitted again at the site's next evaluation round.")
        head_state, fitted_on = stored_head
        if fitted_on != {"global_id": global_id, "backbone_fingerprint": fingerprint}:
            raise SiteModelError(
                f"{state.personal_head_path} was fitted on other global layers or another backbone than "
                f"{root / 'site_model.json'} describes; the next evaluation round makes them agree."
            )
        personal = PersonalHeadLayer(head_state)
        own_layers = {name[len(SHARED_PREFIX):]: tensor for name, tensor in head_state.items()
                      if name.startswith(SHARED_PREFIX)}
        if own_layers and set(own_layers) != set(groups.shared):
            raise SiteModelError(f"{state.personal_head_path} holds a fine-tuned copy of other shared layers than "
                                 "this model's; it is fitted again at the site's next evaluation round.")
        full.update(own_layers)  # the pretrained layers or the site's fine-tuned copy, when the head chose them
        personal_layers = LAYER_SOURCES[int(head_state.get("layers", 0))]
    model.load_state_dict(full)

    torch_device = resolve_device(device)
    classifier = SiteClassifier(model, personal).to(torch_device).eval()
    for parameter in classifier.parameters():
        parameter.requires_grad_(False)
    preprocessing = Preprocessing(image_size=config.model.image_size, in_channels=config.model.in_channels,
                                  mean=tuple(meta["mean"]), std=tuple(meta["std"]))
    logger.info("site model loaded from %s: %s, global layers %s, %s", root, config.model.architecture,
                global_id[:12], record["operating_point"].describe())
    return SiteModel(
        classifier=classifier, preprocessing=preprocessing, config=config, operating_point=record["operating_point"],
        backbone_fingerprint=fingerprint, backbone_source=str(meta.get("source", "unknown")), global_id=global_id,
        last_trained_round=record.get("last_trained_round"), test_metrics=record.get("test_metrics"),
        device=torch_device, record=record, personal_layers=personal_layers,
    )
