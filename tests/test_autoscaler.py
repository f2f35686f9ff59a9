"""A cluster's life on Ray's own autoscaling cluster: a head that trains nothing (0 CPUs), a
worker type from 0 to 2 nodes, and Ray's fake multi-node provider (RAY_FAKE_CLUSTER: the
autoscaler launches each node as a raylet on this machine), autoscaler v2 as `ray up` runs
it since Ray 2.50. A job submitted through the jobs API waits, says what the autoscaler is
launching and trains once the nodes have joined; a node killed mid-run is replaced by the
autoscaler and the run resumes on it; the idle nodes go afterwards. A node type the provider
keeps failing to launch stops the wait with the autoscaler's error.

    python -m pytest -q tests/test_autoscaler.py

The head is `ray start --head --block` (what ray.cluster_utils.AutoscalingCluster runs, less
its `ray stop --force`, which would stop every Ray instance on the machine, and its config
template, which Ray's wheel does not ship); afterwards every process it started, the
autoscaler's nodes included, is gone. The pure parts (the progress line, the launch-failure
check) are fast tests on Ray's own status dataclasses.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import (
    cmdline,
    copy_tracked_files,
    descendants,
    free_port,
    hosts_train_worker,
    kill_node,
    stop_ray_start,
    wait_until,
)

from cifar_ray import cluster, ray_internals, runs, storage
from cifar_ray.config import TrainConfig

RAY = str(Path(sys.executable).parent / "ray")
REPO = Path(__file__).resolve().parents[1]
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
    # The autoscaler is trying something else (another type, a node starting): keep waiting.
    assert cluster.launch_failure(_status(failed_launches=[failed],
                                          pending_launches=[_launch("gpu_4x", 1, 1006)]),
                                  since=990) is None
    assert cluster.launch_failure(_status(failed_launches=[failed],
                                          pending_nodes=[_node("gpu_1x", "i-3")]),
                                  since=990) is None
    # It retries the failed type (v2 does, every few seconds, without end): keep waiting
    # until the type has failed LAUNCH_TRIES times.
    retry = _launch("gpu_1x", 1, 1007)
    tries = [_launch("gpu_1x", 1, 1000 + i, "FAILED", error, failed_ts=1001 + i)
             for i in range(cluster.LAUNCH_TRIES)]
    assert cluster.launch_failure(_status(failed_launches=tries[:-1],
                                          pending_launches=[retry]), since=990) is None
    assert cluster.launch_failure(_status(failed_launches=tries,
                                          pending_launches=[retry]), since=990) is tries[-1]
    cfg = TrainConfig(workers=2, use_gpu=True, weights="none")
    msg = cluster.launch_failure_message(cfg, failed, "GPU: need 2, cluster has 0")
    assert "\n" not in msg
    assert msg.startswith("--workers 2 cannot be placed (GPU: need 2, cluster has 0): the "
                          "autoscaler could not launch 1 gpu_1x node(s) (g5.xlarge): "
                          "botocore.exceptions.ClientError: An error occurred "
                          "(InsufficientInstanceCapacity)")
    assert "another instance type or availability zone" in msg and "quota" in msg
    assert "--workers" in msg.split("quota")[1]
    silent = _launch("gpu_1x", 1, 1000, "FAILED", "", failed_ts=1005)
    assert "monitor.log" in cluster.launch_failure_message(cfg, silent, "GPU: need 2")


def test_the_default_wait_covers_a_cold_gpu_node():
    assert TrainConfig().resource_timeout_s >= 600


# --- on a real autoscaling cluster ------------------------------------------------------

# Node types shaped like cluster.yaml's: a head with no CPU for training, worker types that
# scale from 0. `cpu_1x` nodes train, one worker each. `gpu_1x` (one logical GPU) asks for
# an object store below Ray's minimum (75 MiB), so the fake provider's node creation raises,
# as a cloud's RunInstances does on a capacity or quota error, and the autoscaler records a
# failed launch: the only way to real GPU nodes on this cluster fails.
NODE_TYPES = {
    "cpu_1x": {"resources": {"CPU": 1, "object_store_memory": 200 * MiB}, "node_config": {},
               "min_workers": 0, "max_workers": 2},
    "gpu_1x": {"resources": {"CPU": 2, "GPU": 1, "object_store_memory": MiB},
               "node_config": {}, "min_workers": 0, "max_workers": 1},
}


def _autoscaling_config(gcs_address: str) -> dict:
    """ray.cluster_utils.AutoscalingCluster's config for autoscaler v2, its template
    (fake_multi_node/example.yaml, which Ray's wheel leaves out) inlined."""
    return {
        "cluster_name": "cifar-ray-autoscaling", "max_workers": 3,
        "provider": ray_internals.fake_multinode_provider(gcs_address),
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            **NODE_TYPES},
        "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": 1.0,
        # Short for a test: a node is never idle-terminated while a pending placement (a
        # restart waiting for its replacement) or Train's resource request needs it.
        "idle_timeout_minutes": 0.2, "docker": {}, "initialization_commands": [],
        "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [], "file_mounts": {},
        "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": []}


