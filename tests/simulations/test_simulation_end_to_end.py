"""A small federation run end to end through Flower's simulation runtime (Ray)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from client.client_app import make_client_app
from common import wire_contract as wc
from common.config import FederationConfig
from tests.phi_canaries import CANARIES, canary_hits, plant_canaries
from simulations.simulate import SimulationIncomplete, SimulationPlan, run_federated, synthetic_sites

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic hospitals and the pretrained backbone, made once for the module (as ``runs/.cache`` is
    shared by runs); each test's hospitals keep their state in its own run folder."""
    return tmp_path_factory.mktemp("simulation-cache")


def tiny_plan(tmp_path: Path, cache: Path, rounds: int = 2, **privacy: object) -> SimulationPlan:
    config = FederationConfig.from_dict({
        "name": "tiny",
        "model": {"architecture": "resnet18", "image_size": 32},
        "privacy": {"enabled": True, "target_epsilon": 8.0, **privacy},
        "strategy": {"name": "fedprox", "min_sites": 2, "round_timeout_s": 120},
        "training": {"rounds": rounds, "local_epochs": 1, "batch_size": 16, "device": "cpu"},
    })
    return SimulationPlan(config=config, run_dir=tmp_path / "run", num_sites=3, site_scale=0.15,
                          cache_root=cache)


class _GarbageSite:
    """Wraps the real ClientApp; one partition answers train with NaN in every floating-point tensor
    (with the default int8 encoding: the per-tensor scales; int8 codes cannot be NaN)."""

    def __init__(self, real: ClientApp, bad_partition: int) -> None:
        self.real, self.bad = real, bad_partition

    def __call__(self, msg: Message, context: Context) -> Message:
        reply = self.real(msg, context)
        if int(context.node_config["partition-id"]) == self.bad and wc.SHARED in reply.content:
            for name in (wc.SHARED, wc.SHARED_SCALE):
                if name not in reply.content:
                    continue
                record = reply.content[name]
                poisoned = {key: np.full_like(array, np.nan) if np.issubdtype(array.dtype, np.floating) else array
                            for key, array in zip(record.keys(), record.to_numpy_ndarrays())}
                reply.content[name] = ArrayRecord({k: Array(v) for k, v in poisoned.items()})
        return reply


@dataclasses.dataclass
class InterruptedFederation:
    """One federation, observed by several tests (a simulation costs a minute of CPU): three sites,
    hospital-1 answering train with NaN tensors; the coordinator dies as round 2 begins and the run
    is resumed."""

    plan: SimulationPlan
    interrupted: dict
    metrics: dict


@pytest.fixture(scope="module")
def federation_logs() -> list[str]:
    """Every log line of the test process while the federation runs (the coordinator's included)."""
    return []


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory, shared_cache: Path,
               federation_logs: list[str]) -> InterruptedFederation:
    import logging

    import server.federation_loop as loop

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            federation_logs.append(self.format(record))

    plan = tiny_plan(tmp_path_factory.mktemp("federation"), shared_cache)
    sites = synthetic_sites(plan)
    plant_canaries(sites[0].manifest)  # hospital-0's files, headers and rows name a patient
    real = make_client_app(sites)
    garbage_app = ClientApp()
    garbage_app.train()(_GarbageSite(real, bad_partition=1))
    garbage_app.evaluate()(real)
    garbage_app.query()(real)
    real_train = loop._train

    def crash_in_round_two(grid, config, backbone, broadcast, nodes, server_round, traffic):  # type: ignore[no-untyped-def]
        # killed as round 2 begins: a kill after the sites trained would make them spend round 2's
        # budget twice, and the resumed round would rightly be declined
        if server_round == 2:
            raise KeyboardInterrupt("coordinator killed during round 2")
        return real_train(grid, config, backbone, broadcast, nodes, server_round, traffic)

    collect = Collect(level=logging.DEBUG)
    logging.getLogger().addHandler(collect)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("simulations.simulate.make_client_app", lambda directory: garbage_app)
        patch.setattr(loop, "_train", crash_in_round_two)
        with pytest.raises(SimulationIncomplete, match="--resume"):
            run_federated(plan, sites)
        interrupted = json.loads((plan.run_dir / "metrics.json").read_text())
        patch.setattr(loop, "_train", real_train)
        metrics = run_federated(dataclasses.replace(plan, resume=True), sites)
    logging.getLogger().removeHandler(collect)
    return InterruptedFederation(plan, interrupted, metrics)


