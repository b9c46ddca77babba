"""Cutting a model state into its frozen / shared / local parts, and putting parts back together.

``split_state`` sorts a state dict by the :class:`ParameterGroups` of a
model; ``merge_state`` joins parts (say, the frozen backbone from the coordinator, the global
shared layers and the site's own head) and checks the result against the model's own state:
every expected tensor present exactly once, nothing extra, same shape, same dtype. Each
failure raises :class:`StateMismatchError` naming the tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import Tensor

GROUP_NAMES: tuple[str, str, str] = ("frozen", "shared", "local")


@dataclass
class ParameterGroups:
    """State-dict key names of each group; every key of the model's state dict is in exactly one list."""

    frozen: list[str] = field(default_factory=list)
    shared: list[str] = field(default_factory=list)
    local: list[str] = field(default_factory=list)

    def group_of(self, key: str) -> str:
        """``"frozen"``, ``"shared"`` or ``"local"`` for state-dict key ``key``."""
        for group in ("frozen", "shared", "local"):
            if key in getattr(self, group):
                return group
        raise KeyError(f"{key!r} is in no group")

    def sizes(self, state_dict: Mapping[str, Tensor]) -> dict[str, int]:
        """Number of values per group in ``state_dict`` (for logs and reports)."""
        return {
            group: sum(state_dict[key].numel() for key in getattr(self, group))
            for group in ("frozen", "shared", "local")
        }


class StateMismatchError(ValueError):
    """Named tensors do not match what the model expects; the message names the tensor and the fix."""


def split_state(state_dict: Mapping[str, Tensor], groups: ParameterGroups) -> dict[str, dict[str, Tensor]]:
    """Split ``state_dict`` into ``{"frozen": ..., "shared": ..., "local": ...}`` by ``groups``.

    Args:
        state_dict: a model's state dict (tensors are not copied).
        groups: which key belongs to which group; must cover exactly the keys of ``state_dict``.
    """
    owner: dict[str, str] = {}
    for group in GROUP_NAMES:
        for key in getattr(groups, group):
            if key in owner:
                raise StateMismatchError(f"tensor {key!r} is in both the {owner[key]} and the {group} group")
            owner[key] = group
    unknown = [key for key in state_dict if key not in owner]
    if unknown:
        raise StateMismatchError(
            f"tensor {unknown[0]!r} (and {len(unknown) - 1} more) belongs to no group; "
            "the groups were made for another model: call apply_policy on this model"
        )
    absent = [key for key in owner if key not in state_dict]
    if absent:
        raise StateMismatchError(
            f"tensor {absent[0]!r} (and {len(absent) - 1} more) of the {owner[absent[0]]} group is not in "
            "the state dict; the groups were made for another model"
        )
    parts: dict[str, dict[str, Tensor]] = {group: {} for group in GROUP_NAMES}
    for key, tensor in state_dict.items():
        parts[owner[key]][key] = tensor
    return parts


def merge_state(parts: Mapping[str, Mapping[str, Tensor]], expected: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Join ``parts`` into one state dict ordered like ``expected``, after checking it fits.

    Args:
        parts: part name (used in messages, e.g. ``"shared"``) -> named tensors.
        expected: the target model's state dict (names, shapes and dtypes to match).

    Raises:
        StateMismatchError: a tensor appears in two parts, is missing, is not expected, or has
            another shape or dtype than expected.
    """
    merged: dict[str, Tensor] = {}
    source: dict[str, str] = {}
    for part_name, tensors in parts.items():
        for key, tensor in tensors.items():
            if key in merged:
                raise StateMismatchError(f"tensor {key!r} is given twice: in {source[key]!r} and in {part_name!r}")
            if key not in expected:
                raise StateMismatchError(
                    f"tensor {key!r} from {part_name!r} does not exist in this model; "
                    "check that the sender uses the same architecture and layer policy"
                )
            want = expected[key]
            if tuple(tensor.shape) != tuple(want.shape):
                raise StateMismatchError(
                    f"tensor {key!r} from {part_name!r} has shape {tuple(tensor.shape)}, this model needs "
                    f"{tuple(want.shape)}; check num_classes, in_channels, image_size and clinical_features"
                )
            if tensor.dtype != want.dtype:
                raise StateMismatchError(
                    f"tensor {key!r} from {part_name!r} has dtype {tensor.dtype}, this model needs {want.dtype}; "
                    "decode encoded updates before merging"
                )
            merged[key] = tensor
            source[key] = part_name
    missing = [key for key in expected if key not in merged]
    if missing:
        raise StateMismatchError(
            f"tensor {missing[0]!r} (and {len(missing) - 1} more) is missing from {sorted(parts)}; "
            "every frozen, shared and local tensor must be supplied"
        )
    return {key: merged[key] for key in expected}
