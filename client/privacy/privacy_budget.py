"""A site's privacy budget for the whole federation, kept on the site's own disk.

Unit of privacy
---------------
The guarantee is (epsilon, delta)-differential privacy with DP-SGD and Poisson sampling of the
ledger's *unit* (``plan.unit``):

* ``"patient"`` (the default): each step samples patients (every patient independently with
  probability q), sums each sampled patient's per-image gradients and clips that sum
  (``client.dp.patient_sampling``). Adding or removing ALL of one patient's images changes the
  distribution of the shared-layer updates the site sends (all rounds together) by at most the
  factor e^epsilon, up to probability delta.
* ``"image"``: the same for a single image. A patient with k images is then protected only by
  group privacy, roughly ``k * epsilon`` and ``k * e^((k-1) * epsilon) * delta``.

What this covers is the shared-layer updates; the other fields a site sends are listed with
their status in ``common.wire_contract``.

How the budget is spent
-----------------------
* The noise multiplier is chosen ONCE, for all planned steps of the federation
  (``rounds x local_epochs x steps_per_epoch``), by ``client.privacy.privacy_plan.plan_noise``. It is
  never re-planned: re-planning every round (``make_private_with_epsilon``) spends the whole
  budget every round.
* The :class:`PrivacyLedger` keeps the accountant's history (``(noise_multiplier, sample_rate,
  steps)`` triples) in ``ledger.json``. Every epsilon it reports is cumulative over all rounds
  and process restarts.
* Before a round the caller asks :meth:`PrivacyLedger.can_spend`; when the projected epsilon
  would exceed the target the site declines the round (``STATUS_DECLINED_BUDGET``).
* A ledger whose plan inputs changed incompatibly (another delta, another accountant, a larger
  sample rate, a larger target) is refused, never reset: the spent budget stays counted.

Attaching the restored accountant to Opacus
-------------------------------------------
``PrivacyEngine.make_private`` binds the step hook to ``privacy_engine.accountant`` at the
moment it is called, so the restored accountant must be in place BEFORE ``make_private``::

    if not ledger.can_spend(steps):           # projected cumulative epsilon > target
        reply STATUS_DECLINED_BUDGET
    ledger.reserve(steps)                      # on disk before any step is taken
    engine = PrivacyEngine(accountant=ledger.accountant_kind)
    ledger.attach(engine)                      # engine.accountant = ledger.accountant()
    model, optimizer, loader = engine.make_private(..., noise_multiplier=ledger.noise_multiplier)
    try:
        ... train ...
    finally:
        epsilon = ledger.record(engine.accountant)  # cumulative epsilon, saved atomically
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from opacus.accountants import create_accountant
from opacus.accountants.accountant import IAccountant

from client.privacy.budget_errors import LedgerCorruptError, LedgerPlanMismatchError, PrivacyBudgetError
from client.privacy.privacy_plan import (
    AccountantKind,
    PrivacyPlan,
    check_plan_inputs,
    check_sample_rate,
    plan_noise,
)
from client.privacy.rdp_epsilon import rdp_epsilon
from common.atomic_io import atomic_write_json

logger = logging.getLogger(__name__)

LEDGER_FORMAT_VERSION = 1
_REL_TOLERANCE = 1e-9

HistoryEntry = tuple[float, float, int]

class PrivacyLedger:
    """The site's cumulative privacy spending, persisted in one JSON file.

    Create or resume with :meth:`load_or_create`; a new process loading the same file resumes
    the same budget. Use :meth:`can_spend` before a round, :meth:`attach` before
    ``make_private`` and :meth:`record` after the round.
    """

    def __init__(
        self,
        path: Path,
        *,
        plan: PrivacyPlan,
        noise_multiplier: float,
        history: list[HistoryEntry],
        rounds_done: int = 0,
        reserved_steps: int = 0,
        target_epsilon: float | None = None,
    ) -> None:
        self.path = Path(path)
        self.plan = plan
        self.noise_multiplier = float(noise_multiplier)
        self.history: list[HistoryEntry] = list(history)
        self.rounds_done = int(rounds_done)
        self.reserved_steps = int(reserved_steps)
        self.target_epsilon = float(plan.target_epsilon if target_epsilon is None else target_epsilon)

    # ------------------------------------------------------------------ creation / loading
    @classmethod
    def load_or_create(
        cls,
        path: str | Path,
        *,
        target_epsilon: float,
        delta: float,
        sample_rate: float,
        planned_steps: int,
        accountant: AccountantKind = "rdp",
        unit: str = "image",
    ) -> PrivacyLedger:
        """Resume the ledger at ``path`` or, when the file does not exist, plan and create it.

        A resumed ledger keeps its noise multiplier and history. Compatible changes (a smaller
        target epsilon, a smaller sample rate, another number of planned steps) are accepted
        with a warning; incompatible ones raise :class:`LedgerPlanMismatchError`.

        Args:
            path: the ledger file, normally ``<site state>/ledger.json``.
            target_epsilon: total epsilon for the federation.
            delta: the site's delta.
            sample_rate: Poisson sample rate of one step.
            planned_steps: steps over all planned rounds.
            accountant: ``"rdp"`` or ``"prv"``.
            unit: ``"patient"`` or ``"image"``: what delta, the sample rate and the steps count.
        """
        path = Path(path)
        if unit not in ("patient", "image"):
            raise ValueError(f"unit must be 'patient' or 'image', got {unit!r}")
        requested = PrivacyPlan(
            target_epsilon=float(target_epsilon),
            delta=float(delta),
            sample_rate=float(sample_rate),
            planned_steps=int(planned_steps),
            accountant=str(accountant),
            unit=unit,
        )
        check_plan_inputs(
            requested.target_epsilon,
            requested.delta,
            requested.sample_rate,
            requested.planned_steps,
            requested.accountant,
        )
        if path.exists():
            ledger = cls.load(path)
            ledger._accept_requested_plan(requested)
            return ledger
        sigma = plan_noise(
            requested.target_epsilon,
            requested.delta,
            requested.sample_rate,
            requested.planned_steps,
            requested.accountant,  # type: ignore[arg-type]
        )
        ledger = cls(path, plan=requested, noise_multiplier=sigma, history=[])
        ledger.save()
        logger.info("created privacy ledger %s", path)
        return ledger

    @classmethod
    def load(cls, path: str | Path) -> PrivacyLedger:
        """Read an existing ledger; a missing, unreadable or tampered file raises.

        Args:
            path: the ledger file.
        """
        path = Path(path)
        try:
            raw_text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise
        except OSError as error:
            reason = f"it can not be read ({error})"
            raise LedgerCorruptError(_corrupt_message(path, reason)) from error
        try:
            document = json.loads(raw_text)
            body = document["ledger"]
            checksum = document["checksum"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            reason = f"it is not a ledger document ({error})"
            raise LedgerCorruptError(_corrupt_message(path, reason)) from error
        if _checksum(body) != checksum:
            raise LedgerCorruptError(_corrupt_message(path, "its checksum does not match its content"))
        try:
            if body["format_version"] != LEDGER_FORMAT_VERSION:
                raise LedgerCorruptError(
                    _corrupt_message(path, f"it has format version {body['format_version']!r}")
                )
            plan = PrivacyPlan(**body["plan"])
            history = [_history_entry(entry) for entry in body["history"]]
            ledger = cls(
                path,
                plan=plan,
                noise_multiplier=float(body["noise_multiplier"]),
                history=history,
                rounds_done=int(body["rounds_done"]),
                reserved_steps=int(body["reserved_steps"]),
                target_epsilon=float(body["target_epsilon"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            reason = f"a field is missing or wrong ({error!r})"
            raise LedgerCorruptError(_corrupt_message(path, reason)) from error
        ledger._settle_unfinished_round()
        return ledger

    def _settle_unfinished_round(self) -> None:
        """Count a reservation left by a process that died mid-round as fully spent."""
        if not self.reserved_steps:
            return
        logger.warning(
            "privacy ledger %s: a round reserved %d steps and never recorded them (the process "
            "stopped mid-round); they are counted as spent",
            self.path,
            self.reserved_steps,
        )
        self.history = self._history_with(self.reserved_steps, self.sample_rate)
        self.reserved_steps = 0
        self.save()

    def _accept_requested_plan(self, requested: PrivacyPlan) -> None:
        current = self.plan
        where = f"privacy ledger {self.path}"
        if requested.accountant != current.accountant:
            raise LedgerPlanMismatchError(
                f"{where} was planned with the {current.accountant!r} accountant; the configuration "
                f"now asks for {requested.accountant!r}. Set privacy.accountant = "
                f"{current.accountant!r}: the budget already spent stays counted."
            )
        if requested.unit != current.unit:
            raise LedgerPlanMismatchError(
                f"{where} protects one {current.unit}; the configuration now asks for the {requested.unit} "
                f"unit. A budget's unit can not change mid-federation: set privacy.unit = {current.unit!r} "
                "for this federation (the budget already spent stays counted)."
            )
        if not math.isclose(requested.delta, current.delta, rel_tol=_REL_TOLERANCE):
            raise LedgerPlanMismatchError(
                f"{where} was planned for delta={current.delta:.6g}; the configuration now gives "
                f"delta={requested.delta:.6g} (did the training set size change?). Set "
                f"privacy.target_delta = {current.delta!r} to continue with the same budget."
            )
        if requested.sample_rate > current.sample_rate * (1 + _REL_TOLERANCE):
            raise LedgerPlanMismatchError(
                f"{where} planned its noise for sample rate {current.sample_rate:.6g}; this round would "
                f"sample at {requested.sample_rate:.6g} (larger batches or a smaller training set), "
                "which spends more privacy per step. Use a batch size / training set that keeps the "
                f"sample rate at or below {current.sample_rate:.6g}."
            )
        if requested.target_epsilon > self.target_epsilon * (1 + _REL_TOLERANCE):
            raise LedgerPlanMismatchError(
                f"{where} holds a target epsilon of {self.target_epsilon}; the configuration asks for "
                f"{requested.target_epsilon}. A site's budget can not be raised by a configuration "
                f"change; set privacy.target_epsilon <= {self.target_epsilon}."
            )
        if requested.target_epsilon < self.target_epsilon:
            logger.warning(
                "%s: target epsilon lowered from %s to %s; the noise multiplier stays %.4f",
                where,
                self.target_epsilon,
                requested.target_epsilon,
                self.noise_multiplier,
            )
            self.target_epsilon = requested.target_epsilon
            self.save()
        if requested.sample_rate < current.sample_rate * (1 - _REL_TOLERANCE):
            logger.warning(
                "%s: sample rate %.6g is below the planned %.6g; the planned noise multiplier is kept",
                where,
                requested.sample_rate,
                current.sample_rate,
            )
        if requested.planned_steps != current.planned_steps:
            logger.warning(
                "%s: %d steps are planned now, %d were planned when the noise was chosen; the noise "
                "multiplier is kept, so the budget may run out before the last round",
                where,
                requested.planned_steps,
                current.planned_steps,
            )

    # ------------------------------------------------------------------ properties
    @property
    def unit(self) -> str:
        """What one unit of privacy is: ``"patient"`` or ``"image"``."""
        return self.plan.unit

    @property
    def delta(self) -> float:
        """The site's delta (fixed for the ledger's life)."""
        return self.plan.delta

    @property
    def sample_rate(self) -> float:
        """The planned Poisson sample rate of one step."""
        return self.plan.sample_rate

    @property
    def accountant_kind(self) -> str:
        """``"rdp"`` or ``"prv"``: pass to ``PrivacyEngine(accountant=...)``."""
        return self.plan.accountant

    @property
    def steps_done(self) -> int:
        """DP-SGD steps recorded so far over all rounds."""
        return sum(steps for _, _, steps in self.history)

    # ------------------------------------------------------------------ epsilon
    def spent_epsilon(self) -> float:
        """Cumulative epsilon spent so far (including steps reserved by an unfinished round)."""
        history = self._history_with(self.reserved_steps, self.sample_rate)
        return self._epsilon_of(history)

    def projected_epsilon(self, steps: int, sample_rate: float | None = None) -> float:
        """Cumulative epsilon after ``steps`` more steps at this ledger's noise multiplier.

        Args:
            steps: DP-SGD steps the next round would take.
            sample_rate: the round's sample rate; default the planned one.
        """
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        rate = self.sample_rate if sample_rate is None else float(sample_rate)
        check_sample_rate(rate)
        history = self._history_with(self.reserved_steps, self.sample_rate)
        history = _append_steps(history, self.noise_multiplier, rate, steps)
        return self._epsilon_of(history)

    def can_spend(self, steps: int, sample_rate: float | None = None) -> bool:
        """Whether ``steps`` more steps keep the cumulative epsilon within the target.

        Args:
            steps: DP-SGD steps the next round would take.
            sample_rate: the round's sample rate; default the planned one.
        """
        projected = self.projected_epsilon(steps, sample_rate)
        allowed = projected <= self.target_epsilon
        if not allowed:
            logger.info(
                "privacy budget: %d more steps would reach epsilon %.3f > target %.3f",
                steps,
                projected,
                self.target_epsilon,
            )
        return allowed

    def _epsilon_of(self, history: list[HistoryEntry]) -> float:
        if not history:
            return 0.0
        if self.accountant_kind == "rdp":
            return rdp_epsilon(history, self.delta)  # Opacus' RDP arithmetic, one-step RDP cached
        accountant = create_accountant(mechanism=self.accountant_kind)
        accountant.history = list(history)
        return float(accountant.get_epsilon(delta=self.delta))

    def _history_with(self, steps: int, sample_rate: float) -> list[HistoryEntry]:
        return _append_steps(list(self.history), self.noise_multiplier, sample_rate, steps)

    # ------------------------------------------------------------------ accountant hand-off
    def accountant(self) -> IAccountant:
        """A fresh Opacus accountant holding this ledger's history (reservations excluded)."""
        accountant = create_accountant(mechanism=self.accountant_kind)
        accountant.load_state_dict({"history": list(self.history), "mechanism": self.accountant_kind})
        return accountant

    def attach(self, privacy_engine: Any) -> IAccountant:
        """Put the restored accountant into ``privacy_engine``; call BEFORE ``make_private``.

        ``make_private`` binds its step hook to the engine's accountant at call time; an
        accountant swapped in afterwards would never see the steps.

        Args:
            privacy_engine: an ``opacus.PrivacyEngine`` built with ``accountant=self.accountant_kind``.
        """
        restored = self.accountant()
        privacy_engine.accountant = restored
        return restored

    def reserve(self, steps: int) -> None:
        """Persist, before training, that a round of ``steps`` steps is about to run.

        If the process dies mid-round the reservation stays on disk and is counted as spent
        (conservative) by the next process that loads the ledger; :meth:`record` replaces it
        with what the accountant really saw. Call :meth:`record` in a ``finally`` so a round
        that fails part-way records the steps it did take.

        Args:
            steps: DP-SGD steps the round will take at most.
        """
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        self._settle_unfinished_round()
        self.reserved_steps = int(steps)
        self.save()

    def record(self, accountant: IAccountant) -> float:
        """Store the accountant's history after a round; return the cumulative epsilon.

        The accountant must have started from :meth:`accountant` (or :meth:`attach`): its
        history has to extend this ledger's history, otherwise the steps of earlier rounds
        would be forgotten and :class:`PrivacyBudgetError` is raised.

        Args:
            accountant: the Opacus accountant that was attached to the round's PrivacyEngine.
        """
        if accountant.mechanism() != self.accountant_kind:
            raise PrivacyBudgetError(
                f"privacy ledger {self.path} uses the {self.accountant_kind!r} accountant, the round "
                f"used {accountant.mechanism()!r}; build PrivacyEngine(accountant="
                f"{self.accountant_kind!r}) and call ledger.attach(engine) before make_private"
            )
        new_history = [_history_entry(entry) for entry in accountant.state_dict()["history"]]
        if _steps_total(new_history) < self.steps_done or not _extends(new_history, self.history):
            raise PrivacyBudgetError(
                f"the accountant's history does not continue privacy ledger {self.path} "
                f"({_steps_total(new_history)} steps, the ledger has {self.steps_done}); the round "
                "started from a fresh accountant. Call ledger.attach(engine) before make_private. "
                "The ledger was not changed."
            )
        self.history = new_history
        self.reserved_steps = 0
        self.rounds_done += 1
        self.save()
        epsilon = self.spent_epsilon()
        if epsilon > self.target_epsilon:
            logger.error(
                "privacy ledger %s: cumulative epsilon %.3f exceeds the target %.3f",
                self.path,
                epsilon,
                self.target_epsilon,
            )
        return epsilon

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        """The JSON-safe body of the ledger file."""
        return {
            "format_version": LEDGER_FORMAT_VERSION,
            "plan": asdict(self.plan),
            "noise_multiplier": self.noise_multiplier,
            "target_epsilon": self.target_epsilon,
            "history": [[float(nm), float(q), int(steps)] for nm, q, steps in self.history],
            "rounds_done": self.rounds_done,
            "reserved_steps": self.reserved_steps,
        }

    def save(self) -> None:
        """Write the ledger atomically (temporary file, fsync, rename) with a checksum."""
        body = self.to_dict()
        atomic_write_json(self.path, {"ledger": body, "checksum": _checksum(body)})


