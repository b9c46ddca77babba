"""The coordinator's share of a round's time, as a function of the number of sites.

Ray and the sites' training are left out on purpose: this times only what the coordinator does
with the replies of one round, exactly as ``server.federation_loop`` does it: validate each
train reply against the wire contract (``server.reply_validation.validate_train_reply``),
decode it (``common.wire.update_encoding.decode_update``), drop norm outliers, and aggregate
(``server.strategies``, the strategy's rule). A least-squares line through the timings at
several site counts, with its r^2, says whether that share grows linearly.

Every site sends the same reply content (built once, untimed) so that the measurement does not
need one full copy of the shared layers per site in memory twice over; validation and decoding
still read and copy every reply's tensors, as they would for distinct replies.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common import wire_contract as wc
from common.config import StrategyConfig
from common.wire.update_encoding import EncodedUpdate, encode_update, decode_update
from server.strategies import make_aggregator
from server.reply_validation import ValidReply, drop_norm_outliers, validate_train_reply
from simulations.benchmarks.bench_traffic import simulated_update

logger = logging.getLogger(__name__)

FINGERPRINT = "bench-fingerprint"


def site_reply(global_shared: Mapping[str, torch.Tensor], encoding: str, seed: int = 0) -> RecordDict:
    """A contract-conforming train reply carrying an encoded simulated update."""
    encoded = encode_update(simulated_update(global_shared, seed), global_shared, encoding)  # type: ignore[arg-type]
    records: dict[str, Any] = {
        wc.SHARED: ArrayRecord(torch_state_dict=encoded.tensors),
        wc.METRICS: MetricRecord({wc.NUM_EXAMPLES: 100, "train-loss": 0.5, "epsilon": 1.0, "delta": 1e-4}),
        wc.STATUS: ConfigRecord({wc.STATUS_KEY: wc.STATUS_OK, wc.STATUS_FINGERPRINT: FINGERPRINT,
                                 wc.STATUS_SITE_NAME: "bench-site"}),
    }
    if encoded.scales:
        records[wc.SHARED_SCALE] = ArrayRecord(torch_state_dict=encoded.scales)
    return RecordDict(records)


def coordinator_round_seconds(global_shared: Mapping[str, torch.Tensor], reply: RecordDict, num_sites: int,
                              encoding: str, strategy: StrategyConfig, norm_check: bool = True) -> tuple[float, float]:
    """Wall and CPU seconds the coordinator spends on ``num_sites`` train replies: validate, decode, aggregate.

    Args:
        global_shared: the global shared layers of the round.
        reply: the reply content every site sends (see :func:`site_reply`).
        num_sites: replies to process.
        encoding: the run's update encoding.
        strategy: the strategy section (picks the aggregation rule and the outlier factor).
        norm_check: also run the norm-outlier filter (the round loop does so from 3 replies on).
    """
    aggregator = make_aggregator(strategy)
    start, cpu_start = time.perf_counter(), time.process_time()
    updates: dict[str, tuple[dict[str, torch.Tensor], int]] = {}
    for site in range(num_sites):
        outcome = validate_train_reply(reply, global_shared, encoding, FINGERPRINT)  # type: ignore[arg-type]
        if not isinstance(outcome, ValidReply):
            raise RuntimeError(f"benchmark reply was not accepted by the coordinator: {outcome}")
        weights = decode_update(EncodedUpdate(
            tensors={k: torch.from_numpy(v.copy()) for k, v in outcome.tensors.items()},
            scales={k: torch.tensor(s, dtype=torch.float32) for k, s in outcome.scales.items()},
        ), global_shared)
        updates[f"site-{site}"] = (weights, outcome.num_examples)
    if norm_check and len(updates) >= 3:
        kept, _rejected = drop_norm_outliers({s: u[0] for s, u in updates.items()}, global_shared,
                                             strategy.norm_outlier_factor)
        updates = {s: updates[s] for s in kept}
    aggregator.aggregate(global_shared, list(updates.values()))
    return time.perf_counter() - start, time.process_time() - cpu_start


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> dict[str, float]:
    """Least-squares ``y = intercept + slope * x`` and its coefficient of determination r^2."""
    n = len(xs)
    if n < 2:
        raise ValueError("a linear fit needs at least two points")
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("a linear fit needs at least two different x values (federation sizes)")
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys))
    slope = sxy / sxx
    intercept = mean_y - slope * mean_x
    ss_res = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - mean_y) ** 2 for y in ys)
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return {"slope_s_per_site": slope, "intercept_s": intercept, "r2": r2}


def coordinator_scaling(global_shared: Mapping[str, torch.Tensor], site_counts: Sequence[int], encoding: str,
                        repeats: int = 2, strategy: StrategyConfig | None = None) -> dict[str, Any]:
    """Best-of-``repeats`` coordinator seconds per site count and the linear fit through them.

    Args:
        global_shared: the global shared layers (the benchmark policy's shared tensors).
        site_counts: numbers of replying sites to time, e.g. ``(10, 25, 50)``.
        encoding: update encoding of the replies.
        repeats: timings per site count; the fastest is kept (other processes add noise).
        strategy: the strategy section; default fedtl's default (FedProx, weighted average).
    """
    strategy = strategy or StrategyConfig()
    shared = {k: v.detach().cpu().float() for k, v in global_shared.items()}
    reply = site_reply(shared, encoding)
    coordinator_round_seconds(shared, reply, 1, encoding, strategy)  # warm-up (first-call costs)
    seconds: dict[int, float] = {}
    cpu_seconds: dict[int, float] = {}
    for count in site_counts:
        timings = [coordinator_round_seconds(shared, reply, count, encoding, strategy) for _ in range(repeats)]
        seconds[count] = min(wall for wall, _ in timings)
        cpu_seconds[count] = min(cpu for _, cpu in timings)
        logger.info("coordinator: %d sites in %.3f s (%.3f CPU s)", count, seconds[count], cpu_seconds[count])
    xs = [float(c) for c in site_counts]
    fit = linear_fit(xs, [seconds[c] for c in site_counts])
    cpu_fit = linear_fit(xs, [cpu_seconds[c] for c in site_counts])
    return {
        "what": "coordinator's share of a round only (reply validation + decoding + norm-outlier filter + "
                "aggregation); site training, Flower/Ray transport and evaluation are not included",
        "encoding": encoding,
        "strategy": strategy.name,
        "shared_values": int(sum(t.numel() for t in shared.values())),
        "seconds_by_sites": {str(c): round(s, 4) for c, s in seconds.items()},
        "ms_per_site": {str(c): round(1000 * s / c, 2) for c, s in seconds.items()},
        "linear_fit": fit,
        "cpu_seconds_by_sites": {str(c): round(s, 4) for c, s in cpu_seconds.items()},
        "linear_fit_cpu_time": cpu_fit,
        "repeats": repeats,
    }
