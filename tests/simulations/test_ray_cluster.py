"""The simulation on a real Ray cluster: a head and a second node started with ``ray start``, sites on both.

What a researcher does on two machines, here on one: ``ray start --head`` (its own temp dir and free
ports, on 127.0.0.1), ``ray start --address HEAD`` for a second node, then ``fedtl simulate`` with
``RAY_ADDRESS`` set, on their own per-site manifests (``--sites-from``). The simulation joins that
cluster instead of starting a local Ray; each node offers one CPU, so Flower's actor pool puts one
site actor on each, and Ray's own records (the GCS actor table and task events) must show site
messages processed on both nodes. Each node is stopped through its own ``ray start --block``
process (never ``ray stop``, which would stop every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.config import ModelConfig
from common.data.synthetic_hospitals import generate_federation
from common.models.backbones import build_backbone
from common.models.model_weights import save_backbone_checkpoint
from simulations import cli

pytestmark = pytest.mark.slow

RAY = Path(sys.executable).parent / "ray"
HEAD_RESOURCE, SECOND_RESOURCE = "fedtl_head", "fedtl_second"
OBJECT_STORE_BYTES = 100 * 1024 * 1024


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RayNode:
    """One ``ray start --block`` process (a head or a node joining one); :meth:`stop` ends only what it started."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
        env.pop("RAY_ADDRESS", None)
        with log.open("w") as handle:
            self.process = subprocess.Popen([str(RAY), "start", "--block", "--disable-usage-stats", *args],
                                            stdout=handle, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)

    def wait_started(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "Ray runtime started" in self.log.read_text():
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.5)
        raise AssertionError(f"ray start did not come up:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # ray start --block then stops the processes it started
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # anything of this node's own process group still left
        except ProcessLookupError:
            pass
        self.process.wait(timeout=10)


def node_ports() -> list[str]:
    worker_low = free_port()
    return ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--object-store-memory", str(OBJECT_STORE_BYTES),
            "--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
            "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
            "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
            "--min-worker-port", str(worker_low), "--max-worker-port", str(worker_low + 40)]


@pytest.fixture()
def ray_cluster() -> Iterator[str]:
    """A two-node Ray cluster on 127.0.0.1; yields the head's address."""
    temp = Path(tempfile.mkdtemp(prefix="fedtl-ray-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    address = f"127.0.0.1:{free_port()}"
    nodes: list[RayNode] = []
    try:
        head = RayNode(["--head", "--port", address.rsplit(":", 1)[1], "--temp-dir", str(temp / "ray"),
                        "--include-dashboard=false", "--ray-client-server-port", str(free_port()),
                        "--resources", json.dumps({HEAD_RESOURCE: 1}), *node_ports()], temp / "head.log")
        nodes.append(head)
        head.wait_started()
        second = RayNode(["--address", address, "--resources", json.dumps({SECOND_RESOURCE: 1}), *node_ports()],
                         temp / "second.log")
        nodes.append(second)
        second.wait_started()
        yield address
    finally:
        for node in reversed(nodes):
            node.stop()
        shutil.rmtree(temp, ignore_errors=True)


def sites_that_ran_per_node(address: str) -> dict[str, int]:
    """From Ray's own records: how many ClientApp messages each node's actors processed, by node resource."""
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        node_of_resource = {resource: node["NodeID"] for node in ray.nodes()
                            for resource in (HEAD_RESOURCE, SECOND_RESOURCE) if resource in node["Resources"]}
        actor_nodes = {actor_id: actor["Address"]["NodeID"] for actor_id, actor in state.actor_table(None).items()
                       if actor["ActorClassName"] == "ClientAppActor"}
        runs: dict[str, int] = {resource: 0 for resource in node_of_resource}
        resource_of_node = {node: resource for resource, node in node_of_resource.items()}
        for raw in state._connect_and_get_accessor().get_task_events():
            event = gcs_pb2.TaskEvents.FromString(raw)
            if event.HasField("task_info") and event.task_info.name == "ClientAppActor.run":
                node = actor_nodes.get(event.task_info.actor_id.hex())
                if node in resource_of_node:
                    runs[resource_of_node[node]] += 1
        return runs
    finally:
        ray.shutdown()


def test_a_simulation_on_own_manifests_runs_its_sites_on_both_nodes_of_a_ray_cluster(
    ray_cluster: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    # the researcher's data: one folder per hospital, each with its manifest.csv
    written = generate_federation(tmp_path / "generated", num_sites=2, seed=0, image_size=32, site_sizes=[28, 28])
    study = tmp_path / "study"
    for name, manifest in zip(("north", "south"), written, strict=True):
        shutil.move(str(manifest.parent), study / name)
    # a backbone file of the researcher's (any fedtl checkpoint; this one is untrained), so that the test
    # spends its time on the cluster, not on pretraining
    backbone = tmp_path / "backbone.pt"
    untrained = build_backbone(ModelConfig(image_size=32), load_weights=False)
    save_backbone_checkpoint(backbone, untrained, ((0.5,), (0.25,)))
    config = tmp_path / "cluster.toml"
    config.write_text(
        f'name = "cluster"\n[model]\nimage_size = 32\ncheckpoint = "{backbone}"\n[privacy]\nenabled = false\n'
        '[strategy]\nmin_sites = 2\nround_timeout_s = 300\n'
        '[training]\nrounds = 1\nlocal_epochs = 1\nbatch_size = 16\ndevice = "cpu"\n'
    )
    monkeypatch.setenv("RAY_ADDRESS", ray_cluster)
    started = time.perf_counter()
    code = cli.main(["simulate", "--config", str(config), "--sites-from", str(study), "--out", str(tmp_path / "run"),
                     "--no-baselines", "--parallel", "2"])
    wall = time.perf_counter() - started
    out = capsys.readouterr().out
    assert code == 0, out
    assert "| north |" in out and "| south |" in out  # the pre-flight summary came first
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1]
    statuses = {site: row["status"] for site, row in metrics["rounds"][0]["sites"].items()}
    assert statuses == {"north": "ok", "south": "ok"}
    assert set(metrics["per_site_final"]["federated"]) == {"north", "south"}
    assert any((tmp_path / "run" / "tensorboard").iterdir())
    runs = sites_that_ran_per_node(ray_cluster)
    assert runs[HEAD_RESOURCE] > 0 and runs[SECOND_RESOURCE] > 0, f"ClientApp messages per node: {runs}"
    print(f"simulation on the cluster: {wall:.1f} s; ClientApp messages per node: {runs}")
