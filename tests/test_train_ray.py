"""The training job on a real local Ray instance with storage on a real S3-protocol server.

    python -m pytest -q tests/test_train_ray.py

Tiny settings (a few hundred synthetic images, 1-3 epochs), but the real ResNet50, the real
TorchTrainer with 2 gloo workers, real checkpoints in the bucket, real process kills.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
from pathlib import Path

import boto3
import pytest
import ray
import ray.train
import yaml
from conftest import (
    FAKE_KEY_ID,
    FAKE_MLFLOW_PASSWORD,
    FAKE_SECRET,
    descendants,
    evaluation_tasks,
    fit_in_thread,
    listeners,
    s3_keys,
    tensorboard_scalars,
    wait_until,
)

from cifar_ray import (
    checkpoint,
    cluster,
    data,
    model,
    ray_internals,
    runs,
    storage,
    timeline,
    train,
)
from cifar_ray.config import PhaseConfig, TrainConfig

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_local")]
REPO = Path(__file__).resolve().parents[1]


def _cfg(data_root: str, storage_root: str, name: str, **kw) -> TrainConfig:
    base = dict(data=data_root, dataset="tiny", storage=storage_root, name=name, workers=2,
                weights="none", resource_timeout_s=5,
                phase1=PhaseConfig(epochs=1, lr=1e-3, batch_size=64),
                # SGD keeps one buffer per weight: smaller checkpoints than Adam's two.
                phase2=PhaseConfig(epochs=1, lr=1e-3, optimizer="sgd", batch_size=64,
                                   augment=True))
    base.update(kw)
    return TrainConfig(**base)


def _ray_workers() -> list[str]:
    """Titles of this test's Ray worker processes (ray::IDLE or ray::<task>), not its agents."""
    out = []
    for pid in descendants(os.getpid()):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:
            continue
        if title.startswith("ray::") and not title.startswith(("ray::DashboardAgent",
                                                               "ray::RuntimeEnvAgent")):
            out.append(title)
    return out


@pytest.mark.fresh_ray
def test_a_local_instance_starts_no_worker_ahead_and_reports_no_usage():
    # On an instance no test has used yet. Ray's defaults fork a worker per CPU
    # (2 here) while ray.init starts the instance, before any task asks for one; ours starts
    # none until a task or actor needs it.
    for _ in range(6):
        assert _ray_workers() == []
        time.sleep(0.5)
    assert not ray_internals.usage_stats_enabled()


