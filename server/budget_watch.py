"""The coordinator's check that a site's privacy budget only ever grows, and stays within the target.

A site reports its *cumulative* epsilon with every train reply. It can never go down: a lower
figure means the site's ledger was deleted or replaced (a silently restarted budget), and its
update is then trained under a guarantee nobody agreed to. A figure above the federation's target
means the site spent more than the federation allows. Either way the update is excluded from
aggregation, with the reason in ``metrics.json``; the site stays in the federation (it is still
evaluated), so its operators see it in the report and can fix the ledger.

The largest epsilon seen per site is rebuilt from the run's recorded rounds, so a resumed
coordinator keeps watching.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

# Epsilons travel as float64 and are recomputed by the same accountant; this only absorbs rounding.
_TOLERANCE = 1e-6


class BudgetWatch:
    """Largest cumulative epsilon each site has reported, and the federation's target."""

    def __init__(self, target_epsilon: float, recorded_rounds: Iterable[Mapping[str, Any]] = ()) -> None:
        self.target_epsilon = float(target_epsilon)
        self.largest: dict[str, float] = {}
        for record in recorded_rounds:
            for site, entry in record.get("sites", {}).items():
                epsilon = entry.get("epsilon")
                if entry.get("status") in ("ok", "declined-budget") and isinstance(epsilon, (int, float)):
                    self.largest[site] = max(self.largest.get(site, 0.0), float(epsilon))

    def check(self, site: str, epsilon: float) -> str | None:
        """``None`` when ``epsilon`` is a plausible next cumulative figure (then remembered), else why not."""
        previous = self.largest.get(site)
        if previous is not None and epsilon < previous * (1 - _TOLERANCE) - _TOLERANCE:
            return (f"privacy budget reset: cumulative epsilon went down from {previous:.4g} to {epsilon:.4g} "
                    "(the site's ledger.json was deleted or replaced); the site must restore its ledger "
                    "before its updates count again")
        if epsilon > self.target_epsilon * (1 + _TOLERANCE) + _TOLERANCE:
            return (f"privacy budget exceeded: cumulative epsilon {epsilon:.4g} is above the federation's "
                    f"target {self.target_epsilon:g}")
        self.largest[site] = max(previous or 0.0, epsilon)
        return None
