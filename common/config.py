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
    """Differential privacy of each site's training data.

    ``unit = "patient"`` (the default) protects a whole patient: all of a patient's images are
    sampled together, their gradients summed and that sum clipped, and the budget counts patient
    steps. ``"image"`` protects one image only (a patient with k images is then protected at
    roughly k x epsilon).
    """

    enabled: bool = True
    unit: Literal["patient", "image"] = Field(
        "patient", description="what one unit of privacy is: a 'patient' (all their images) or one 'image'"
    )
    target_epsilon: float = Field(8.0, gt=0, le=100)
    target_delta: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="default: min(1e-5, 1 / n^1.1) with n the site's training patients (or images)",
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
    update_clipping: Literal["auto", "median", "off"] = Field(
        "auto",
        description="shorten each update whose norm exceeds update_clip_factor x the round's median norm, so "
        "that no single site steers the global layers: 'auto' from 4 usable updates, 'median' always, 'off' never",
    )
    update_clip_factor: float = Field(1.0, ge=1, description="the clip norm as a multiple of the median update norm")


class TrainingConfig(_Section):
    """Local fine-tuning at each site."""

    rounds: int = Field(5, ge=1, le=10_000)
    local_epochs: int = Field(1, ge=1, le=100)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    class_weighting: bool = Field(
        True,
        description="weight the loss by inverse class frequency; without DP from the site's own label counts, "
        "under DP only from training.class_weights (label counts are private: weights derived from them would "
        "tie every sample's loss to every other's)",
    )
    class_weights: list[float] | None = Field(
        None, description="fixed loss weight per class (same order as model.class_names); used with and without DP"
    )
    augmentation: bool = False
    trunk_cache: Literal["auto", "off"] = Field(
        "auto",
        description="reuse frozen-trunk outputs across epochs and rounds; 'auto' turns it off "
        "when augmentation is on",
    )
    training_head: Literal["own", "fixed_common"] = Field(
        "own",
        description="the head the DP-SGD steps train the shared layers through: 'own' (each site's local head, "
        "from its own seed, trained by the same DP-SGD) or 'fixed_common' (one seeded initialisation, the same at "
        "every site and never trained, as in FedBABU: every site's update pulls the shared layers towards one "
        "classifier, and the head adds no values to clip or noise; data-independent, so it costs no privacy)",
    )
    personal_head: Literal["linear_probe", "none"] = Field(
        "linear_probe",
        description="what each site evaluates and keeps: 'linear_probe' fits its own class-balanced linear "
        "classifier on the global features after every round (never sent, never used in a DP step); 'none' "
        "uses the head trained with the shared layers",
    )
    shared_trainable: Literal["weights", "scale_shift", "all"] = Field(
        "weights",
        description="which values of the shared layers a site trains: 'weights' (the block's own weights, as "
        "torchvision defines it; the BatchNorm adapters stay the identity), 'scale_shift' (only the per-channel "
        "scale and shift adapters after each of its norms: a few thousand values instead of millions, so under DP "
        "far less noise per step and faster rounds) or 'all' (both)",
    )
    personal_layers: Literal["validated", "global"] = Field(
        "validated",
        description="which shared layers the linear-probe personal head sits on: 'validated' fits it on the "
        "global and on the pretrained layers and keeps the one with the lower cross-validated loss on the site's "
        "own training patients (so DP noise cannot leave a site below its pretrained features); 'global' always "
        "the global ones",
    )
    personal_finetune_epochs: int = Field(
        0, ge=0, le=100,
        description="with the linear-probe personal head: epochs each site then fine-tunes its own copy of the "
        "shared layers together with that probe, once, after the federation's last round (LP-FT, DP off: the copy "
        "never leaves the site and never feeds a DP step); 0 (the default: measured, it did not help) keeps the "
        "shared layers the probe was fitted on",
    )
    personal_finetune_learning_rate: float = Field(0.01, gt=0, description="SGD step size of the personal fine-tune")
    update_encoding: Literal["fp32", "fp16", "int8"] = Field(
        "int8",
        description="how shared-layer changes travel, both ways: 'int8' (a quarter of fp32's bytes, "
        "per-tensor scale), 'fp16' (half) or 'fp32' (lossless weights)",
    )
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'")

    @field_validator("class_weights")
    @classmethod
    def _weights_are_positive(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and not all(weight > 0 and weight < float("inf") for weight in value):
            raise ValueError("every class weight must be a positive number")
        return value

    @model_validator(mode="after")
    def _a_fixed_head_needs_a_personal_head(self) -> TrainingConfig:
        if self.training_head == "fixed_common" and self.personal_head == "none":
            raise ValueError("training.training_head = 'fixed_common' keeps the head a random initialisation, so "
                             "each site needs its own head on top: set training.personal_head = 'linear_probe'")
        return self


class DataConfig(_Section):
    """How a site's images are split and preprocessed."""

    test_fraction: float = Field(0.25, gt=0, lt=1)
    split_seed: int = 0
    frame_policy: Literal["middle", "first"] = "middle"
    max_unreadable_share: float = Field(
        0.1, ge=0, le=1, description="largest share of a site's manifest rows that may be missing or unreadable "
        "(they are skipped); above it the site refuses to start and lists the rows"
    )
    min_test_patients: int = Field(
        2, ge=1, description="a simulation refuses to start when a site has fewer test patients than this"
    )


def _plain_name(value: str) -> str:
    if not value or not all(ch.isalnum() or ch in "-_." for ch in value):
        raise ValueError("use letters, digits, '-', '_' or '.' only")
    return value


class SiteConfig(_Section):
    """One simulated site on the researcher's own data (``[[sites]]``; simulations only, never sent)."""

    name: str = Field(description="the site's name in every table (letters, digits, '-', '_', '.')")
    manifest: Path = Field(description="the site's manifest CSV or class-folder root (relative to the TOML)")
    state_dir: Path | None = Field(
        None, description="where the simulated site keeps its ledger and heads (default: <run>/sites/<name>)"
    )

    _name_is_plain = field_validator("name")(_plain_name)


class PartitionConfig(_Section):
    """Cut one labelled manifest into simulated sites, by patient (``[partition]``; simulations only).

    ``by = "column"``: the value of ``column`` (e.g. ``hospital``) names each patient's site (a
    natural split); ``"iid"``: patients dealt at random into ``num_sites`` sites, every class spread
    evenly; ``"dirichlet"``: each class's patients shared out by proportions drawn from
    Dirichlet(``alpha``), small alpha = strong label skew (redrawn until every site holds
    ``min_images_per_site`` images; each site first receives ``min_patients_per_class`` patients of
    every class so that it can train and be tested on each). ``manifest`` omitted: the synthetic
    hospitals pooled into one manifest (with a ``hospital`` column).
    """

    by: Literal["column", "iid", "dirichlet"]
    manifest: Path | None = Field(None, description="the manifest to cut (relative to the TOML)")
    column: str | None = Field(None, description="with by = \"column\": the manifest column naming the site")
    num_sites: int | None = Field(None, ge=1, le=1000, description="with by = \"iid\" or \"dirichlet\"")
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (by = \"dirichlet\")")
    min_images_per_site: int = Field(10, ge=0, description="redraw a Dirichlet partition until every site has this")
    min_patients_per_class: int = Field(
        2, ge=0, description="patients of every class each Dirichlet site gets first (one to train, one to test)"
    )
    seed: int = Field(0, description="the same seed gives the same per-site manifests")

    @model_validator(mode="after")
    def _fits_method(self) -> PartitionConfig:
        if self.by == "column" and not self.column:
            raise ValueError('by = "column" needs column = "<manifest column naming the site>", e.g. "hospital"')
        if self.by != "column" and self.num_sites is None:
            raise ValueError(f'by = "{self.by}" needs num_sites = <how many sites to make>')
        if self.by != "column" and self.column:
            raise ValueError(f'by = "{self.by}" takes no column; remove it or use by = "column"')
        return self

    def describe(self) -> str:
        """How the run's sites were made, in words."""
        if self.by == "column":
            return f"sites from manifest column {self.column!r}"
        if self.by == "iid":
            return f"IID partition into {self.num_sites} sites (seed {self.seed})"
        return f"Dirichlet({self.alpha:g}) partition into {self.num_sites} sites (seed {self.seed})"


class OperatingPointConfig(_Section):
    """How each site picks its decision threshold for the positive class (the last class) at the end of training.

    Chosen at the site, on its own validation patients (out-of-fold predictions of its personal head over
    patient folds of its training patients); stored with its model and used by ``fedtl-hospital predict``.
    ``rule``: ``"youden"`` (most sensitivity + specificity), ``"sensitivity"`` (the highest threshold whose
    validation sensitivity reaches ``target``), ``"specificity"`` (the lowest whose specificity reaches
    ``target``) or ``"argmax"`` (the most probable class, no threshold). Binary problems only; with more
    classes predictions are always the most probable class.
    """

    rule: Literal["youden", "sensitivity", "specificity", "argmax"] = "youden"
    target: float | None = Field(None, gt=0, lt=1, description="sensitivity or specificity to reach, e.g. 0.9")

    @model_validator(mode="after")
    def _target_fits_rule(self) -> OperatingPointConfig:
        if self.rule in ("sensitivity", "specificity") and self.target is None:
            raise ValueError(
                f"rule = \"{self.rule}\" needs a target between 0 and 1, e.g. [operating_point] rule = "
                f"\"{self.rule}\" and target = 0.9"
            )
        if self.rule in ("youden", "argmax") and self.target is not None:
            raise ValueError(
                f"rule = \"{self.rule}\" takes no target; remove 'target' or use rule = \"sensitivity\" "
                "or \"specificity\""
            )
        return self


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
    operating_point: OperatingPointConfig = Field(default_factory=OperatingPointConfig)
    # Where a simulation's sites come from (simulations only; never sent to a site, see to_json):
    sites: list[SiteConfig] = Field(default_factory=list, description="[[sites]]: the researcher's own sites")
    partition: PartitionConfig | None = Field(None, description="[partition]: sites cut out of one manifest")

    @model_validator(mode="after")
    def _class_weights_match_classes(self) -> FederationConfig:
        weights = self.training.class_weights
        if weights is not None and len(weights) != self.model.num_classes:
            raise ValueError(
                f"training.class_weights lists {len(weights)} weights for {self.model.num_classes} classes; "
                "give one weight per class, in the order of model.class_names"
            )
        return self

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
        return cls.from_dict(raw, source=str(path)).with_paths_under(path.parent)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "configuration") -> FederationConfig:
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise ConfigError(explain_validation_error(exc, source)) from None

    @model_validator(mode="after")
    def _one_source_of_sites(self) -> FederationConfig:
        if self.sites and self.partition is not None:
            raise ValueError("give either [[sites]] tables or a [partition], not both")
        names = [site.name for site in self.sites]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"[[sites]] names must differ; {', '.join(twice)} appear more than once")
        return self

    def with_paths_under(self, folder: Path) -> FederationConfig:
        """The same configuration with relative paths (the sites', the backbone checkpoint) taken relative
        to ``folder`` (the TOML's)."""

        def under(path: Path | None) -> Path | None:
            return None if path is None or path.is_absolute() else (folder / path).resolve()

        sites = [site.model_copy(update={"manifest": under(site.manifest) or site.manifest,
                                         "state_dir": under(site.state_dir) or site.state_dir})
                 for site in self.sites]
        partition = self.partition
        if partition is not None and partition.manifest is not None:
            partition = partition.model_copy(update={"manifest": under(partition.manifest) or partition.manifest})
        model = self.model.model_copy(update={"checkpoint": under(self.model.checkpoint) or self.model.checkpoint})
        return self.model_copy(update={"sites": sites, "partition": partition, "model": model})

    def to_json(self) -> str:
        # where the simulated sites' files are is the researcher's business, not the federation's:
        # it is left out of what the coordinator sends to sites and of checkpoints
        return self.model_dump_json(exclude={"sites", "partition"})

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