def test_run_on_s3_writes_checkpoints_metrics_weights_and_result_and_tracks_it_in_mlflow(
        s3_data, bucket, mlflow_server, capfd, caplog):
    # Plain SGD in phase 2: no optimizer state, so the smallest checkpoint to upload and scan.
    cfg = _cfg(s3_data, f"s3://{bucket}/runs", "r1", mlflow_tracking_uri=mlflow_server["uri"],
               phase2=PhaseConfig(epochs=1, lr=1e-3, optimizer="sgd", momentum=0.0,
                                  batch_size=64, augment=True))
    # Sample every listening socket of our processes while the 2 gloo workers train.
    seen, done = set(), threading.Event()

    def sample():
        while not done.is_set():
            seen.update(listeners(descendants(os.getpid())))
            done.wait(0.5)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with caplog.at_level("INFO", logger="cifar_ray"):
            summary = train.fit(cfg)
    finally:
        done.set()
        sampler.join()
    # Ray's servers, torch's rendezvous store and gloo's peer sockets: all on loopback.
    assert sum(s[3].startswith("ray::RayTrainWorker") for s in seen) >= 2, seen
    public = sorted(s for s in seen if not s[0].startswith(("127.", "::1", "::ffff:127.")))
    assert not public, f"listening beyond loopback (ip, port, pid, process): {public}"
    keys = s3_keys(bucket, "runs/r1/")
    for name in ("config.json", "metrics.jsonl", "result.json"):
        assert f"runs/r1/{name}" in keys
    assert {"runs/r1/checkpoint-p1-e000/state.pt", "runs/r1/checkpoint-p2-e000/state.pt",
            "runs/r1/checkpoint-p2-e000/state.pt.sha256"} <= set(keys)
    # Phase 1 stores what it changes: the head with its optimizer, referring to the frozen
    # backbone stored once beside it; it loads whole.
    (backbone,) = [k for k in keys if k.startswith("runs/r1/backbone-")]
    p1 = f"s3://{bucket}/runs/r1/checkpoint-p1-e000"
    assert len(storage.read_bytes(f"{p1}/state.pt")) < 4 * 2**20
    assert checkpoint.load_uri(p1)["model"].keys() == model.build("none").state_dict().keys()
    assert backbone.endswith(".pt")
    rows = [json.loads(x) for x in storage.read_bytes(f"s3://{bucket}/runs/r1/metrics.jsonl")
            .decode().splitlines()]
    assert [(r["phase"], r["epoch"]) for r in rows] == [(1, 0), (2, 0)]
    assert summary["evaluated_split"] == "test" and 0 <= summary["evaluated_acc"] <= 1
    # On a one-machine instance the driver evaluates itself: no task (and process) for it.
    assert cluster.this_machine_only() and not evaluation_tasks()
    # The last epoch's weights are its checkpoint's: not written a second time.
    assert summary["final_checkpoint"] == f"s3://{bucket}/runs/r1/checkpoint-p2-e000"
    assert not [k for k in keys if k.endswith("model_final.pt")]
    # TensorBoard: rank 0's event file beside the metrics, the same values per epoch.
    (events,) = [k for k in keys if k.startswith("runs/r1/tb/events.out.tfevents.")]
    board = tensorboard_scalars(storage.read_bytes(f"s3://{bucket}/{events}"))
    for r in rows:
        for key, tag in (("val_acc", "accuracy/val"), ("train_loss", "loss/train"),
                         ("lr_end", "lr/end"), ("images_per_s", "images_per_s")):
            assert board[tag][r["global_epoch"]] == pytest.approx(r[key], rel=1e-6), (tag, r)
        assert board[f"phase{r['phase']}/accuracy/val"][r["epoch"] + 1] == pytest.approx(
            r["val_acc"], rel=1e-6)
    assert json.loads(storage.read_bytes(f"s3://{bucket}/runs/r1/result.json")) == summary
    # Where the wall went: every part, adding up to it; training, and the loop blocked on
    # the reports of its checkpoints; no restart. Its line in the log after the result.
    tl = summary["timeline"]
    assert list(tl["seconds"]) == list(timeline.RUN_PARTS)
    assert sum(tl["seconds"].values()) == pytest.approx(summary["wall_seconds"], abs=0.15)
    assert tl["seconds"]["phase1_training"] > 0 and tl["seconds"]["phase2_training"] > 0
    assert tl["seconds"]["checkpoints"] > 0 and tl["seconds"]["worker_start"] > 0
    assert tl["seconds"]["restarts"] == 0 and tl["restarts"] == 0
    assert tl["seconds"]["phase2_training"] == pytest.approx(rows[1]["train_seconds"], abs=0.01)
    assert timeline.line(tl) in caplog.messages
    (start,) = json.loads(storage.read_bytes(f"s3://{bucket}/runs/r1/worker_starts.json"))
    assert start["final_report_seconds"] > 0 and start["ended"] > rows[-1]["finished_at"]
    # The stored config is the resolved one, and no credential leaked into anything written.
    assert json.loads(storage.read_bytes(f"s3://{bucket}/runs/r1/config.json"))["name"] == "r1"
    # Everything written is under --storage (runs/): no marker objects above it. And no
    # credential (S3's or MLflow's, both in every process's environment) in any object,
    # checkpoints and weights included.
    everything = s3_keys(bucket, "")
    assert all(k.startswith("runs/") for k in everything), everything
    s3 = boto3.client("s3")
    for key in everything:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        for secret in (FAKE_SECRET, FAKE_KEY_ID, FAKE_MLFLOW_PASSWORD):
            assert secret.encode() not in body, (secret, key)

    # MLflow: one run, named after ours and tagged with its folder, holding the resolved
    # config as params, every epoch's metrics, the result, and no credential.
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server["uri"])
    exp = client.get_experiment_by_name("cifar_ray")
    (run,) = client.search_runs([exp.experiment_id],
                                f"tags.`cifar_ray.run` = '{storage.display(cfg.run_uri())}'")
    assert run.info.run_name == "r1" and run.info.status == "FINISHED"
    assert run.data.params["phase2.lr"] == "0.001" and run.data.params["workers"] == "2"
    assert run.data.params["phase2.optimizer"] == "sgd"
    history = client.get_metric_history(run.info.run_id, "val_acc")
    assert sorted((m.step, m.value) for m in history) == [
        (r["global_epoch"], pytest.approx(r["val_acc"])) for r in rows]
    assert run.data.metrics["test_acc"] == pytest.approx(summary["evaluated_acc"])
    assert run.data.tags["best_checkpoint"] == summary["best_checkpoint"]
    assert FAKE_MLFLOW_PASSWORD.encode() not in mlflow_server["db"].read_bytes()
    assert FAKE_MLFLOW_PASSWORD not in json.dumps(run.data.params)

    # What a person sees: our per-epoch lines once (rank 0), and none of Ray Train's per-report
    # INFO lines nor the preemption watcher's spurious ERROR (Ray forwards worker output
    # asynchronously: wait for rank 0's last line, which follows its reports).
    seen_out = []

    def forwarded() -> bool:
        seen_out.append(capfd.readouterr())
        return "training done:" in "".join(c.out + c.err for c in seen_out)

    wait_until(forwarded, 120, "the workers' last log line")
    text = "".join(c.out + c.err for c in seen_out)
    assert text.count("[phase 2 epoch 1/1 | 2/2]") == 1, text[-3000:]
    assert "Reporting training result" not in text and "PreemptionWatcher" not in text

    # Running the finished name again is refused, and nothing stored changes.
    with pytest.raises(runs.RunExistsError, match="finished run"):
        train.fit(cfg)
    assert s3_keys(bucket, "runs/r1/") == keys