def test_a_small_federation_runs_every_round_and_records_each_site(federation: InterruptedFederation) -> None:
    metrics, plan = federation.metrics, federation.plan
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    for record in metrics["rounds"]:
        assert set(record["sites"]) == {"hospital-0", "hospital-1", "hospital-2"}
        for site, row in record["sites"].items():
            assert row["status"] == ("dropped" if site == "hospital-1" else "ok"), (site, row)
            assert row["eval_status"] == "ok"  # the garbage site is still evaluated
            assert 0.0 < row["epsilon"] <= 8.0
            assert 0.0 <= row["balanced_accuracy"] <= 1.0
            assert row["eval_num_examples"] > 0
    eps = [[r["sites"][s]["epsilon"] for r in metrics["rounds"]] for s in metrics["rounds"][0]["sites"]]
    assert all(a < b for a, b in eps), "cumulative epsilon must grow every round"
    assert (plan.run_dir / "metrics.csv").exists()
    assert (plan.run_dir / "checkpoints").is_dir()
    # the backbone travels once per site, not every round
    first, second = metrics["rounds"]
    assert second["bytes_sent"] < first["bytes_sent"]
    # the int8 round trip (a site gets the global layers as an int8 delta from its own copy) is
    # tests/server/test_global_broadcast.py's; a resumed coordinator first sends full weights
    for site, row in second["sites"].items():
        assert 0 < row["bytes_received"] < row["bytes_sent"] < first["sites"][site]["bytes_sent"], (site, row)


def test_resume_after_an_interrupted_run_continues_from_the_last_completed_round(
    federation: InterruptedFederation,
) -> None:
    assert [r["round"] for r in federation.interrupted["rounds"]] == [1]
    assert [r["round"] for r in federation.metrics["rounds"]] == [1, 2]
    assert federation.metrics["rounds"][0] == federation.interrupted["rounds"][0], "the completed round is kept"


def test_one_site_returning_garbage_is_dropped_and_the_rounds_go_on(federation: InterruptedFederation) -> None:
    for record in federation.metrics["rounds"]:
        reasons = {d["site"]: d["reason"] for d in record["dropped"]}
        assert "hospital-1" in reasons and "nan" in reasons["hospital-1"].lower(), reasons
        for site in ("hospital-0", "hospital-2"):
            assert record["sites"][site]["status"] == "ok"
            assert math.isfinite(record["sites"][site]["balanced_accuracy"])
        assert record["aggregate"]["sites_trained"] == 2
    saved = json.loads((federation.plan.run_dir / "metrics.json").read_text())
    assert saved["rounds"][-1]["aggregate"]["sites_trained"] == 2


def test_no_phi_canary_of_a_site_reaches_what_the_coordinator_stores_or_logs(
    federation: InterruptedFederation, federation_logs: list[str]
) -> None:
    run_dir = federation.plan.run_dir
    stored = [p for p in run_dir.rglob("*") if p.is_file() and (run_dir / "sites") not in p.parents]
    logged = "\n".join(federation_logs)

    assert (run_dir / "metrics.json") in stored and logged
    assert canary_hits(stored) == []
    assert not [canary for canary in CANARIES if canary in logged]
    assert federation.metrics["rounds"][0]["sites"]["hospital-0"]["eval_status"] == "ok"  # 3 bad rows did not stop it
