"""Which parts of a FedModel are frozen, shared with the federation, or kept at the site.

A :class:`LayerPolicy` lists module-name prefixes (as printed by ``model.named_modules()``, e.g.
``"stages.layer4"``). :func:`apply_policy` validates it against a model, sets
``requires_grad`` and returns :class:`ParameterGroups`: every state-dict key in exactly one of

* ``shared``: parameters under a shared prefix (plus buffers there that can change; the
  FrozenBatchNorm statistics inside a shared block never change, so they stay ``frozen`` and
  are never re-sent);
* ``local``: every parameter and buffer under a local prefix (the head: never leaves the site);
* ``frozen``: everything else (identical at every site, sent once with the backbone).

Policies that would break DP-SGD or the federation are refused with a :class:`LayerPolicyError`
that names the module and says how to fix it.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass

from opacus.validators import ModuleValidator
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from common.models.backbone_families import FAMILIES
from common.models.fed_model import FedModel
from common.config import LayerPolicyConfig
from common.models.state_groups import ParameterGroups

logger = logging.getLogger(__name__)

DEFAULT_LOCAL: tuple[str, ...] = ("head",)

DEFAULT_SHARED: dict[str, tuple[str, ...]] = {name: recipe.default_shared for name, recipe in FAMILIES.items()}
"""The last block(s) of each trunk: small enough for DP noise and bandwidth, deep enough to adapt."""


class LayerPolicyError(ValueError):
    """A layer policy does not fit the model or would break DP-SGD; the message names the module and the fix."""


@dataclass(frozen=True)
class LayerPolicy:
    """Module-name prefixes of the shared and the local part; everything else is frozen.

    Attributes:
        shared: prefixes whose parameters are trained at every site and averaged by the coordinator.
        local: prefixes whose parameters and buffers are trained and kept at each site.
    """

    shared: tuple[str, ...]
    local: tuple[str, ...]

    @property
    def trainable(self) -> tuple[str, ...]:
        return self.shared + self.local


def default_policy(architecture: str) -> LayerPolicy:
    """The architecture's default: its last block(s) shared, ``"head"`` local, the rest frozen."""
    try:
        return LayerPolicy(shared=DEFAULT_SHARED[architecture], local=DEFAULT_LOCAL)
    except KeyError:
        raise LayerPolicyError(
            f"no default layer policy for architecture {architecture!r}; use one of: "
            f"{', '.join(sorted(DEFAULT_SHARED))}"
        ) from None