def _worker_pids() -> list[int]:
    """PIDs of this test's live Ray Train worker processes (ray::RayTrainWorker...): only
    under this process, never another Ray instance's on the machine."""
    pids = []
    for pid in descendants(os.getpid()):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                pids.append(pid)
        except OSError:
            continue
    return pids


def test_training_goes_on_while_a_checkpoint_upload_rides_out_a_storage_outage(
        s3_data, bucket, s3_proxy, capfd):
    """Every connection to the run's storage is reset from the moment the first epoch's row
    is stored (the last write of that epoch's upload) until rank 0 has trained two more
    epochs and the upload has logged a retry: the first phase-2 checkpoint's
    upload, overlapping the next epoch, retries through the outage while training goes on
    (with uploads that blocked training, no epoch could end while storage is down); once
    storage is back it lands, and the run finishes with every epoch once and no worker-group
    restart (none allowed here)."""
    root = f"s3://{bucket}/runs?endpoint_override={s3_proxy.endpoint}"
    cfg = _cfg(s3_data, root, "outage", max_failures=0, storage_retry_s=150,
               phase2=PhaseConfig(epochs=3, lr=1e-3, optimizer="sgd", batch_size=64))
    t, out = fit_in_thread(cfg)
    wait_until(lambda: "runs/outage/metrics.jsonl" in s3_keys(bucket, "runs/outage/"), 600,
               "the first epoch's metrics row")
    cut = time.monotonic()
    s3_proxy.cut()
    seen = []

    def trained_on_and_retried() -> bool:
        seen.append(capfd.readouterr())
        text = "".join(c.out + c.err for c in seen)
        # Our retry loop logs once the S3 client's own ~6 s of retries have failed: the
        # outage lasts at least that long, whatever the epochs take.
        return "[phase 2 epoch 2/3" in text and "retrying in" in text

    try:
        wait_until(trained_on_and_retried, 180,
                   "rank 0 to finish phase-2 epoch 2, and the upload to retry, while storage "
                   "is cut")
        # The upload in flight is still waiting for storage: epoch 1's checkpoint is not
        # stored yet (only the first checkpoint and its backbone are).
        assert not any(k.startswith("runs/outage/checkpoint-p2-") for k in
                       s3_keys(bucket, "runs/outage/"))
    finally:
        s3_proxy.restore()
    with capfd.disabled():  # a figure for the fault table (pytest -n 0 -s shows it)
        print(f"FAULT storage outage of {time.monotonic() - cut:.0f} s during an upload: "
              f"training went on through it")
    t.join(timeout=1200)
    assert not t.is_alive() and "error" not in out, out.get("error")
    rows = runs.read_metrics(cfg.run_uri())
    assert [(r["phase"], r["epoch"]) for r in rows] == [(1, 0), (2, 0), (2, 1), (2, 2)]
    assert not any("restored_from" in r for r in rows)


