"""A lost node, for real: a Ray cluster of a head and two worker nodes on this machine (each
node its own raylet, all on 127.0.0.1, token auth on, 1 CPU per worker node, none on the
head), storage on the S3-protocol server. A worker node is killed mid-epoch (its raylet and
every process under it, by pid, SIGKILL), as a spot instance vanishes; a replacement node
joins some seconds later, as an autoscaler would bring one.

    python -m pytest -q tests/test_cluster_faults.py
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import (
    evaluation_tasks,
    fit_in_thread,
    free_port,
    hosts_train_worker,
    kill_node,
    wait_until,
)

from cifar_ray import checkpoint, cluster, ray_internals, runs, storage
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
    return [n for n in cluster.worker_nodes
            if hosts_train_worker(ray_internals.raylet_pid(n))]


def _kill_node(node) -> None:
    """SIGKILL the node's raylet and every process under it, by pid."""
    kill_node(ray_internals.raylet_pid(node))


def _cfg(s3_data: str, bucket: str, name: str, epochs: int, **kw) -> TrainConfig:
    """Two 1-CPU workers, one per worker node; 1 + `epochs` tiny epochs (4 steps, ~3 s
    each): a node is lost in phase 2, after its first epoch is stored."""
    return TrainConfig(data=s3_data, dataset="tiny", storage=f"s3://{bucket}/runs",
                       name=name, workers=2, cpus_per_worker=1, weights="none",
                       phase1=PhaseConfig(epochs=1, lr=1e-3, batch_size=64),
                       # Plain SGD: no optimizer state, so the smallest checkpoints to upload.
                       phase2=PhaseConfig(epochs=epochs, lr=1e-3, optimizer="sgd",
                                          momentum=0.0, batch_size=64),
                       **kw)


def _in_phase2(run: str, nodes, stored: str = "checkpoint-p2-e000") -> object:
    """Once the `stored` checkpoint is (phase 2's first epoch: its second is in flight;
    phase 1's: phase 2's first is): a worker node that hosts a training worker."""
    wait_until(lambda: storage.exists(storage.join(run, stored, "state.pt.sha256")),
               900, f"checkpoint {stored}")
    return wait_until(lambda: _train_worker_nodes(nodes), 60,
                      "a node hosting a training worker")[0]


def _drain(nodes, node, deadline_s: int) -> None:
    """The cloud's notice, as an autoscaler passes it on: drain the node, reason PREEMPTION,
    to be gone in deadline_s (`ray drain-node`; a second drain moves the deadline)."""
    drained = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "ray"), "drain-node",
         "--address", nodes.address, "--node-id", node.node_id,
         "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot reclaim",
         "--deadline-remaining-seconds", str(deadline_s)],
        env={**os.environ, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True,
        timeout=120)
    assert drained.returncode == 0, drained.stdout + drained.stderr