def _append_steps(
    history: list[HistoryEntry], noise_multiplier: float, sample_rate: float, steps: int
) -> list[HistoryEntry]:
    """Append ``steps`` steps the way Opacus' accountants merge equal consecutive entries."""
    history = list(history)
    if steps <= 0:
        return history
    if history and history[-1][0] == noise_multiplier and history[-1][1] == sample_rate:
        last = history.pop()
        history.append((last[0], last[1], last[2] + steps))
    else:
        history.append((noise_multiplier, sample_rate, steps))
    return history


def _extends(new: list[HistoryEntry], old: list[HistoryEntry]) -> bool:
    """Whether ``new`` is ``old`` followed by more steps (the last entry may have grown)."""
    if not old:
        return True
    if len(new) < len(old):
        return False
    for index, (old_entry, new_entry) in enumerate(zip(old, new)):
        same_mechanism = old_entry[0] == new_entry[0] and old_entry[1] == new_entry[1]
        if not same_mechanism:
            return False
        is_last = index == len(old) - 1
        if (new_entry[2] < old_entry[2]) if is_last else (new_entry[2] != old_entry[2]):
            return False
    return True


def _steps_total(history: list[HistoryEntry]) -> int:
    return sum(steps for _, _, steps in history)


def _history_entry(entry: Any) -> HistoryEntry:
    noise_multiplier, sample_rate, steps = entry
    return (float(noise_multiplier), float(sample_rate), int(steps))


def _checksum(body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _corrupt_message(path: Path, reason: str) -> str:
    return (
        f"privacy ledger {path} is corrupt: {reason}. The site refuses to train, because "
        "starting a new ledger would forget the privacy budget already spent. Restore the file "
        "from a backup or ask the data protection officer how to proceed; do NOT delete it."
    )