def test_a_failed_run_resumes_by_name_and_a_killed_worker_restarts_it_from_its_checkpoint(
        s3_data, tmp_path):
    """A worker killed with no restart allowed fails the run; the same name and recipe
    resumes it (a changed recipe is refused); in the resumed run, with a restart allowed, a
    killed worker restarts the run by itself from its latest checkpoint. (One run for both
    kinds of resume: a run costs tens of seconds here.)"""
    cfg = _cfg(s3_data, str(tmp_path / "runs"), "r3", max_failures=0,
               phase2=PhaseConfig(epochs=3, lr=1e-3, optimizer="sgd", batch_size=64))
    run = tmp_path / "runs" / "r3"
    t, out = fit_in_thread(cfg)
    wait_until(lambda: (run / "checkpoint_manager_snapshot.json").exists(), 600,
               "the first checkpoint")
    os.kill(wait_until(_worker_pids, 120, "a RayTrainWorker process")[0], signal.SIGKILL)
    t.join(timeout=1200)
    assert isinstance(out.get("error"), ray.train.TrainingFailedError)
    assert not (run / "result.json").exists()

    changed = _cfg(s3_data, str(tmp_path / "runs"), "r3", max_failures=0,
                   phase2=PhaseConfig(epochs=3, lr=5e-3, optimizer="sgd", batch_size=64))
    with pytest.raises(runs.RunExistsError, match="different configuration.*phase2"):
        train.fit(changed)

    # Same name, same recipe: resumes. --max-failures is not part of the recipe: one restart
    # is allowed now, and a worker is killed once the resumed run has stored an epoch.
    t, out = fit_in_thread(dataclasses.replace(cfg, max_failures=1))
    wait_until(lambda: any("restored_from" in r for r in runs.read_metrics(cfg.run_uri()))
               or not t.is_alive(), 600, "the resumed run's first epoch")
    os.kill(wait_until(_worker_pids, 120, "a RayTrainWorker process")[0], signal.SIGKILL)
    t.join(timeout=1200)
    assert not t.is_alive() and "error" not in out, out.get("error")
    summary = out["summary"]
    rows = runs.read_metrics(cfg.run_uri())
    assert [(r["phase"], r["epoch"]) for r in rows] == [(1, 0), (2, 0), (2, 1), (2, 2)]
    restored = [i for i, r in enumerate(rows) if "restored_from" in r]
    # Two restores, the resume by name and the killed worker's restart; the restart
    # continued right after a stored checkpoint, not at epoch 0.
    assert len(restored) == 2 and restored[0] >= 1
    before = rows[restored[1] - 1]
    assert rows[restored[1]]["restored_from"] == {"phase": before["phase"],
                                                  "epoch": before["epoch"]}
    # Its timeline counts the epochs this job trained, not those of the failed one before,
    # and the restart with the time it lost.
    seconds = summary["timeline"]["seconds"]
    assert seconds["phase1_training"] + seconds["phase2_training"] == pytest.approx(
        sum(r["train_seconds"] for r in rows[restored[0]:]), abs=0.02)
    assert summary["timeline"]["restarts"] == 1 and seconds["restarts"] > 0
    assert summary["epochs"] == 4 and (run / "result.json").exists()

    # Finished now: the same name is refused (what --overwrite does instead, deleting the run
    # before anything starts: test_runs.py).
    with pytest.raises(runs.RunExistsError, match="--overwrite"):
        train.fit(cfg)