def test_a_preemption_notice_checkpoints_at_once_and_the_run_resumes_from_that_step(
        nodes, s3_data, bucket, monkeypatch):
    """A worker node gets a preemption notice mid-epoch: the workers checkpoint the step they
    are at, at once; a replacement joins; the node goes past its deadline (killed by pid, in
    the middle of the same epoch), and the run resumes from that step. With --max-failures
    0: a notified preemption is not a failure (Ray counts it apart; a node lost before its
    deadline counts as a failure). Epochs of ~20 s here (2,536 images), so that the whole
    notice fits inside one: phase 2's first and only."""
    from cifar_ray import data
    from cifar_ray.config import PrepareConfig

    data.prepare(PrepareConfig(source="synthetic", data=s3_data, dataset="longer",
                               val_size=64, synthetic_size=2600))
    monkeypatch.setenv(ray_internals.PREEMPTION_WATCHER_ENV, "1")
    monkeypatch.setenv("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "1")  # Ray's default: 5 s
    cfg = dataclasses.replace(_cfg(s3_data, bucket, "notice", epochs=1, max_failures=0,
                                   resource_timeout_s=120), dataset="longer")
    t, out = fit_in_thread(cfg)
    run = cfg.run_uri()
    victim = _in_phase2(run, nodes, stored="checkpoint-p1-e000")
    _drain(nodes, victim, 300)
    noticed = time.monotonic()

    def mid_epoch() -> list[str]:
        return [n for n in storage.list_dir(run) if "-s" in n
                and storage.exists(storage.join(run, n, "state.pt.sha256"))]

    jit = wait_until(mid_epoch, 300, "a checkpoint taken on the notice")[0]
    print(f"FAULT preemption notice: {jit} stored {time.monotonic() - noticed:.1f} s after "
          "the notice")
    nodes.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    _drain(nodes, victim, 1)  # the cloud takes the node now
    gone = time.time() + 1
    wait_until(lambda: time.time() > gone + 0.5, 60, "the notice's deadline")
    killed = time.monotonic()
    _kill_node(victim)
    nodes.worker_nodes.discard(victim)
    wait_until(lambda: "error" in out or any("restored_from" in r
                                             for r in runs.read_metrics(run)), 900,
               "the resumed epoch")
    print(f"FAULT preemption notice: the resumed epoch stored {time.monotonic() - killed:.1f} "
          "s after the kill")
    t.join(timeout=1200)
    assert not t.is_alive() and "error" not in out, out.get("error")
    final = runs.read_metrics(run)
    assert [(r["phase"], r["epoch"]) for r in final] == [(1, 0), (2, 0)]
    restored = [r["restored_from"] for r in final if "restored_from" in r]
    progress = checkpoint.progress(jit)
    assert len(restored) == 1 and "step" in restored[0], restored
    assert restored[0]["epoch"] == progress[1]  # in the epoch the notice came in
    assert (restored[0]["phase"], restored[0]["epoch"], restored[0]["step"]) >= progress
    assert final[1]["restored_from"] == restored[0]
    # A cluster of several nodes: the final evaluation ran as a task with a worker's resources.
    assert not cluster.this_machine_only() and evaluation_tasks()


def test_a_lost_node_stops_a_fixed_run_and_an_elastic_one_goes_on_and_grows_back(
        nodes, s3_data, bucket):
    """A fixed-size run (--workers 2) loses a node and none replaces it: within
    --resource-timeout-s (at least 10 s for a restart) it stops, saying what is missing and
    where it will resume. Run again once a node has joined, now elastic (--workers 1-2), it
    resumes there; another node is lost and it goes on at once on the survivor from its newest
    checkpoint, without waiting for a replacement; once a node joins, it grows back to two
    workers (restarting from its newest checkpoint; room is checked every --resize-check-s).
    Every epoch is recorded once, each row with the world size it trained at. (A replacement
    the autoscaler brings for a fixed-size run: test_autoscaler.py.) Epochs of ~6 s at two
    workers (768 images), so that the growth (Train sees a new node within ~20 s) lands well
    before the end."""
    from cifar_ray import data
    from cifar_ray.config import PrepareConfig

    data.prepare(PrepareConfig(source="synthetic", data=s3_data, dataset="mid",
                               val_size=64, synthetic_size=832))
    cfg = dataclasses.replace(_cfg(s3_data, bucket, "lost", epochs=8, resource_timeout_s=5),
                              dataset="mid")
    t, out = fit_in_thread(cfg)
    run = cfg.run_uri()
    victim = _in_phase2(run, nodes)
    killed = time.monotonic()
    _kill_node(victim)
    nodes.worker_nodes.discard(victim)
    t.join(timeout=600)
    stopped = time.monotonic() - killed
    assert not t.is_alive()
    err = out.get("error")
    assert isinstance(err, cluster.ResourceError), repr(err)
    msg = str(err)
    assert "CPU: need 2, cluster has 1" in msg and "(--resource-timeout-s)" in msg, msg
    assert "Run the same command again" in msg and "checkpoint-p2-e" in msg, msg
    print(f"FAULT no replacement: the run stopped {stopped:.1f} s after the kill: {msg}")

    nodes.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    import ray
    wait_until(lambda: ray.cluster_resources().get("CPU", 0) >= 2, 120, "the new node")
    elastic = dataclasses.replace(cfg, min_workers=1, resize_check_s=2, resource_timeout_s=120)
    resumed = time.time()
    t, out = fit_in_thread(elastic)
    # Train sizes the group from a view of the nodes refreshed every 20 s: it may start on
    # one worker and grow; the node is lost once it trains on two.
    wait_until(lambda: "error" in out or [r for r in runs.read_metrics(run)
                                          if r["finished_at"] > resumed and r["workers"] == 2],
               900,
               "the resumed run training on two workers")
    victim = wait_until(lambda: _train_worker_nodes(nodes), 60,
                        "a node hosting a training worker")[0]
    killed = time.time()
    _kill_node(victim)
    nodes.worker_nodes.discard(victim)

    def rows_at(world: int) -> list[dict]:
        return [r for r in runs.read_metrics(run)
                if r["finished_at"] > killed and r["workers"] == world]

    wait_until(lambda: "error" in out or rows_at(1), 600, "an epoch on the survivor")
    assert "error" not in out, out.get("error")
    joined = time.time()
    nodes.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    wait_until(lambda: "error" in out or rows_at(2), 600, "an epoch on two workers again")
    t.join(timeout=1200)
    assert not t.is_alive() and "error" not in out, out.get("error")
    final = runs.read_metrics(run)
    assert [(r["phase"], r["epoch"]) for r in final] == [(1, 0)] + [(2, e) for e in range(8)]
    sizes = [r["workers"] for r in final]
    shrunk = next(i for i, r in enumerate(final) if r["finished_at"] > killed)
    grown = next(i for i, r in enumerate(final)
                 if r["finished_at"] > joined and r["workers"] == 2)
    assert sizes[shrunk - 1] == 2 and set(sizes[shrunk:grown]) == {1}, sizes
    assert set(sizes[grown:]) == {2}, sizes
    # Each resize is a restart from the newest checkpoint, and the first row after it says so.
    assert "restored_from" in final[shrunk] and "restored_from" in final[grown], final
    assert final[shrunk]["restored_from"]["epoch"] >= final[shrunk - 1]["epoch"], final
    starts = [s["started"] for s in runs.read_worker_starts(run)]
    on_one = next(s for s in starts if s > killed)
    on_two = next(s for s in starts if s > joined)
    print(f"ELASTIC shrink: training again on 1 worker {on_one - killed:.1f} s after the "
          f"kill (its first epoch stored {final[shrunk]['finished_at'] - killed:.1f} s after); "
          f"grow: training on 2 workers {on_two - joined:.1f} s after the node joined "
          f"(first epoch stored {final[grown]['finished_at'] - joined:.1f} s after); sizes "
          f"{sizes}")
    assert out["summary"]["epochs"] == 9


# A driver whose actors place workers' groups one after another, as Train and Tune do (each
# group removed once placed, so that none piles up): killed mid-stream, it can leave groups
# that Ray never removes.
PLACER = """
import sys, ray
from ray.util import placement_group, remove_placement_group

ray.init(address=sys.argv[1])

@ray.remote(num_cpus=0, max_concurrency=8)
class Placer:
    def run(self):
        while True:
            group = placement_group([{"CPU": 0.001}])
            ray.get(group.ready())
            remove_placement_group(group)

placers = [Placer.remote() for _ in range(2)]  # held: an actor without a handle is cancelled
ray.get([p.run.remote() for p in placers for _ in range(8)])
"""


def test_a_placement_group_left_by_a_killed_driver_is_removed_by_the_next_job(nodes, caplog,
                                                                             tmp_path):
    """A driver killed by pid while its actors place groups: Ray removes a job's placement
    groups once the job and their creator actor have ended, but not one registered between
    the two, which then holds its resources until the cluster stops (seen after a killed
    sweep driver: the next job could not place its workers). The next job's connect
    (cluster.remove_orphaned_placement_groups) removes it, and its CPUs are free again. The
    race is Ray's (not every killed driver leaks): drivers are killed until one leaks, ten at
    most. Last in the module: Ray also leaks a sliver of CPU without any group
    now and then after such a kill (its raylet's accounting), which would keep the runs
    above from placing a whole-CPU worker."""
    import ray
    from ray.util.state import list_actors, list_jobs, list_placement_groups

    def groups(**kw) -> list:
        return list_placement_groups(limit=10_000, **kw)

    def kill_a_placing_driver() -> list:
        """Start a PLACER driver, kill it by pid once it places groups: the orphans."""
        ours = ray.get_runtime_context().get_job_id()
        known = {g.creator_job_id for g in groups()} | {ours}
        driver = subprocess.Popen([sys.executable, tmp_path / "placer.py", nodes.address])
        wait_until(lambda: len([g for g in groups() if g.creator_job_id not in known]) >= 40,
                   120, "the driver's actors placing groups")
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
        # Once the job and its actors are dead, whatever of its groups is still live is
        # Ray's to have removed: an orphan.
        wait_until(lambda: all(a.state == "DEAD" for a in list_actors(
            filters=[("class_name", "=", "Placer")], limit=1000)), 120, "the actors' end")
        return cluster.orphaned_placement_groups(groups(detail=True), list_jobs(limit=10_000))

    (tmp_path / "placer.py").write_text(PLACER)
    killed, orphans = 0, []
    while not orphans:
        if killed == 10:
            pytest.fail("no placement group leaked in 10 killed drivers: if Ray has fixed the "
                        "race, cluster.remove_orphaned_placement_groups can go")
        killed, orphans = killed + 1, kill_a_placing_driver()
    held = sum(b["unit_resources"].get("CPU", 0) for g in orphans for b in g.bundles)
    print(f"FAULT killed driver: {len(orphans)} placement group(s) left holding {held:g} CPU "
          f"(killed drivers: {killed})")
    free = ray.available_resources().get("CPU", 0)
    # At least those: the same race can register one more of the killed job's groups after
    # the listing above (seen once: 2 removed for 1 listed).
    assert cluster.remove_orphaned_placement_groups() >= len(orphans)
    for group in orphans:
        assert f"removed placement group {group.placement_group_id}" in caplog.text
    assert not cluster.orphaned_placement_groups(groups(detail=True), list_jobs(limit=10_000))
    wait_until(lambda: ray.available_resources().get("CPU", 0) >= free + held - 1e-9, 60,
               "the CPUs the orphans held")