@pytest.fixture(scope="module")
def autoscaling(s3_server):
    """The empty autoscaling cluster (token auth on, every server on 127.0.0.1); yields the
    environment a job's driver gets on its head (RAY_ADDRESS, the token, S3's endpoint)."""
    head_id = ray_internals.fake_head_node_id()
    # Short: Ray's unix socket paths live under it and must stay below ~107 characters.
    temp_dir = tempfile.mkdtemp(prefix="cra-", dir="/tmp")
    port, dash = free_port(), free_port()
    config = Path(temp_dir, "autoscaling.json")
    config.write_text(json.dumps(_autoscaling_config(f"127.0.0.1:{port}")))
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: every server on 127.0.0.1 (docs/cluster.md).
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
           "RAY_enable_autoscaler_v2": "1", "RAY_CLOUD_INSTANCE_ID": head_id,
           "RAY_OVERRIDE_NODE_ID_FOR_TESTING": head_id, "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           # On SIGTERM (teardown) `ray start` would first drain the node for up to 30 s.
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
           "GLOO_SOCKET_IFNAME": "lo",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    log = open(os.path.join(temp_dir, "ray-start.log"), "w")
    # GCS declares a silent node dead after 3 missed 1 s health checks (Ray's default takes
    # tens of seconds), as in test_cluster_faults.py.
    health = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
              "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}
    proc = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--autoscaling-config={config}",
         f"--system-config={json.dumps(health)}",
         "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=0", "--num-gpus=0",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={temp_dir}",
         "--disable-usage-stats"], env=env, stdout=log, stderr=subprocess.STDOUT)
    driver_env = {k: v for k, v in env.items() if not k.startswith(("RAY_FAKE", "AUTOSCALER",
                                                                    "RAY_CLOUD", "RAY_OVERR",
                                                                    "RAY_enable"))}
    driver_env["RAY_ADDRESS"] = f"127.0.0.1:{port}"
    driver_env["CIFAR_RAY_DASHBOARD"] = f"http://127.0.0.1:{dash}"
    driver_env["CIFAR_RAY_HEAD_PID"] = str(proc.pid)

    def up():
        if proc.poll() is not None:
            raise AssertionError("ray start exited:\n" +
                                 Path(temp_dir, "ray-start.log").read_text()[-3000:])
        return "Ray runtime started" in Path(temp_dir, "ray-start.log").read_text()

    def autoscaler_reports():  # from a driver of its own, as a job's sees the cluster
        probe = ("import ray, sys; ray.init(); from cifar_ray import cluster, ray_internals; "
                 "sys.exit(0 if cluster.autoscaler_reports(ray_internals.autoscaler_status()) "
                 "else 1)")
        return subprocess.run([sys.executable, "-c", probe], env=driver_env, cwd=REPO,
                              capture_output=True, timeout=120).returncode == 0

    try:
        wait_until(up, 180, "the autoscaling head", interval=1)
        wait_until(autoscaler_reports, 180, "the autoscaler's first report", interval=1)
        yield driver_env
    finally:
        try:
            stop_ray_start(proc, log)  # the head's daemons and the autoscaler's nodes
        finally:
            shutil.rmtree(temp_dir, ignore_errors=True)


def _job(env: dict, s3_data: str, bucket: str, name: str, *flags: str):
    """jobs/train.py as the driver of a job on the head: one 1-CPU worker (a cpu_1x node),
    1 + 1 tiny epochs. Returns (exit code, its log lines, seconds)."""
    cmd = [sys.executable, str(REPO / "jobs" / "train.py"), *_flags(s3_data, bucket, name),
           "--workers", "1", *flags]
    t0 = time.monotonic()
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    took = time.monotonic() - t0
    lines = (done.stdout + done.stderr).splitlines()
    return done.returncode, lines, took


def _flags(s3_data: str, bucket: str, name: str) -> list[str]:
    return ["--data", s3_data, "--dataset", "tiny", "--storage", f"s3://{bucket}/runs",
            "--name", name, "--cpus-per-worker", "1", "--weights", "none",
            "--phase1-epochs", "1", "--phase1-batch-size", "64", "--phase2-batch-size", "64",
            "--phase2-optimizer", "sgd", "--phase2-momentum", "0"]


def _raylets(head_pid: int) -> dict[int, bool]:
    """The cluster's raylets (the head's and one per node the autoscaler launched): pid ->
    whether a Ray Train worker runs under it."""
    return {pid: hosts_train_worker(pid) for pid in descendants(head_pid)
            if b"".join(cmdline(pid)[:1]).endswith(b"/raylet")}  # [] once it has ended


