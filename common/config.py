"""Federation run configuration: one pydantic model, loaded from TOML.

Every section rejects unknown keys, and every error is rewritten into a sentence a hospital
admin can act on (which file, which key, what was wrong, what is allowed).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Architecture = Literal[
    "resnet18",
    "resnet50",
    "densenet121",
    "efficientnet_b0",
    "mobilenet_v3_large",
    "convnext_tiny",
    "vit_b_16",
]


class ConfigError(ValueError):
    """A configuration file or value is wrong; the message says where and how to fix it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """Which backbone, for which images and labels."""

    architecture: Architecture = "resnet18"
    num_classes: int = Field(2, ge=2, description="number of diagnostic classes")
    class_names: list[str] = Field(
        default_factory=lambda: ["normal", "finding"],
        description="label names as written in the site manifests, in class-index order",
    )
    in_channels: Literal[1, 3] = Field(1, description="1 for grayscale medical images, 3 for RGB")
    image_size: int = Field(64, ge=16, le=1024, description="square input side in pixels")
    clinical_features: list[str] = Field(
        default_factory=list,
        description="names of numeric manifest columns (age, sex, lab values) fused before the head",
    )
    weights: str | None = Field(
        None, description="torchvision weights name, e.g. 'ResNet18_Weights.IMAGENET1K_V1'"
    )
    checkpoint: Path | None = Field(None, description="fedtl backbone checkpoint file (.pt)")

    @model_validator(mode="after")
    def _one_weight_source(self) -> ModelConfig:
        if len(self.class_names) != self.num_classes or len(set(self.class_names)) != self.num_classes:
            raise ValueError(
                f"class_names must list {self.num_classes} different labels (num_classes), "
                f"got {self.class_names}"
            )
        if self.weights and self.checkpoint:
            raise ValueError("give either 'weights' or 'checkpoint', not both")
        if self.architecture == "vit_b_16" and self.image_size % 16:
            raise ValueError("vit_b_16 needs an image_size that is a multiple of 16")
        return self


class LayerPolicyConfig(_Section):
    """Which modules the federation shares and which stay at the site.

    Prefixes are module names as printed by ``model.named_modules()`` (for example
    ``"stages.layer4"``). ``None`` keeps the architecture's default.
    """

    shared: list[str] | None = None
    local: list[str] | None = None


class PrivacyConfig(_Section):
    """Sample-level differential privacy (one image is the unit of privacy)."""

    enabled: bool = True
    target_epsilon: float = Field(8.0, gt=0, le=100)
    target_delta: float | None = Field(
        None, gt=0, lt=1, description="default: 1 / (10 x site training-set size)"
    )
    max_grad_norm: float = Field(1.0, gt=0)
    accountant: Literal["rdp", "prv"] = "rdp"
    grad_sample_mode: Literal["ghost", "hooks", "functorch"] = "ghost"


class StrategyConfig(_Section):
    """How the coordinator aggregates the shared layers and how long it waits."""

    name: Literal["fedavg", "fedprox", "fedadam", "trimmed_mean"] = "fedprox"
    proximal_mu: float = Field(0.01, ge=0)
    fraction_train: float = Field(1.0, gt=0, le=1)
    min_sites: int = Field(2, ge=1, description="fewest answering sites for a round to count")
    round_timeout_s: float = Field(600.0, gt=0)
    trim_fraction: float = Field(0.2, ge=0, lt=0.5)
    server_learning_rate: float = Field(0.01, gt=0, description="FedAdam eta")
    norm_outlier_factor: float = Field(
        10.0, gt=1, description="drop an update whose norm exceeds this many times the median"
    )


class TrainingConfig(_Section):
    """Local fine-tuning at each site."""

    rounds: int = Field(5, ge=1, le=10_000)
    local_epochs: int = Field(1, ge=1, le=100)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    class_weighting: bool = True
    augmentation: bool = False
    trunk_cache: Literal["auto", "off"] = Field(
        "auto",
        description="reuse frozen-trunk outputs across epochs and rounds; 'auto' turns it off "
        "when augmentation is on",
    )
    personal_head: Literal["linear_probe", "none"] = Field(
        "linear_probe",
        description="what each site evaluates and keeps: 'linear_probe' fits its own class-balanced linear "
        "classifier on the global features after every round (never sent, never used in a DP step); 'none' "
        "uses the head trained with the shared layers",
    )
    update_encoding: Literal["fp32", "fp16", "int8"] = Field(
        "int8",
        description="how shared-layer changes travel, both ways: 'int8' (a quarter of fp32's bytes, "
        "per-tensor scale), 'fp16' (half) or 'fp32' (lossless weights)",
    )
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'")


class DataConfig(_Section):
    """How a site's images are split and preprocessed."""

    test_fraction: float = Field(0.25, gt=0, lt=1)
    split_seed: int = 0
    frame_policy: Literal["middle", "first"] = "middle"


class FederationConfig(_Section):
    """Everything one federated run needs; the coordinator sends it to every site."""

    name: str = "fedtl"
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    policy: LayerPolicyConfig = Field(default_factory=LayerPolicyConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    data: DataConfig = Field(default_factory=DataConfig)

    @field_validator("name")
    @classmethod
    def _name_is_plain(cls, value: str) -> str:
        if not value or not all(ch.isalnum() or ch in "-_." for ch in value):
            raise ValueError("use letters, digits, '-', '_' or '.' only")
        return value

    @classmethod
    def from_toml(cls, path: str | Path) -> FederationConfig:
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such configuration file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc}); check quotes and brackets") from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "configuration") -> FederationConfig:
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise ConfigError(explain_validation_error(exc, source)) from None

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> FederationConfig:
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise ConfigError(explain_validation_error(exc, "configuration from the coordinator")) from None


def explain_validation_error(exc: ValidationError, source: str) -> str:
    """Turn pydantic's error list into one readable line per problem."""
    lines = [f"{source} has {exc.error_count()} problem(s):"]
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        key = ".".join(loc) if loc else "(top level)"
        section = f"[{'.'.join(loc[:-1])}] " if len(loc) > 1 else ""
        if len(loc) == 1 and loc[0] in FederationConfig.model_fields and loc[0] not in ("name", "seed"):
            where = f"[{loc[0]}]"  # a check across a whole section
        else:
            where = f"{section}{loc[-1]}" if loc else key
        if err["type"] == "extra_forbidden":
            lines.append(f"  - {where}: unknown setting; remove it or check its spelling")
            continue
        given = err.get("input")
        shown = "" if isinstance(given, dict) else f" (you wrote {given!r})"
        message = err["msg"].removeprefix("Value error, ")
        lines.append(f"  - {where}: {message}{shown}")
    return "\n".join(lines)
