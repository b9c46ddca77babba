"""One site's working set for a federation: backbone, local head, data, splits, trunk features.

Built once per (site, backbone fingerprint, configuration) and reused across rounds while the
process lives; everything that must survive a restart is on the site's disk (``SiteState``),
so a fresh process rebuilds the same session without decoding a DICOM again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn

from client.dp.local_training import TrainingOutcome, random_flip_and_shift, train_tail
from client.evaluation_metrics import bootstrap_balanced_accuracy, classification_metrics
from client.inference.operating_point import operating_point_from_validation
from client.inference.site_model_record import record_fit, record_test_metrics
from client.local_head_seed import head_seed, init_local_head, site_seed
from client.personal_finetune import with_shared
from client.personal_head import PersonalHead
from client.personal_model import fit_personal_model, fit_pretrained_probe
from client.privacy.privacy_budget import PrivacyLedger
from client.privacy.privacy_plan import default_delta, sample_rate_for, steps_per_epoch
from client.site_settings import SiteSettings
from client.site_state import SiteState
from client.trunk_feature_cache import split_trunk_features
from common.config import FederationConfig
from common.data.image_preprocessing import Preprocessing
from common.data.patient_split import class_weights, split_by_patient
from common.data.site_dataset import SiteData, load_site_dataset
from common.models.backbones import build_backbone
from common.models.fed_model import FedModel, StagesTail
from common.models.opacus_compat import ADAPTER_SUFFIXES
from common.models.layer_policy import ParameterGroups, apply_policy, first_trainable_stage, resolve_policy
from common.wire_contract import STATUS_DECLINED_BUDGET, STATUS_OK

logger = logging.getLogger(__name__)

_TOLD_NO_COUNT_WEIGHTS: set[str] = set()


class BackboneMissing(RuntimeError):
    """The site does not hold the backbone the coordinator asked for (never installed, or cache lost)."""


@dataclass(frozen=True)
class RoundOutcome:
    """What one round did at the site: trained (``status == "ok"``) or declined for lack of budget.

    ``epsilon`` and ``delta`` are the site's cumulative privacy spent after the round (0 with DP off);
    ``shared`` is the trained shared layers (``None`` when declined). Nothing here is per image.
    """

    status: str
    num_examples: int
    train_loss: float
    steps: int
    epsilon: float
    delta: float
    shared: dict[str, torch.Tensor] | None


@dataclass
class Split:
    """One split of a site's images: the tail's inputs with their clinical values, labels and patients."""

    inputs: torch.Tensor  # trunk features (or images when the trunk is not cached)
    clinical: torch.Tensor
    labels: torch.Tensor
    patients: list[str] = field(default_factory=list, repr=False)  # site-local ids, for patient-level folds only


@dataclass
class SiteSession:
    settings: SiteSettings
    config: FederationConfig
    fingerprint: str
    model: FedModel
    groups: ParameterGroups
    boundary: int
    train: Split
    test: Split
    skipped_files: int
    state: SiteState
    _named: dict[str, nn.Parameter] = field(default_factory=dict)
    _head_stamp: tuple[int, int, int] | None = None  # the local-head file this session's head matches
    _pretrained_shared: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # kept for "validated"
    _pretrained_probe_fit: tuple[PersonalHead, torch.Tensor | None] | None = field(default=None, repr=False)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def open(cls, settings: SiteSettings, config: FederationConfig, fingerprint: str) -> SiteSession:
        state = SiteState(settings.state_dir)
        stored = state.load_backbone(fingerprint)
        if stored is None:
            raise BackboneMissing(fingerprint)
        backbone_tensors, meta = stored
        device = settings.torch_device()

        model = build_backbone(config.model, load_weights=False)
        policy = resolve_policy(config.policy, config.model.architecture)
        groups = apply_policy(model, policy)
        init_local_head(model, groups, seed=head_seed(config, settings.site_name))
        full = model.state_dict()
        for name, tensor in backbone_tensors.items():
            if name not in full:
                raise ValueError(f"backbone tensor {name!r} does not belong to a {config.model.architecture}")
            full[name] = tensor
        head = state.load_local_head(backbone_fingerprint=fingerprint)
        if config.training.training_head == "fixed_common":
            head = None  # the common head is its seeded initialisation, whatever an earlier run left on disk
        if head is not None and set(head) == set(groups.local):
            full.update(head)
        elif head is not None:
            logger.warning("[%s] stored local head does not fit this model; starting a new head", settings.site_name)
        model.load_state_dict(full)
        model.to(device)

        preprocessing = Preprocessing(
            image_size=config.model.image_size,
            in_channels=config.model.in_channels,
            mean=tuple(meta["mean"]),
            std=tuple(meta["std"]),
        )
        data = load_site_dataset(
            settings.manifest,
            preprocessing=preprocessing,
            cache_dir=settings.decoded_cache_dir or state.decoded_dir,
            class_names=config.model.class_names,
            clinical_features=config.model.clinical_features,
            frame_policy=config.data.frame_policy,
            storage=settings.storage,
            max_unreadable_share=config.data.max_unreadable_share,
        )
        if data.skipped:
            logger.warning("[%s] %d file(s) skipped as unreadable (see the data-quality report)",
                           settings.site_name, len(data.skipped))
        train_idx, test_idx = split_by_patient(
            data.patient_ids, data.labels.tolist(), config.data.test_fraction, config.data.split_seed
        )
        use_cache = config.training.trunk_cache == "auto" and not config.training.augmentation
        boundary = first_trainable_stage(model, policy) if use_cache else 0
        inputs = split_trunk_features(
            model,
            data.images,
            train_idx=train_idx,
            test_idx=test_idx,
            boundary=boundary,
            fingerprint=fingerprint,
            preprocessing_key=preprocessing.key(),
            cache_dir=settings.features_cache_dir or state.features_dir,
            device=device,
            storage=settings.storage,
        )
        session = cls(
            settings=settings,
            config=config,
            fingerprint=fingerprint,
            model=model,
            groups=groups,
            boundary=boundary,
            train=_take(inputs.train, data, train_idx),
            test=_take(inputs.test, data, test_idx),
            skipped_files=len(data.skipped),
            state=state,
        )
        session._named = dict(model.named_parameters())
        if config.training.personal_layers == "validated" and all(n in backbone_tensors for n in groups.shared):
            session._pretrained_shared = {name: backbone_tensors[name] for name in groups.shared}
        session._head_stamp = state.local_head_stamp()
        logger.info("[%s] ready: %d train / %d test images, trunk cut at stage %d, inputs in %s",
                    settings.site_name, len(train_idx), len(test_idx), boundary, inputs.storage)
        return session

    # ---- federation steps ---------------------------------------------------------------
    @property
    def num_train(self) -> int:
        return len(self.train.labels)

    @property
    def num_train_units(self) -> int:
        """Training units of privacy: patients (the default unit) or images."""
        if self.config.privacy.unit == "patient":
            return len(set(self.train.patients))
        return self.num_train

    def privacy_ledger(self) -> PrivacyLedger:
        privacy, training = self.config.privacy, self.config.training
        delta = privacy.target_delta or default_delta(self.num_train_units)
        return self.state.open_ledger(
            target_epsilon=privacy.target_epsilon,
            delta=delta,
            sample_rate=sample_rate_for(self.num_train, training.batch_size),
            planned_steps=self.planned_steps_per_round() * training.rounds,
            accountant=privacy.accountant,
            unit=privacy.unit,
        )

    def loss_weights(self) -> torch.Tensor | None:
        """Class weights of the training loss: fixed ones from the configuration, else (without DP
        only) inverse frequencies of the site's labels. Under DP, label counts are private data:
        weights from them would let one record move every other record's loss term."""
        training = self.config.training
        if training.class_weights is not None:
            return torch.tensor(training.class_weights, dtype=torch.float32)
        if not training.class_weighting:
            return None
        if self.config.privacy.enabled:
            if self.settings.site_name not in _TOLD_NO_COUNT_WEIGHTS:  # once per site and process
                _TOLD_NO_COUNT_WEIGHTS.add(self.settings.site_name)
                logger.info("[%s] under DP the loss is not weighted by the site's label counts; set "
                            "training.class_weights for fixed class weights", self.settings.site_name)
            return None
        return class_weights(self.train.labels, self.config.model.num_classes)

    def planned_steps_per_round(self) -> int:
        training = self.config.training
        return training.local_epochs * steps_per_epoch(sample_rate_for(self.num_train, training.batch_size))

    def sync_local_head(self) -> None:
        """Reload the local head if the site's disk holds a newer one than this session.

        A simulation worker keeps sessions in memory while another worker may train the same site
        (Ray schedules sites on any worker); without this a cached session would go on from a
        stale head and the result would depend on the schedule.
        """
        stamp = self.state.local_head_stamp()
        if stamp == self._head_stamp:
            return
        head = self.state.load_local_head(backbone_fingerprint=self.fingerprint)
        if head is not None and set(head) == set(self.groups.local):
            current = self.model.state_dict()
            with torch.no_grad():
                for name, tensor in head.items():
                    current[name].copy_(tensor)
        self._head_stamp = stamp

    def load_shared(self, shared: Mapping[str, torch.Tensor]) -> None:
        expected = set(self.groups.shared)
        if set(shared) != expected:
            missing, extra = expected - set(shared), set(shared) - expected
            raise ValueError(f"shared layers from the coordinator do not match: missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(extra)[:3]}")
        with torch.no_grad():
            for name, tensor in shared.items():
                self._named[name].copy_(tensor.to(self._named[name].device, self._named[name].dtype))

    def shared_state(self) -> dict[str, torch.Tensor]:
        return {name: self._named[name].detach().cpu().clone() for name in self.groups.shared}

    def run_round(self, server_round: int, proximal_mu: float) -> RoundOutcome:
        """One federated round at this site: decide on the budget, train, record it on the site's disk.

        Under DP the round is declined (``declined-budget``) when its planned steps would take the
        cumulative epsilon past the target; nothing is trained or spent then. Used by the ClientApp
        and by the simulations' baselines alike.
        """
        ledger = self.privacy_ledger() if self.config.privacy.enabled else None
        if ledger is not None:
            steps = self.planned_steps_per_round()
            if not ledger.can_spend(steps):
                logger.info("[%s] round %d declined: projected epsilon %.2f would exceed the budget %.2f",
                            self.settings.site_name, server_round, ledger.projected_epsilon(steps),
                            ledger.target_epsilon)
                return RoundOutcome(status=STATUS_DECLINED_BUDGET, num_examples=self.num_train, train_loss=0.0,
                                    steps=0, epsilon=ledger.spent_epsilon(), delta=ledger.delta, shared=None)
        trained = self.train_round(server_round, proximal_mu, ledger)
        epsilon, delta = (ledger.spent_epsilon(), ledger.delta) if ledger is not None else (0.0, 0.0)
        self.state.record_round(server_round, STATUS_OK, epsilon=epsilon, delta=delta,
                                num_examples=trained.num_examples, steps=trained.steps)
        return RoundOutcome(status=STATUS_OK, num_examples=trained.num_examples, train_loss=trained.mean_loss,
                            steps=trained.steps, epsilon=epsilon, delta=delta, shared=self.shared_state())

    def trained_shared_names(self) -> list[str]:
        """The shared parameters this site trains (``training.shared_trainable``); the others keep their global
        values this round (and their change is zero)."""
        mode = self.config.training.shared_trainable
        names = [n for n in self.groups.shared if n in self._named]
        if mode == "all":
            return names
        adapters = [n for n in names if n.endswith(ADAPTER_SUFFIXES)]
        if mode == "scale_shift":
            if not adapters:
                raise ValueError("training.shared_trainable = 'scale_shift' needs norm layers in the shared block; "
                                 "this architecture's shared layers have none: use 'weights'")
            return adapters
        return [n for n in names if n not in set(adapters)]

    def train_round(self, server_round: int, proximal_mu: float, ledger: PrivacyLedger | None) -> TrainingOutcome:
        training = self.config.training
        global_shared = self.shared_state()
        weights = self.loss_weights()
        seed = site_seed(self.config.seed, self.settings.site_name) * 1000 + server_round
        trained_shared = self.trained_shared_names()
        outcome = train_tail(
            self.model.tail(self.boundary),
            self.train.inputs,
            self.train.clinical,
            self.train.labels,
            named_shared=[(n, self._named[n]) for n in trained_shared],
            named_local=([] if training.training_head == "fixed_common" else
                         [(n, self._named[n]) for n in self.groups.local if n in self._named]),
            training=training,
            privacy=self.config.privacy,
            ledger=ledger,
            global_shared=global_shared,
            proximal_mu=proximal_mu,
            class_weights=weights,
            device=self.settings.torch_device(),
            seed=seed,
            augment=(random_flip_and_shift(generator=torch.Generator().manual_seed(seed + 3))
                     if training.augmentation else None),
            patients=self.train.patients,
        )
        local = set(self.groups.local)
        self.state.save_local_head(
            {name: tensor.detach().cpu() for name, tensor in self.model.state_dict().items() if name in local},
            backbone_fingerprint=self.fingerprint,
        )
        self._head_stamp = self.state.local_head_stamp()
        return outcome

    @torch.no_grad()
    def features(self, split: Split, tail: StagesTail | None = None) -> torch.Tensor:
        """Pooled image features (and clinical values) of ``split`` under the current shared layers
        (or under ``tail``'s, a personal copy)."""
        tail = (tail or self.model.tail(self.boundary)).eval()
        device = self.settings.torch_device()
        chunks = []
        for start in range(0, len(split.labels), 256):
            h = split.inputs[start : start + 256].to(device)
            for stage in tail.stages.values():
                h = stage(h)
            chunks.append(tail.head.features(h).float().cpu())
        pooled = torch.cat(chunks) if chunks else torch.zeros(0, self.model.feature_dim)
        return torch.cat([pooled, split.clinical.float()], dim=1) if split.clinical.numel() else pooled

    def fit_personal_head(self, global_id: str = "", finetune: bool = True) -> PersonalHead:
        """Fit and store this site's personal model on the current global layers (never sent; the
        procedure is ``client.personal_model``'s; ``finetune``: the ClientApp asks for the personal
        fine-tune at the federation's last round only)."""
        head, out_of_fold = fit_personal_model(
            self.model.tail(self.boundary), lambda tail: self.features(self.train, tail), self.train,
            training=self.config.training, num_classes=self.config.model.num_classes,
            shared_names=list(self.groups.shared), trainable_names=self.trained_shared_names(),
            pretrained_probe=self._pretrained_probe if self._pretrained_shared else None, finetune=finetune,
            seed=site_seed(self.config.seed, self.settings.site_name) + 17, device=self.settings.torch_device(),
            site_name=self.settings.site_name,
        )
        self.state.save_personal_head(head.state_dict(), global_id=global_id, backbone_fingerprint=self.fingerprint)
        self._record_model(global_id, None if out_of_fold is None else out_of_fold.softmax(dim=1))
        logger.info("[%s] personal head fitted on the %s layers (L2 %.3g, %d patient folds)", self.settings.site_name,
                    head.layers, head.l2, head.folds)
        return head

    def _pretrained_probe(self) -> tuple[PersonalHead, torch.Tensor | None]:
        """The probe on the pretrained layers, fitted once per session (its features never change)."""
        if self._pretrained_probe_fit is None:
            self._pretrained_probe_fit = fit_pretrained_probe(
                self.model.tail(self.boundary), lambda tail: self.features(self.train, tail), self.train,
                self._pretrained_shared, self.config.model.num_classes)
        return self._pretrained_probe_fit

    def personal_features(self, head: PersonalHead, split: Split) -> torch.Tensor:
        """``split``'s features under the layers ``head`` was fitted on: its own copy, else the global ones."""
        if head.shared is None:
            return self.features(split)
        return self.features(split, with_shared(self.model.tail(self.boundary), head.shared))

    @torch.no_grad()
    def evaluate(self, global_id: str = "", finetune: bool = True) -> dict[str, float]:
        """Test metrics of the site's model: its personal head on the global features (the default,
        ``training.personal_head = "linear_probe"``), or the head DP-SGD trained (``"none"``).

        The metrics, with a patient-bootstrap interval, are also kept in the site's ``site_model.json``
        for its model card (``client.inference``); only the returned keys may leave the site."""
        if self.config.training.personal_head == "none":
            self._record_model(global_id, None, why="the head trained with the shared layers (training.personal_head "
                               "= 'none') saw every training patient: none is left to validate a threshold on")
        metrics, interval = self._scored(self._test_logits(global_id, finetune), seed=self.config.seed)
        record_test_metrics(self.state.root, global_id=global_id, metrics={**metrics, **interval})
        return metrics

    def _record_model(self, global_id: str, validation_probabilities: torch.Tensor | None, why: str = "") -> None:
        """Choose the operating point on the validation patients and write ``site_model.json`` (never sent)."""
        point = operating_point_from_validation(validation_probabilities, self.train.labels, self.train.patients,
                                                list(self.config.model.class_names), self.config.operating_point,
                                                **({"no_validation_note": why} if why else {}))
        record_fit(self.state.root, config=self.config, backbone_fingerprint=self.fingerprint, global_id=global_id,
                   last_trained_round=self.state.last_trained_round(), operating_point=point)

    @torch.no_grad()
    def test_report(self, global_id: str = "", seed: int = 0) -> dict[str, float]:
        """``evaluate``'s metrics plus a 95% patient-bootstrap interval of the balanced accuracy.

        For the site's own use and for simulations; the interval is not a wire field.
        """
        metrics, interval = self._scored(self._test_logits(global_id), seed=seed)
        return {**metrics, **interval}

    def _scored(self, logits: torch.Tensor, seed: int) -> tuple[dict[str, float], dict[str, float]]:
        """The test metrics of ``logits``, and the balanced accuracy's 95% patient-bootstrap interval."""
        metrics = classification_metrics(logits, self.test.labels, self.config.model.num_classes)
        low, high = bootstrap_balanced_accuracy(logits, self.test.labels, self.test.patients, seed=seed)
        return metrics, {"ci-low": low, "ci-high": high, "test-patients": float(len(set(self.test.patients)))}

    def _test_logits(self, global_id: str, finetune: bool = True) -> torch.Tensor:
        if len(self.test.labels) == 0:
            raise ValueError("this site has no test images; lower data.test_fraction or add patients")
        if self.config.training.personal_head == "linear_probe":
            head = self._personal_head(global_id, finetune)
            return head.logits(self.personal_features(head, self.test).double())
        return self.trained_head_logits(self.test)

    def _personal_head(self, global_id: str, finetune: bool = True) -> PersonalHead:
        """The head stored for these global layers (the site's own evaluation already fitted it), else a new fit.

        Only a non-empty global-layers id identifies the features; without one (baselines) it is always fitted.
        """
        stored = self.state.load_personal_head() if global_id else None
        if stored is not None and stored[1] == {"global_id": global_id, "backbone_fingerprint": self.fingerprint}:
            return PersonalHead.from_state_dict(stored[0])
        return self.fit_personal_head(global_id, finetune)

    @torch.no_grad()
    def trained_head_logits(self, split: Split) -> torch.Tensor:
        """Logits of the head trained together with the shared layers (the one DP-SGD sees)."""
        tail = self.model.tail(self.boundary).eval()
        device = self.settings.torch_device()
        logits = []
        for start in range(0, len(split.labels), 256):
            logits.append(
                tail(split.inputs[start : start + 256].to(device),
                     split.clinical[start : start + 256].to(device)).float().cpu()
            )
        return torch.cat(logits)


def concatenate_splits(splits: list[Split]) -> Split:
    """Several sites' splits as one (pooled baselines); patient ids are prefixed by the split's position."""
    return Split(
        inputs=torch.cat([s.inputs for s in splits]),
        clinical=torch.cat([s.clinical for s in splits]),
        labels=torch.cat([s.labels for s in splits]),
        patients=[f"{i}/{p}" for i, s in enumerate(splits) for p in s.patients],
    )


def _take(inputs: torch.Tensor, data: SiteData, index: list[int] | torch.Tensor) -> Split:
    """A split: its tail inputs (already in split order) with its rows of clinical values and labels."""
    idx = torch.as_tensor(index, dtype=torch.long)
    return Split(inputs=inputs, clinical=data.clinical[idx].float(), labels=data.labels[idx].long(),
                  patients=[data.patient_ids[i] for i in idx.tolist()])
