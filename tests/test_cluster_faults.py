"""A lost node, for real: a Ray cluster of a head and two worker nodes on this machine (each
node its own raylet, all on 127.0.0.1, token auth on, 1 CPU per worker node, none on the
head), storage on the S3-protocol server. A worker node is killed mid-epoch (its raylet and
every process under it, by pid, SIGKILL), as a spot instance vanishes; a replacement node
joins some seconds later, as an autoscaler would bring one.

    python -m pytest -q tests/test_cluster_faults.py
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from conftest import descendants, fit_in_thread, free_port, wait_until

from cifar_ray import ray_internals, storage
from cifar_ray.config import PhaseConfig, TrainConfig

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def nodes(s3_server):
    """The cluster; yields it with its two worker nodes. GCS declares a silent node dead after
    3 missed 1 s health checks (Ray's default takes tens of seconds)."""
    import ray
    from ray.cluster_utils import Cluster

    ray_internals.single_machine()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=0, node_ip_address="127.0.0.1", include_dashboard=True,
        dashboard_host="127.0.0.1", dashboard_port=free_port(),
        _system_config={"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                        "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}))
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        ray.init(address=cluster.address)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def _train_worker_nodes(cluster) -> list:
    """The worker nodes that host a RayTrainWorker now."""
    def hosts(node) -> bool:
        for pid in descendants(ray_internals.raylet_pid(node)):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"RayTrainWorker" in f.read():
                        return True
            except OSError:
                pass
        return False
    return [n for n in cluster.worker_nodes if hosts(n)]


def _kill_node(node) -> None:
    """SIGKILL the node's raylet and every process under it, by pid."""
    raylet = ray_internals.raylet_pid(node)
    for pid in descendants(raylet) | {raylet}:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_lost_node_is_replaced_and_the_run_resumes_from_its_checkpoint(nodes, s3_data,
                                                                        bucket):
    cfg = TrainConfig(data=s3_data, dataset="tiny", storage=f"s3://{bucket}/runs",
                      name="spot", workers=2, cpus_per_worker=1, weights="none",
                      resource_timeout_s=5,  # the default --max-failures (3) applies
                      phase1=PhaseConfig(epochs=1, lr=1e-3, batch_size=64),
                      phase2=PhaseConfig(epochs=6, lr=1e-3, optimizer="sgd", batch_size=64))
    t, out = fit_in_thread(cfg)
    run = cfg.run_uri()
    # Mid-epoch: once phase 2's first epoch is stored, the second is in flight.
    wait_until(lambda: storage.exists(storage.join(run, "checkpoint-p2-e000",
                                                   "state.pt.sha256")),
               900, "phase 2's first checkpoint")
    victim = wait_until(lambda: _train_worker_nodes(nodes), 60,
                        "a node hosting a training worker")[0]
    def rows() -> list[dict]:
        return [json.loads(r) for r in storage.read_bytes(storage.join(run, "metrics.jsonl"))
                .decode().splitlines()]

    stored = rows()[-1]  # metrics rows land after their checkpoint
    killed = time.monotonic()
    _kill_node(victim)
    nodes.worker_nodes.discard(victim)  # gone: shutdown has nothing left to stop there
    nodes.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    wait_until(lambda: "error" in out or any("restored_from" in r for r in rows()), 900,
               "an epoch after the restart")
    recovered = time.monotonic() - killed
    print(f"FAULT node loss: the first epoch after the restart stored {recovered:.1f} s "
          "after the kill")
    t.join(timeout=1200)
    assert not t.is_alive() and "error" not in out, out.get("error")
    final = rows()
    assert [(r["phase"], r["epoch"]) for r in final] == [(1, 0)] + [(2, e) for e in range(6)]
    restored = [r["restored_from"] for r in final if "restored_from" in r]
    # One restart, from the last checkpoint stored before the kill (or a later one): at most
    # the epoch in flight was lost.
    assert len(restored) == 1
    assert (restored[0]["phase"], restored[0]["epoch"]) >= (stored["phase"], stored["epoch"])
    # Two 1-CPU workers, one surviving 1-CPU node, none on the head: the restarted group
    # could only finish on the replacement.
    assert out["summary"]["epochs"] == 7
