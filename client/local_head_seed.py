"""Where a site's local head starts: seeded, never from data, so the head inside DP steps costs no privacy.

``training.training_head = "own"``: each site's head from its own seed (then trained by the same DP-SGD);
``"fixed_common"`` (FedBABU): one seed for the whole federation, and the head stays as initialised.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from common.config import FederationConfig
from common.models.layer_policy import ParameterGroups


def site_seed(seed: int, site_name: str) -> int:
    """A site's own random stream, from the federation's seed and the site's name."""
    return (seed * 7919 + int(hashlib.sha256(site_name.encode()).hexdigest()[:6], 16)) % (2**31)


def head_seed(config: FederationConfig, site_name: str) -> int:
    """The local head's seed: the site's own, or the federation's for ``training_head = "fixed_common"``."""
    if config.training.training_head == "fixed_common":
        return site_seed(config.seed, "fixed-common-head")
    return site_seed(config.seed, site_name)


def init_local_head(model: nn.Module, groups: ParameterGroups, seed: int) -> None:
    """The local head's linear layers from ``seed`` (:func:`head_seed`; the head is never sent)."""
    generator = torch.Generator().manual_seed(seed)
    local = set(groups.local)
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, nn.Linear) or f"{name}.weight" not in local:
                continue
            bound = 1.0 / module.in_features**0.5
            module.weight.uniform_(-bound, bound, generator=generator)
            if module.bias is not None:
                module.bias.zero_()
