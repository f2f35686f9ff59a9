"""MLflow tracking against a real `mlflow server` (sqlite backend) on 127.0.0.1, started here;
the runs on the module's local Ray instance, storage on the S3-protocol server.

    python -m pytest -q tests/test_mlflow.py
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import urllib.request

import pytest
from conftest import free_port, wait_until

from cifar_ray import runs, storage, train, tune
from cifar_ray.config import PhaseConfig, SweepConfig, TrainConfig

pytestmark = pytest.mark.ray
FAKE_PASSWORD = "mlflow-password-CANARY-7d1e"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on loopback; credentials in MLflow's own variables, as a user sets
    them (this server does not ask for them: the point is that they go nowhere). Set before
    the module's Ray instance starts, so its workers have them too."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "mlflow"), "server", "--host",
         "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError("mlflow server exited:\n" + (root / "server.log").read_text())
        try:
            with urllib.request.urlopen(uri + "/health", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME",
                                            "MLFLOW_TRACKING_PASSWORD")}
    os.environ.update(MLFLOW_TRACKING_USERNAME="cifar-ray-test",
                      MLFLOW_TRACKING_PASSWORD=FAKE_PASSWORD)
    try:
        wait_until(healthy, 300, "mlflow server to answer /health")
        yield {"uri": uri, "db": root / "mlflow.db"}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        log.close()


def _cfg(s3_data: str, bucket: str, name: str, uri: str) -> TrainConfig:
    return TrainConfig(data=s3_data, dataset="tiny", storage=f"s3://{bucket}/runs", name=name,
                       workers=2, weights="none", resource_timeout_s=5, mlflow_tracking_uri=uri,
                       phase1=PhaseConfig(epochs=1, lr=1e-3, batch_size=64),
                       phase2=PhaseConfig(epochs=2, lr=1e-3, optimizer="sgd", batch_size=64))


def test_an_unreachable_tracking_server_fails_before_ray_starts(s3_data, tmp_path):
    import ray

    uri = f"http://127.0.0.1:{free_port()}"
    cfg = dataclasses.replace(_cfg(s3_data, "unused", "x", uri), storage=str(tmp_path))
    with pytest.raises(ValueError, match=rf"--mlflow-tracking-uri {uri}: no MLflow tracking "
                                         r"server answers there"):
        train.fit(cfg)
    assert not ray.is_initialized()


def test_a_run_logs_its_config_epochs_and_result_and_no_credential(mlflow_server, ray_local,
                                                                   s3_data, bucket):
    from mlflow import MlflowClient

    cfg = _cfg(s3_data, bucket, "tracked", mlflow_server["uri"])
    summary = train.fit(cfg)
    client = MlflowClient(mlflow_server["uri"])
    exp = client.get_experiment_by_name("cifar_ray")
    (run,) = client.search_runs([exp.experiment_id],
                                f"tags.`cifar_ray.run` = '{storage.display(cfg.run_uri())}'")
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    assert run.data.params["phase2.lr"] == "0.001" and run.data.params["workers"] == "2"
    assert run.data.params["phase2.optimizer"] == "sgd"
    rows = runs.read_metrics(cfg.run_uri())
    history = client.get_metric_history(run.info.run_id, "val_acc")
    assert sorted((m.step, m.value) for m in history) == [
        (r["global_epoch"], pytest.approx(r["val_acc"])) for r in rows]
    assert run.data.metrics["test_acc"] == pytest.approx(summary["evaluated_acc"])
    assert run.data.tags["best_checkpoint"] == summary["best_checkpoint"]
    # MLflow's credentials were in every process's environment; none is written anywhere.
    written = [mlflow_server["db"].read_bytes()]
    written += [storage.read_bytes(storage.join(cfg.run_uri(), n))
                for n in (runs.CONFIG, runs.RESULT, runs.METRICS)]
    assert all(FAKE_PASSWORD.encode() not in blob for blob in written)
    assert FAKE_PASSWORD not in json.dumps(run.data.params)


def test_a_sweep_is_one_experiment_with_a_run_per_trial(mlflow_server, ray_local, s3_data,
                                                       bucket):
    from mlflow import MlflowClient

    t = dataclasses.replace(_cfg(s3_data, bucket, "tracked-sweep", mlflow_server["uri"]),
                            workers=1, storage=f"s3://{bucket}/sweeps",
                            phase2=PhaseConfig(epochs=1, optimizer="sgd", batch_size=64))
    best = tune.sweep(SweepConfig(train=t, lrs=[1e-3, 1e-2], scheduler="fifo",
                                  max_concurrent_trials=2))
    client = MlflowClient(mlflow_server["uri"])
    exp = client.get_experiment_by_name("tracked-sweep")
    found = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    trials = sorted(n for n in found if n.startswith("trial-"))
    assert len(trials) == 2 and runs.PHASE1 in found, sorted(found)
    assert sorted(found[n].data.params["phase2.lr"] for n in trials) == ["0.001", "0.01"]
    assert found[best["trial"]].data.metrics["test_acc"] == pytest.approx(
        best["evaluated_acc"])
    assert all(found[n].data.metrics["val_acc"] >= 0 for n in trials)

