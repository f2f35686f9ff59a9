"""Cold starts on Ray's own autoscaling cluster: a head that trains nothing (0 CPUs), a worker
type from 0 to 1 node, and Ray's fake multi-node provider (RAY_FAKE_CLUSTER: the autoscaler
launches each node as a raylet on this machine), autoscaler v2 as `ray up` runs it since Ray
2.50. The job waits, says what the autoscaler is launching, trains once the node has joined;
a node type the provider fails to launch stops the wait at once with the autoscaler's error.

    python -m pytest -q tests/test_autoscaler.py

The head is `ray start --head --block` (what ray.cluster_utils.AutoscalingCluster runs, less
its `ray stop --force`, which would stop every Ray instance on the machine, and its config
template, which Ray's wheel does not ship); afterwards every process it started, the
autoscaler's nodes included, is gone. The pure parts (the progress line, the launch-failure
check) are fast tests on Ray's own status dataclasses.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import descendants, free_port, wait_until

from cifar_ray import cluster, ray_internals
from cifar_ray.config import PhaseConfig, TrainConfig

RAY = str(Path(sys.executable).parent / "ray")
MiB = 2**20


def _status(**kw):
    return ray_internals.ClusterStatus(**kw)


def _launch(kind: str, count: int, ts: float, state: str = "PENDING", details=None,
            failed_ts=None):
    return ray_internals.LaunchRequest(
        instance_type_name="g5.xlarge", ray_node_type_name=kind, count=count,
        state=ray_internals.LaunchRequest.Status[state], request_ts_s=int(ts),
        failed_ts_s=failed_ts, details=details)


def _node(kind: str, instance_id: str):
    return ray_internals.NodeInfo(instance_type_name="g5.xlarge", ray_node_type_name=kind,
                                  instance_id=instance_id, ip_address="",
                                  details="RAY_INSTALLING")


def test_the_progress_line_names_node_types_counts_and_for_how_long():
    status = _status(pending_launches=[_launch("gpu_1x", 2, 1000), _launch("gpu_1x", 1, 1030)],
                     pending_nodes=[_node("gpu_4x", "i-1"), _node("gpu_4x", "i-2")])
    assert (cluster.autoscaler_activity(status, 1100.0, {"i-1": 1040.0, "i-2": 1090.0}) ==
            "launching 3 gpu_1x for 100 s; 2 gpu_4x starting for 60 s")
    assert (cluster.autoscaler_activity(status) ==
            "launching 3 gpu_1x; 2 gpu_4x starting")
    assert cluster.autoscaler_activity(_status()) == "nothing pending"


def test_a_launch_failure_stops_the_wait_only_when_nothing_else_can_bring_nodes():
    error = ("Traceback (most recent call last):\n  ...\nbotocore.exceptions.ClientError: An "
             "error occurred (InsufficientInstanceCapacity) when calling the RunInstances "
             "operation: We currently do not have sufficient g5.xlarge capacity.")
    failed = _launch("gpu_1x", 1, 1000, "FAILED", error, failed_ts=1005)
    assert cluster.launch_failure(_status(failed_launches=[failed]), since=990) is failed
    # Before this job's wait began: another job's, not ours.
    assert cluster.launch_failure(_status(failed_launches=[failed]), since=1010) is None
    # The autoscaler is trying something else (another type, a retry): keep waiting.
    assert cluster.launch_failure(_status(failed_launches=[failed],
                                          pending_launches=[_launch("gpu_4x", 1, 1006)]),
                                  since=990) is None
    assert cluster.launch_failure(_status(failed_launches=[failed],
                                          pending_nodes=[_node("gpu_4x", "i-3")]),
                                  since=990) is None
    cfg = TrainConfig(workers=2, use_gpu=True, weights="none")
    msg = cluster.launch_failure_message(cfg, failed, "GPU: need 2, cluster has 0")
    assert "\n" not in msg
    assert msg.startswith("--workers 2 cannot be placed (GPU: need 2, cluster has 0): the "
                          "autoscaler could not launch 1 gpu_1x node(s) (g5.xlarge): "
                          "botocore.exceptions.ClientError: An error occurred "
                          "(InsufficientInstanceCapacity)")
    assert "another instance type or availability zone" in msg and "quota" in msg
    assert "--workers" in msg.split("quota")[1]


def test_the_default_wait_covers_a_cold_gpu_node():
    assert TrainConfig().resource_timeout_s >= 600


# --- on a real autoscaling cluster ------------------------------------------------------

# Node types shaped like cluster.yaml's: a head with no CPU for training, worker types that
# scale from 0. `cpu_2x` is the training node. `gpu_1x` (one logical GPU) asks for an object
# store below Ray's minimum (75 MiB), so the fake provider's node creation raises, as a
# cloud's RunInstances does on a capacity or quota error, and the autoscaler records a failed
# launch: the only way to real GPU nodes on this cluster fails.
NODE_TYPES = {
    "cpu_2x": {"resources": {"CPU": 2, "object_store_memory": 200 * MiB}, "node_config": {},
               "min_workers": 0, "max_workers": 1},
    "gpu_1x": {"resources": {"CPU": 2, "GPU": 1, "object_store_memory": MiB},
               "node_config": {}, "min_workers": 0, "max_workers": 1},
}


def _autoscaling_config(gcs_address: str) -> dict:
    """ray.cluster_utils.AutoscalingCluster's config for autoscaler v2, its template
    (fake_multi_node/example.yaml, which Ray's wheel leaves out) inlined."""
    return {
        "cluster_name": "cifar-ray-autoscaling", "max_workers": 2,
        "provider": ray_internals.fake_multinode_provider(gcs_address),
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            **NODE_TYPES},
        "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": 1.0,
        # Long enough for Train to place its workers after the wait; short for a test.
        "idle_timeout_minutes": 0.5, "docker": {}, "initialization_commands": [],
        "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [], "file_mounts": {},
        "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": []}