def resolve_policy(config: LayerPolicyConfig, architecture: str) -> LayerPolicy:
    """The policy a ``[policy]`` section asks for: a list given there replaces the default, ``None`` keeps it."""
    default = default_policy(architecture)
    shared = tuple(config.shared) if config.shared is not None else default.shared
    local = tuple(config.local) if config.local is not None else default.local
    return LayerPolicy(shared=shared, local=local)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _is_under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _under_any(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(_is_under(name, prefix) for prefix in prefixes)


def _check_prefixes(model: FedModel, policy: LayerPolicy) -> None:
    module_names = [name for name, _ in model.named_modules() if name]
    known = set(module_names) | {name for name, _ in model.named_parameters()} | {
        name for name, _ in model.named_buffers()
    }
    if not policy.shared:
        raise LayerPolicyError(
            "[policy] shared is empty: the federation would have nothing to train together; "
            f"list at least one module, e.g. {default_policy(model.architecture).shared[0]!r}"
        )
    labelled = [("shared", p) for p in policy.shared] + [("local", p) for p in policy.local]
    for group, prefix in labelled:
        if not prefix or prefix != prefix.strip():
            raise LayerPolicyError(f"[policy] {group} has an empty or padded module name {prefix!r}; remove it")
        if prefix not in known:
            close = difflib.get_close_matches(prefix, module_names, n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise LayerPolicyError(
                f"[policy] {group} names {prefix!r}, which is no module of this {model.architecture}.{hint} "
                f"Module names are as printed by model.named_modules(); stages are: "
                f"{', '.join('stages.' + s for s in model.stages)}; the head is 'head'."
            )
    for i, (group_a, a) in enumerate(labelled):
        for group_b, b in labelled[i + 1 :]:
            if a == b:
                where = f"both [policy] {group_a} and {group_b}" if group_a != group_b else f"[policy] {group_a} twice"
                raise LayerPolicyError(f"module {a!r} is listed in {where}; keep it in one group only")
            if _is_under(a, b) or _is_under(b, a):
                outer, inner = (b, a) if _is_under(a, b) else (a, b)
                raise LayerPolicyError(
                    f"[policy] prefixes overlap: {inner!r} ({group_a if inner == a else group_b}) lies inside "
                    f"{outer!r} ({group_b if inner == a else group_a}); list each module in one group only, "
                    f"e.g. name the sibling blocks of {inner!r} instead of {outer!r}"
                )


def _trainable_modules(model: nn.Module, policy: LayerPolicy) -> list[tuple[str, nn.Module]]:
    """Modules (named_modules order) that own a parameter under a shared or local prefix."""
    found = []
    for name, module in model.named_modules():
        own = [f"{name}.{p}" if name else p for p, _ in module.named_parameters(recurse=False)]
        if any(_under_any(p, policy.trainable) for p in own):
            found.append((name, module))
    return found


def _check_batch_norm(model: nn.Module, policy: LayerPolicy) -> None:
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if _under_any(name, policy.trainable):
                raise LayerPolicyError(
                    f"module {name!r} is a trainable {type(module).__name__}: it mixes the samples of a batch, "
                    "which DP-SGD cannot allow. Replace it by torchvision.ops.misc.FrozenBatchNorm2d with the "
                    "same statistics (build_backbone does this), or move it to the frozen part."
                )
            raise LayerPolicyError(
                f"module {name!r} is a {type(module).__name__}: even frozen, it normalises with batch statistics "
                "whenever model.train() is called, so samples leak into each other. Replace it by "
                "torchvision.ops.misc.FrozenBatchNorm2d (build_backbone does this)."
            )


def _check_inplace(model: nn.Module, trainable: list[tuple[str, nn.Module]]) -> None:
    if not trainable:
        return
    first_name = trainable[0][0]
    after_first = False
    for name, module in model.named_modules():
        if name == first_name:
            after_first = True
        if after_first and getattr(module, "inplace", False) is True:
            raise LayerPolicyError(
                f"module {name!r} ({type(module).__name__}) works in place and comes after the first trainable "
                f"module {first_name!r}; Opacus per-sample gradients need its input intact. Set its inplace=False "
                "(build_backbone does this) or freeze everything up to it."
            )


def _check_classifier(model: FedModel, policy: LayerPolicy) -> None:
    for name, _ in model.head.classifier.named_parameters(prefix="head.classifier"):
        if not _under_any(name, policy.trainable):
            raise LayerPolicyError(
                f"parameter {name!r} would stay frozen at its random initialisation; "
                "put 'head' in [policy] local"
            )


def _check_opacus(trainable: list[tuple[str, nn.Module]]) -> None:
    for name, module in trainable:
        validator = ModuleValidator.VALIDATORS.get(type(module))
        errors = validator(module) if validator is not None else []
        if errors:
            raise LayerPolicyError(
                f"module {name!r} ({type(module).__name__}) cannot be trained with Opacus: {errors[0]} "
                "Freeze it (remove its prefix from [policy]) or replace it with a DP-compatible layer."
            )
        if any(True for _ in module.buffers(recurse=False)):
            raise LayerPolicyError(
                f"module {name!r} ({type(module).__name__}) has both trainable parameters and buffers, which "
                "Opacus does not support; freeze it (remove its prefix from [policy])."
            )


def validate_policy(model: FedModel, policy: LayerPolicy) -> None:
    """Raise :class:`LayerPolicyError` if ``policy`` does not fit ``model`` or would break DP-SGD."""
    _check_prefixes(model, policy)
    _check_batch_norm(model, policy)
    trainable = _trainable_modules(model, policy)
    _check_inplace(model, trainable)
    _check_classifier(model, policy)
    _check_opacus(trainable)


def group_state_keys(model: FedModel, policy: LayerPolicy) -> ParameterGroups:
    """Sort every state-dict key of ``model`` into frozen / shared / local (see module doc)."""
    parameters = {name for name, _ in model.named_parameters()}
    buffer_owner: dict[str, nn.Module] = {}
    for module_name, module in model.named_modules():
        for buffer_name, _ in module.named_buffers(recurse=False):
            buffer_owner[f"{module_name}.{buffer_name}" if module_name else buffer_name] = module
    groups = ParameterGroups()
    for key in model.state_dict():
        if _under_any(key, policy.local):
            groups.local.append(key)
        elif _under_any(key, policy.shared):
            never_changes = key not in parameters and isinstance(buffer_owner.get(key), FrozenBatchNorm2d)
            (groups.frozen if never_changes else groups.shared).append(key)
        else:
            groups.frozen.append(key)
    return groups


def apply_policy(model: FedModel, policy: LayerPolicy) -> ParameterGroups:
    """Validate ``policy`` against ``model``, set ``requires_grad`` accordingly and return the groups.

    Nothing is changed when validation fails.
    """
    validate_policy(model, policy)
    groups = group_state_keys(model, policy)
    for name, param in model.named_parameters():
        param.requires_grad_(_under_any(name, policy.trainable))
    sizes = groups.sizes(model.state_dict())
    logger.info(
        "%s layer policy: %d frozen, %d shared, %d local values (shared: %s)",
        model.architecture, sizes["frozen"], sizes["shared"], sizes["local"], ", ".join(policy.shared),
    )
    return groups


def first_trainable_stage(model: FedModel, policy: LayerPolicy) -> int:
    """Index of the first stage holding a parameter under a shared or local prefix (``len(stages)`` if none)."""
    prefixes = tuple(policy.shared) + tuple(policy.local)
    for index, (stage_name, stage) in enumerate(model.stages.items()):
        for param_name, _ in stage.named_parameters(prefix=f"stages.{stage_name}"):
            if any(_is_under(param_name, prefix) for prefix in prefixes):
                return index
    return len(model.stages)