@pytest.mark.ray
def test_a_node_type_that_cannot_launch_stops_the_wait_with_the_autoscalers_error(
        autoscaling, s3_data, bucket):
    # Only gpu_1x has GPUs: a --use-gpu job waits for that type alone, which the autoscaler
    # tries again and again. (A wait that missed the failure would end at the timeout, with
    # another message.)
    rc, lines, took = _job(autoscaling, s3_data, bucket, "no-gpu-node", "--use-gpu",
                           "--resource-timeout-s", "170")
    errors = [ln for ln in lines if ln.startswith("cifar-ray train: error:")]
    print("\n".join(lines), f"\nstopped after {took:.1f} s")
    assert rc == 2 and len(errors) == 1, "\n".join(lines[-40:])
    assert "the autoscaler could not launch 1 gpu_1x node(s)" in errors[0], errors
    assert took < 180


@pytest.mark.ray
def test_a_job_on_an_empty_cluster_waits_trains_through_a_lost_node_and_leaves_no_node_up(
        autoscaling, s3_data, bucket, tmp_path):
    """Through the jobs API, as README's `ray job submit`: the job waits while the autoscaler
    launches two cpu_1x nodes and says so; once phase 2 has stored a checkpoint, one of the
    nodes hosting a worker is killed (its raylet and everything under it, by pid); the
    autoscaler notices, launches a replacement, and the run resumes on it from its newest
    complete checkpoint by itself (nothing else can hold the second worker). The job
    succeeds with every epoch recorded once, and once idle the nodes are released."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    checkout = copy_tracked_files(tmp_path / "checkout")
    head = int(autoscaling["CIFAR_RAY_HEAD_PID"])
    client = JobSubmissionClient(autoscaling["CIFAR_RAY_DASHBOARD"], headers={
        "Authorization": f"Bearer {autoscaling['RAY_AUTH_TOKEN']}"})
    run = f"s3://{bucket}/runs/replaced"
    submitted = time.time()
    job = client.submit_job(entrypoint=" ".join(
        ["python", "jobs/train.py", *_flags(s3_data, bucket, "replaced"), "--workers", "2",
         "--phase2-epochs", "4"]), runtime_env={"working_dir": str(checkout)})

    def job_failed() -> bool:
        if client.get_job_status(job) in (JobStatus.FAILED, JobStatus.STOPPED):
            raise AssertionError(client.get_job_logs(job)[-4000:])
        return False

    wait_until(lambda: job_failed() or storage.exists(
        storage.join(run, "checkpoint-p2-e000", "state.pt.sha256")), 600,
        "phase 2's first checkpoint")
    before = _raylets(head)
    victim = wait_until(lambda: [p for p, w in _raylets(head).items() if w], 60,
                        "a node hosting a training worker")[0]
    killed = time.time()
    kill_node(victim)
    replaced = {}

    def finished():
        new = set(_raylets(head)) - set(before)
        if new and "at" not in replaced:
            replaced["at"] = time.time()
        status = client.get_job_status(job)
        return status if status in (JobStatus.SUCCEEDED, JobStatus.FAILED,
                                    JobStatus.STOPPED) else None

    status = wait_until(finished, 900, "the job to finish", interval=1)
    logs = client.get_job_logs(job)
    print(logs[-6000:])
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    lines = logs.splitlines()
    waits = [ln for ln in lines if "waiting for the autoscaler" in ln]
    assert waits and all("CPU: need 2, cluster has" in ln for ln in waits), waits
    assert any("cpu_1x" in ln for ln in waits), waits
    assert any("the cluster has room for --workers 2" in ln for ln in lines), lines[-40:]
    rows = runs.read_metrics(run)
    assert [(r["phase"], r["epoch"]) for r in rows] == [(1, 0)] + [(2, e) for e in range(4)]
    after = [r for r in rows if r["finished_at"] > killed]
    assert "restored_from" in after[0] and all(r["workers"] == 2 for r in rows), rows
    # From the newest checkpoint stored before the kill (a row lands after its checkpoint),
    # or a later one: at most the epoch in flight was lost.
    last = rows[len(rows) - len(after) - 1]
    restored = after[0]["restored_from"]
    assert (restored["phase"], restored["epoch"]) >= (last["phase"], last["epoch"]), rows
    assert "at" in replaced, "no new node joined after the kill"
    result = json.loads(storage.read_bytes(storage.join(run, "result.json")))
    assert result["epochs"] == 5, result
    starts = [s["started"] for s in runs.read_worker_starts(run)]
    assert len(starts) == 2, starts
    print(f"AUTOSCALER empty cluster -> first epoch stored "
          f"{rows[0]['finished_at'] - submitted:.1f} s after the submission; node killed -> "
          f"replacement joined {replaced['at'] - killed:.1f} s -> training again "
          f"{starts[1] - killed:.1f} s after the kill (first epoch stored "
          f"{after[0]['finished_at'] - killed:.1f} s after)")
    # Idle nodes go (idle_timeout_minutes 0.2): only the head's raylet is left.
    ended = time.time()
    wait_until(lambda: len(_raylets(head)) == 1, 300, "the idle nodes to be released")
    print(f"AUTOSCALER idle nodes released {time.time() - ended:.1f} s after the job ended")
