"""The cluster path end to end through the real jobs API.

    python -m pytest -q tests/test_jobs_api.py

A real Ray head is started with `ray start --head --block` on 127.0.0.1, dashboard on and token
authentication on (a token made for this test, never the user's ~/.ray/auth_token). Jobs are
submitted with the `ray job submit` CLI and a checkout as working directory, exactly as
README shows: the repository's tracked files plus what a user's checkout often holds beside
them (virtual environments, data, results), which .rayignore must keep from travelling;
storage is the S3-protocol server. The head's PATH starts with this venv's bin,
as a cluster's image would provide `python`. Teardown ends the `ray start` process and checks
that every process it started is gone; nothing else is touched (no `ray stop`).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import boto3
import pytest
from conftest import (
    FAKE_KEY_ID,
    FAKE_SECRET,
    cmdline,
    copy_tracked_files,
    descendants,
    free_port,
    listeners,
    s3_keys,
    stop_ray_start,
    wait_until,
)
from ray.job_submission import JobStatus, JobSubmissionClient

from cifar_ray import data, runs, storage
from cifar_ray.cli import main as cli
from cifar_ray.config import PrepareConfig

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


class Head:
    def __init__(self, proc: subprocess.Popen, address: str, token: str, temp_dir: str,
                 env: dict):
        self.proc, self.address, self.token, self.temp_dir, self.env = (proc, address, token,
                                                                        temp_dir, env)
        self.client = JobSubmissionClient(address,
                                          headers={"Authorization": f"Bearer {token}"})

    def cli(self, *args: str, token: bool = True, timeout: float = 300):
        """The `ray` CLI as a user runs it: RAY_AUTH_MODE=token and the token in the env."""
        env = dict(self.env)
        if not token:
            env.pop("RAY_AUTH_TOKEN")
            env["HOME"] = self.temp_dir  # no ~/.ray/auth_token to fall back on either
        return subprocess.run([RAY, *args], env=env, capture_output=True, text=True,
                              timeout=timeout, cwd=REPO)

    def submit(self, workdir: Path, *entrypoint: str) -> str:
        done = self.cli("job", "submit", "--address", self.address, "--working-dir",
                        str(workdir), "--no-wait", "--", *entrypoint)
        assert done.returncode == 0, done.stdout + done.stderr
        ids = [w.strip("'") for line in (done.stdout + done.stderr).splitlines()
               for w in line.split() if w.strip("'").startswith("raysubmit_")]
        assert ids, done.stdout + done.stderr
        return ids[0]

    def wait(self, job_id: str, timeout: float, on_poll=lambda: None) -> JobStatus:
        def finished():
            on_poll()
            st = self.client.get_job_status(job_id)
            return st if st in (JobStatus.SUCCEEDED, JobStatus.FAILED,
                                JobStatus.STOPPED) else None
        return wait_until(finished, timeout, f"job {job_id} to finish", interval=2)


# What user checkouts hold beside the code: virtual environments under their usual names,
# data, results. None of it may travel with a job.
PLANTED = (".venv", "venv", ".venv-py312", "env", "myvenv", "data", "results", "reports")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A checkout as a user has it: the repository's tracked files (what a fresh clone holds,
    whatever else this checkout has lying around) plus PLANTED folders. env/ holds 101 MiB of
    incompressible bytes: more than the jobs API accepts (413), had it travelled."""
    root = copy_tracked_files(tmp_path_factory.mktemp("checkout"))
    for d in PLANTED:
        (root / d).mkdir()
        (root / d / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (root / "env" / "blob.bin").write_bytes(os.urandom(101 * 2**20))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def head(s3_server):
    token = secrets.token_hex(32)
    # Short: Ray's unix socket paths live under it and must stay below ~107 characters.
    temp_dir = tempfile.mkdtemp(prefix="crh-", dir="/tmp")
    port, dash = free_port(), free_port()
    # One machine: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps every Ray server on 127.0.0.1
    # (as README's single-machine `ray start` does).
    # RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0: on SIGTERM (teardown) `ray start` would first
    # drain the node for up to 30 s, for Serve replicas this cluster does not have.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "GLOO_SOCKET_IFNAME": "lo",
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    # The cluster's S3 credentials come from a credentials file, as an instance profile would
    # provide them: never as environment variables, which Ray Tune copies into every trial's
    # runtime env (and Ray's runtime-env agent then logs). Outside temp_dir, which is searched.
    creds_dir = tempfile.mkdtemp(prefix="crh-aws-")
    creds = Path(creds_dir, "credentials")
    creds.write_text(f"[default]\naws_access_key_id = {env.pop('AWS_ACCESS_KEY_ID')}\n"
                     f"aws_secret_access_key = {env.pop('AWS_SECRET_ACCESS_KEY')}\n")
    env["AWS_SHARED_CREDENTIALS_FILE"] = str(creds)
    log = open(os.path.join(temp_dir, "ray-start.log"), "w")
    proc = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2",
         "--num-gpus=0", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{dash}"

    def jobs_api_up():
        if proc.poll() is not None:
            raise AssertionError("ray start exited:\n" +
                                 Path(temp_dir, "ray-start.log").read_text()[-3000:])
        req = urllib.request.Request(f"{address}/api/jobs/",
                                     headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    try:
        wait_until(jobs_api_up, 180, "the Ray head's jobs API")
        yield Head(proc, address, token, temp_dir, env)
    finally:
        try:
            stop_ray_start(proc, log)
        finally:
            shutil.rmtree(temp_dir, ignore_errors=True)
            shutil.rmtree(creds_dir, ignore_errors=True)


def _all_objects(bucket: str) -> dict[str, bytes]:
    s3 = boto3.client("s3")
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {o["Key"]: s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
            for p in pages for o in p.get("Contents", [])}


def test_a_stopped_job_submitted_again_resumes_where_it_stopped(head, workdir, s3_data,
                                                                bucket):
    """`ray job stop` mid-run (once phase 1's checkpoint is stored, all of phase 2 still to
    run), then the very same `ray job submit`: the second job resumes from the first one's
    latest checkpoint instead of starting over."""
    args = ["python", "jobs/train.py", "--data", s3_data, "--dataset", "tiny", "--storage",
            f"s3://{bucket}/runs", "--name", "stopped", "--workers", "2", "--weights", "none",
            "--phase1-epochs", "1", "--phase2-epochs", "3", "--phase1-batch-size", "64",
            "--phase2-batch-size", "64", "--phase2-optimizer", "sgd", "--phase2-momentum", "0"]
    first = head.submit(workdir, *args)

    def phase1_stored() -> bool:
        if head.client.get_job_status(first).is_terminal():  # fail now, with its logs
            raise AssertionError(head.client.get_job_logs(first)[-4000:])
        return "runs/stopped/checkpoint-p1-e000/state.pt.sha256" in s3_keys(bucket)

    wait_until(phase1_stored, 900, "phase 1's checkpoint")
    done = head.cli("job", "stop", "--address", head.address, first)
    assert done.returncode == 0, done.stdout + done.stderr
    assert head.wait(first, 300) == JobStatus.STOPPED
    assert "runs/stopped/result.json" not in s3_keys(bucket)

    submitted = time.monotonic()
    second = head.submit(workdir, *args)
    def metrics() -> str:
        return boto3.client("s3").get_object(Bucket=bucket, Key="runs/stopped/metrics.jsonl"
                                             )["Body"].read().decode()

    wait_until(lambda: "restored_from" in metrics() or head.client.get_job_status(second)
               in (JobStatus.FAILED, JobStatus.STOPPED), 900, "the resumed job's first epoch")
    print(f"FAULT job stopped: the resubmitted job's first epoch stored "
          f"{time.monotonic() - submitted:.1f} s after its submission")
    assert head.wait(second, 900) == JobStatus.SUCCEEDED, head.client.get_job_logs(second)
    rows = [json.loads(x) for x in metrics().splitlines()]
    # Phase 1 not run again, every epoch once, one restore from a stored checkpoint.
    assert [(r["phase"], r["epoch"]) for r in rows] == [(1, 0)] + [(2, e) for e in range(3)]
    restored = [r["restored_from"] for r in rows if "restored_from" in r]
    assert len(restored) == 1 and (restored[0]["phase"], restored[0]["epoch"]) >= (1, 0)
    assert "runs/stopped/result.json" in s3_keys(bucket)


def test_a_sweep_whose_driver_is_killed_resumes_without_rerunning_what_finished(
        head, workdir, bucket, capsys):
    """A sweep through the jobs API, one trial at a time; its driver is killed (SIGKILL, by
    pid) once the first trial has finished and the second has stored phase 2's first epoch,
    then the same `ray job submit` with --resume: phase 1 is not run again, the finished
    trial is not trained again (even if Tune had not yet recorded it as finished), the
    interrupted one resumes from its own latest checkpoint; everything lands in the bucket
    under the configured prefixes, and nothing secret or public is left behind. (One sweep
    for all of it: a sweep through the jobs API takes minutes here. --smoke's own settings
    and data: test_config.py.) After the stopped job: Ray may leave a sliver of a killed
    driver's CPU held (docs/faults.md), which one-worker trials do without and a two-worker
    job would not."""
    lrs = ["1e-3", "1e-2"]
    data.prepare(PrepareConfig(source="synthetic", data=f"s3://{bucket}/datasets",
                               dataset="tiny", val_size=64, synthetic_size=320))
    args = ["python", "jobs/tune.py", "--data", f"s3://{bucket}/datasets", "--dataset", "tiny",
            "--storage", f"s3://{bucket}/sweeps/team-a", "--name", "e2e", "--workers", "1",
            "--weights", "none", "--phase1-epochs", "1", "--phase1-batch-size", "64",
            "--phase2-epochs", "3", "--phase2-batch-size", "64", "--phase2-optimizer", "sgd",
            # Plain SGD: no optimizer state, so the smallest checkpoints to upload and scan.
            "--phase2-momentum", "0", "--lrs", *lrs, "--scheduler", "fifo",
            "--max-concurrent-trials", "1"]
    exp = f"s3://{bucket}/sweeps/team-a/e2e"
    seen: set[tuple[str, int, int]] = set()

    def sample() -> None:
        seen.update(listeners(descendants(os.getpid())))

    def trial_rows() -> dict[str, list[dict]]:
        trials = storage.join(exp, runs.TRIALS)
        return {n: runs.read_metrics(storage.join(trials, n)) for n in storage.list_dir(trials)}

    def one_done_and_the_next_midway() -> bool:
        sample()
        if head.client.get_job_status(first).is_terminal():
            raise AssertionError(head.client.get_job_logs(first)[-4000:])
        # A row lands after its checkpoint: 2 rows (phase 1's and phase 2's first) mean
        # phase 2's first checkpoint is stored, 4 that the trial is done.
        return sorted(len(r) for r in trial_rows().values()) in ([2, 4], [3, 4])

    first = head.submit(workdir, *args)
    wait_until(one_done_and_the_next_midway, 900,
               "one trial finished and the next one's first phase-2 checkpoint", interval=1)
    # The driver itself (`python jobs/tune.py ...`), not the shell the job runs it from.
    drivers = [p for p in descendants(head.proc.pid)
               if cmdline(p)[1:2] == [b"jobs/tune.py"]]
    assert len(drivers) == 1, drivers
    os.kill(drivers[0], signal.SIGKILL)
    assert head.wait(first, 300, on_poll=sample) == JobStatus.FAILED
    before = trial_rows()
    finished = [n for n, r in before.items() if len(r) == 4]
    # A trial's rows start with the shared phase 1's (its history came with that checkpoint).
    assert len(finished) == 1 and len(before) == 2, before
    starts = len(runs.read_worker_starts(storage.join(exp, runs.TRIALS, finished[0])))
    assert "sweeps/team-a/e2e/best.json" not in s3_keys(bucket)

    submitted = time.monotonic()
    job = head.submit(workdir, *args, "--resume")
    status = head.wait(job, 1200, on_poll=sample)
    logs = head.client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    with capsys.disabled():  # a figure for the fault table (pytest -n 0 -s shows it)
        print(f"FAULT sweep driver killed: the resubmitted sweep finished "
              f"{time.monotonic() - submitted:.1f} s after its submission")
    assert "best trial trial-" in logs
    assert "phase 1: already done" in logs, logs[-3000:]
    after = trial_rows()
    assert len(after) == len(lrs)
    for name, rows in after.items():
        assert [(r["phase"], r["epoch"]) for r in rows] == [(1, 0), (2, 0), (2, 1), (2, 2)], name
    # The finished trial was not trained again: the same rows, no new worker start.
    assert after[finished[0]] == before[finished[0]]
    assert len(runs.read_worker_starts(storage.join(exp, runs.TRIALS, finished[0]))) == starts
    # Every trial starts from phase 1's checkpoint; the interrupted one once more, from its
    # own.
    (killed,) = set(after) - set(finished)
    restored = [r["restored_from"] for r in after[killed] if "restored_from" in r]
    assert len(restored) == 2 and (restored[1]["phase"], restored[1]["epoch"]) >= (2, 0)
    assert len(runs.read_metrics(storage.join(exp, "phase1"))) == 1

    # Results: experiment state, phase 1, the trials and best.json, all in the bucket, and
    # every object under the configured prefixes (--data datasets, --storage sweeps/team-a):
    # nothing written beside or above them.
    objects = _all_objects(bucket)
    outside = sorted(k for k in objects if not k.startswith(("datasets/", "sweeps/team-a/")))
    assert not outside, outside
    best = json.loads(storage.read_bytes(storage.join(exp, runs.BEST)))
    assert best["trials"] == len(lrs) and 0 <= best["evaluated_acc"] <= 1
    assert any(k.startswith("sweeps/team-a/e2e/experiment_state") for k in objects)

    # The working directory that travelled is the checkout minus .gitignore and .rayignore:
    # no virtual environment, results or data, and small.
    pkgs = [p for p in Path(head.temp_dir).glob(
        "session_2*/runtime_resources/working_dir_files/_ray_pkg_*") if p.is_dir()]
    assert len(pkgs) == 1, pkgs
    shipped = {p.relative_to(pkgs[0]).parts[0] for p in pkgs[0].rglob("*")}
    assert {"cifar_ray", "jobs", "tests"} <= shipped
    assert not shipped & set(PLANTED), shipped
    assert sum(p.stat().st_size for p in pkgs[0].rglob("*") if p.is_file()) < 2_000_000

    # inspect, from "a laptop": this process, reading the bucket only.
    capsys.readouterr()
    assert cli(["inspect", exp]) == 0
    out = capsys.readouterr().out
    assert sum(line.lstrip("* ").startswith("trial-") for line in out.splitlines()) == len(lrs)

    # Security: with recognisable fake keys in the cluster's environment, no key appears in
    # anything written (objects incl. checkpoints, Ray's session logs, the job's logs).
    written = list(objects.items()) + [("job logs", logs.encode())]
    for root, _, files in os.walk(head.temp_dir):
        for f in files:
            path = os.path.join(root, f)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as fh:
                    written.append((path, fh.read()))
    for name, blob in written:
        for secret in (FAKE_KEY_ID, FAKE_SECRET):
            assert secret.encode() not in blob, f"{secret} found in {name}"

    # Security: every socket our processes (Ray's daemons and workers, torch's rendezvous
    # store, moto) listened on during the job was on loopback.
    assert len(seen) >= 10, f"too few listening sockets seen for a real check: {seen}"
    assert any(s[3].startswith("ray::RayTrainWorker") for s in seen), seen
    public = sorted(s for s in seen if not s[0].startswith(("127.", "::1", "::ffff:127.")))
    assert not public, f"listening beyond loopback (ip, port, pid, process): {public}"


def test_use_gpu_on_a_cluster_without_gpus_fails_at_once(head, workdir, s3_data, bucket):
    job = head.submit(workdir, "python", "jobs/train.py", "--data", s3_data, "--dataset", "tiny",
                      "--storage", f"s3://{bucket}/runs", "--name", "gpu", "--workers", "2",
                      "--use-gpu", "--weights", "none", "--resource-timeout-s", "3600")
    assert head.wait(job, 600) == JobStatus.FAILED
    logs = head.client.get_job_logs(job)
    assert "GPU: need 2, cluster has 0, and no autoscaler can add nodes" in logs, logs[-3000:]
    assert "drop --use-gpu" in logs


def test_jobs_api_refuses_requests_without_the_token(head, workdir):
    before = {j.submission_id for j in head.client.list_jobs()}
    # The CLI without a token: refused, nothing submitted.
    done = head.cli("job", "submit", "--address", head.address, "--working-dir", str(workdir),
                    "--", "python", "-c", "print('should never run')", token=False)
    assert done.returncode != 0
    assert "Authentication" in done.stdout + done.stderr or "401" in done.stdout + done.stderr
    # Raw HTTP without the header, and with a wrong token: 401 / 403.
    for headers, code in (({}, 401), ({"Authorization": "Bearer " + "0" * 64}, 403)):
        req = urllib.request.Request(f"{head.address}/api/jobs/", headers=headers)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == code
    assert {j.submission_id for j in head.client.list_jobs()} == before


def test_submitting_to_an_address_without_a_cluster_is_a_clear_error(head):
    nowhere = f"http://127.0.0.1:{free_port()}"
    done = head.cli("job", "submit", "--address", nowhere, "--", "python", "-c", "print(1)",
                    timeout=300)
    assert done.returncode != 0
    assert nowhere.removeprefix("http://") in done.stdout + done.stderr