@pytest.fixture(scope="module")
def autoscaling(s3_server):
    """The empty autoscaling cluster, this process connected to it as a job's driver is."""
    import ray

    head_id = ray_internals.fake_head_node_id()
    # Short: Ray's unix socket paths live under it and must stay below ~107 characters.
    temp_dir = tempfile.mkdtemp(prefix="cra-", dir="/tmp")
    port, dash = free_port(), free_port()
    config = Path(temp_dir, "autoscaling.json")
    config.write_text(json.dumps(_autoscaling_config(f"127.0.0.1:{port}")))
    ray_internals.single_machine()  # every server on 127.0.0.1, here and in what it starts
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
           "RAY_enable_autoscaler_v2": "1", "RAY_CLOUD_INSTANCE_ID": head_id,
           # Token auth, with the token Ray gives this user's local instances (the one
           # this process connects with): ~/.ray/auth_token, created if missing.
           "RAY_OVERRIDE_NODE_ID_FOR_TESTING": head_id, "RAY_AUTH_MODE": "token",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    if not (Path.home() / ".ray" / "auth_token").exists():
        subprocess.check_call([RAY, "get-auth-token", "--generate"], env=env,
                              stdout=subprocess.DEVNULL)
    log = open(os.path.join(temp_dir, "ray-start.log"), "w")
    proc = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--autoscaling-config={config}",
         "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=0", "--num-gpus=0",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={temp_dir}",
         "--disable-usage-stats"], env=env, stdout=log, stderr=subprocess.STDOUT)

    def connected():
        if proc.poll() is not None:
            raise AssertionError("ray start exited:\n" +
                                 Path(temp_dir, "ray-start.log").read_text()[-3000:])
        try:
            ray.init(address=f"127.0.0.1:{port}")
            return True
        except ConnectionError:
            return False

    try:
        wait_until(connected, 180, "the autoscaling head", interval=2)
        yield ray
    finally:
        ray.shutdown()
        started = descendants(proc.pid)  # the head's daemons and the autoscaler's nodes
        proc.send_signal(signal.SIGTERM)  # `ray start --block` stops what it started
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        try:
            wait_until(lambda: not [p for p in started if os.path.exists(f"/proc/{p}")], 60,
                       "the cluster's processes to exit")
        finally:
            for p in started:  # whatever is left of ours, and only ours
                if os.path.exists(f"/proc/{p}"):
                    os.kill(p, signal.SIGKILL)
            shutil.rmtree(temp_dir, ignore_errors=True)


def _cfg(s3_data: str, bucket: str, name: str, **kw) -> TrainConfig:
    """One 2-CPU worker (a whole cpu_2x node), 1 + 1 tiny epochs."""
    return TrainConfig(data=s3_data, dataset="tiny", storage=f"s3://{bucket}/runs", name=name,
                       workers=1, cpus_per_worker=2, weights="none",
                       phase1=PhaseConfig(epochs=1, lr=1e-3, batch_size=64),
                       phase2=PhaseConfig(epochs=1, lr=1e-3, optimizer="sgd", batch_size=64),
                       **kw)


@pytest.mark.ray
def test_a_cold_start_waits_says_what_is_launching_and_trains(autoscaling, s3_data, bucket,
                                                               caplog):
    from cifar_ray import train

    assert autoscaling.cluster_resources().get("CPU", 0) == 0
    t0 = time.monotonic()
    with caplog.at_level(logging.INFO, logger="cifar_ray.cluster"):
        summary = train.fit(_cfg(s3_data, bucket, "cold"))
    took = time.monotonic() - t0
    lines = [r.getMessage() for r in caplog.records if r.name == "cifar_ray.cluster"]
    print("\n".join(lines), f"\nempty cluster -> run finished in {took:.1f} s")
    waits = [ln for ln in lines if ln.startswith("waiting for the autoscaler")]
    assert waits and all("CPU: need 2, cluster has 0" in ln for ln in waits), lines
    assert any("cpu_2x" in ln for ln in waits), lines
    assert any(ln.startswith("the cluster has room for --workers 1") for ln in lines), lines
    assert summary["final_checkpoint"].endswith("/runs/cold/checkpoint-p2-e000"), summary
    assert 0 <= summary["evaluated_acc"] <= 1


@pytest.mark.ray
def test_a_node_type_that_cannot_launch_stops_the_wait_with_the_autoscalers_error(
        autoscaling, s3_data, bucket):
    # Only gpu_1x has GPUs: a --use-gpu job waits for that type alone.
    cfg = _cfg(s3_data, bucket, "no-gpu-node", use_gpu=True)
    t0 = time.monotonic()
    with pytest.raises(cluster.ResourceError) as e:
        cluster.wait_for_resources(cfg)
    took = time.monotonic() - t0
    print(f"\n{e.value}\nstopped after {took:.1f} s")
    assert "the autoscaler could not launch 1 gpu_1x node(s)" in str(e.value)
    assert "\n" not in str(e.value)
    assert took < 120