def test_use_gpu_fails_at_once_unless_an_autoscaler_can_add_gpus(s3_data, tmp_path,
                                                                   monkeypatch):
    # This local instance has no autoscaler: no wait at all, whatever --resource-timeout-s.
    cfg = _cfg(s3_data, str(tmp_path), "gpu", use_gpu=True, resource_timeout_s=600)
    with pytest.raises(cluster.ResourceError,
                       match=r"GPU: need 2, cluster has 0, and no autoscaler.*--use-gpu"):
        train.fit(cfg)
    # On a `ray up` head (its bootstrap config is our cluster.yaml, prepared by Ray), GPU
    # nodes may still come: wait the bounded time. Beyond the config's largest size: at once.
    with open(REPO / "cluster.yaml") as f:
        boot = ray_internals.prepare_autoscaler_config(yaml.safe_load(f))
    (tmp_path / "bootstrap.yaml").write_text(yaml.safe_dump(boot))
    monkeypatch.setattr(cluster, "AUTOSCALER_CONFIG", str(tmp_path / "bootstrap.yaml"))
    with pytest.raises(cluster.ResourceError, match=r"GPU: need 2.*Waited 2 s for the autoscaler"):
        train.fit(dataclasses.replace(cfg, resource_timeout_s=2))
    with pytest.raises(cluster.ResourceError, match=r"at its largest the autoscaler gives GPU: 16"):
        train.fit(dataclasses.replace(cfg, workers=32))
    assert not (tmp_path / "gpu" / "config.json").exists()


def test_missing_dataset_and_bucket_fail_before_ray_work(s3_data, tmp_path):
    with pytest.raises(data.DataError, match="s3://cifar-ray-datasets/datasets/nope"):
        train.fit(_cfg(s3_data, str(tmp_path), "x", dataset="nope"))
    with pytest.raises(storage.StorageError, match="s3://no-such-bucket-for-runs/runs"):
        train.fit(_cfg(s3_data, "s3://no-such-bucket-for-runs/runs", "x"))


def test_a_local_instance_keeps_token_authentication_on(ray_local):
    # Started as init_ray starts one (ray.init on loopback, RAY_AUTH_MODE left to Ray): the
    # dashboard and jobs API refuse a request without the token, accept one with it.
    import urllib.error
    import urllib.request

    url = f"http://{ray_internals.dashboard_url()}/api/jobs/"
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url, timeout=30)
    assert e.value.code == 401
    headers = ray_internals.auth_headers()
    assert headers, "token authentication is off"
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as r:
        assert r.status == 200


def test_an_error_the_user_can_fix_reaches_the_driver_as_itself(s3_data, tmp_path):
    # A missing file is refused before Ray starts; one that is there but holds no state_dict
    # fails inside the workers (they load it), yet the caller (and the CLI, which prints it
    # as one line) gets the WeightsError naming the flag, not Ray's wrapper. (No restarts:
    # each would fail the same way, and take ten seconds here.)
    with pytest.raises(model.WeightsError, match=r"--weights .*missing\.pt: no such file"):
        train.fit(_cfg(s3_data, str(tmp_path), "w", weights=str(tmp_path / "missing.pt")))
    (tmp_path / "junk.pt").write_bytes(b"not a state_dict")
    with pytest.raises(model.WeightsError, match=r"--weights .*junk\.pt: not a loadable"):
        train.fit(_cfg(s3_data, str(tmp_path), "w", weights=str(tmp_path / "junk.pt"),
                       max_failures=0))
