"""The LR sweep on a real local Ray instance with storage on a real S3-protocol server, then
`inspect` on what it stored.

    python -m pytest -q tests/test_tune_ray.py
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import boto3
import pytest
from conftest import FAKE_KEY_ID, FAKE_SECRET, s3_keys
from PIL import Image

from cifar_ray import cluster, ray_internals, results, runs, storage, timeline, tune
from cifar_ray.cli import main as cli
from cifar_ray.config import PhaseConfig, SweepConfig, TrainConfig

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_local")]
REPO = Path(__file__).resolve().parents[1]


def _sweep_cfg(data_root: str, storage_root: str, name: str, **kw) -> SweepConfig:
    t = TrainConfig(data=data_root, dataset="tiny", storage=storage_root, name=name, workers=1,
                    weights="none", resource_timeout_s=5,
                    phase1=PhaseConfig(epochs=1, lr=1e-3, batch_size=64),
                    # Plain SGD: no optimizer state, so the smallest checkpoints to upload.
                    phase2=PhaseConfig(epochs=2, lr=1e-3, optimizer="sgd", momentum=0.0,
                                       batch_size=64))
    # Two LRs, one trial per CPU of the local instance: both run at once.
    return SweepConfig(train=t, **{"lrs": [1e-3, 1e-2], **kw})


def _trial_rows(exp: str) -> dict[str, list[dict]]:
    trials = storage.join(exp, runs.TRIALS)
    return {n: runs.read_metrics(storage.join(trials, n)) for n in storage.list_dir(trials)}


def test_asha_sweep_on_s3_runs_phase1_once_tracks_each_trial_in_mlflow_and_inspect_reads_it(
        s3_data, bucket, tmp_path, mlflow_server, capsys):
    cfg = _sweep_cfg(s3_data, f"s3://{bucket}/sweeps", "sw", scheduler="asha", grace_period=1,
                     reduction_factor=2)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, mlflow_tracking_uri=mlflow_server["uri"]))
    best = tune.sweep(cfg)
    exp = f"s3://{bucket}/sweeps/sw"
    names = storage.list_dir(exp)
    assert any(n.startswith("experiment_state") for n in names)
    assert {"best.json", "phase1", "trials"} <= set(names)

    # Phase 1 ran exactly once: one phase-1 run, no phase-1 checkpoint in any trial, and
    # every trial's history starts with that run's phase-1 epochs, restored from its checkpoint.
    phase1_rows = runs.read_metrics(storage.join(exp, "phase1"))
    assert [(r["phase"], r["epoch"]) for r in phase1_rows] == [(1, 0)]
    rows = _trial_rows(exp)
    assert len(rows) == len(cfg.lrs)
    for name, trial in rows.items():
        assert [r for r in trial if r["phase"] == 1] == phase1_rows, name
        assert trial[1]["restored_from"] == {"phase": 1, "epoch": 0}
        assert not any(n.startswith("checkpoint-p1") for n in
                       storage.list_dir(storage.join(exp, "trials", name)))
    assert best["phase1_epochs_saved"] == 1 and best["trials"] == 2
    assert best["lr"] in (1e-3, 1e-2) and 0 <= best["evaluated_acc"] <= 1
    assert json.loads(storage.read_bytes(storage.join(exp, "best.json"))) == best
    # best.json and a run's result.json name the same things alike.
    result = runs.read_json(storage.join(exp, "phase1", "result.json"))
    shared = {"best_checkpoint", "best_val_acc", "best_phase", "best_epoch", "evaluated_split",
              "evaluated_acc", "evaluated_loss", "evaluated_images"}
    assert shared <= set(best) and shared <= set(result)
    assert best["best_phase"] == 2 and result["best_phase"] == 1
    # Where the walls went: the sweep's (phase 1, the trials, ...) adding up to its wall;
    # phase 1's, inside the sweep's Ray session (no start or shutdown of its own); each
    # trial's that ran all its epochs (one the scheduler stopped early has none).
    tl = best["timeline"]
    assert list(tl["seconds"]) == list(timeline.SWEEP_PARTS)
    assert sum(tl["seconds"].values()) == pytest.approx(best["wall_seconds"], abs=0.1)
    assert tl["seconds"]["phase1"] > 0 and tl["seconds"]["trials"] > 0
    assert result["timeline"]["seconds"]["phase1_training"] > 0
    assert result["timeline"]["seconds"]["ray_start"] == 0
    assert any(len(r) == 3 for r in rows.values())  # the first to pass rung 1 always does
    for name in rows:
        trial_tl = runs.read_json(storage.join(exp, "trials", name, runs.TIMELINE))
        assert (trial_tl is not None) == (len(rows[name]) == 3), name  # 1 + 2 epochs
        if trial_tl is not None:
            assert trial_tl["seconds"]["phase2_training"] > 0, name
            assert sum(trial_tl["seconds"].values()) == pytest.approx(
                trial_tl["wall_seconds"], abs=0.1)

    # MLflow: the sweep is one experiment (its name), with phase 1's run and a run per
    # trial, each with its LR; the best trial's run has the test accuracy best.json has.
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server["uri"])
    mexp = client.get_experiment_by_name("sw")
    found = {r.info.run_name: r for r in client.search_runs([mexp.experiment_id])}
    trials = sorted(n for n in found if n.startswith("trial-"))
    assert len(trials) == 2 and runs.PHASE1 in found, sorted(found)
    assert sorted(found[n].data.params["phase2.lr"] for n in trials) == ["0.001", "0.01"]
    assert found[best["trial"]].data.metrics["test_acc"] == pytest.approx(
        best["evaluated_acc"])
    assert all(found[n].data.metrics["val_acc"] >= 0 for n in trials)

    # The same name again is refused without --resume.
    with pytest.raises(runs.ExperimentExistsError, match="--resume"):
        tune.sweep(cfg)

    # inspect: a row per trial, JSON naming the best LR, four PNGs of the expected size.
    capsys.readouterr()
    assert cli(["inspect", exp, "--plots", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    assert sum(line.lstrip("* ").startswith("trial-") for line in out.splitlines()) == 2
    assert cli(["inspect", exp, "--json"]) == 0
    parsed = json.loads(capsys.readouterr().out)
    assert parsed["best"]["lr"] == best["lr"]
    assert [t["lr"] for t in parsed["trials"] if t["is_best"]] == [best["lr"]]
    assert all(t["status"] == "TERMINATED" for t in parsed["trials"])
    for png in ("learning_curves", "lr_vs_val_acc", "confusion_matrix", "sample_predictions"):
        with Image.open(tmp_path / "plots" / f"{png}.png") as im:
            im.load()
            assert im.size == (800, 600), png

    # Credentials: the fake keys are in this process's environment, as a user's exported
    # keys would be; none of them is in any file of Ray's session folder (Tune copied them
    # into every trial's runtime env, which Ray's runtime-env agent logs in clear) nor in
    # any object of the sweep.
    written = [(k, boto3.client("s3").get_object(Bucket=bucket, Key=k)["Body"].read())
               for k in s3_keys(bucket, "sweeps/sw/")]
    for root, _, files in os.walk(ray_internals.session_dir()):
        for f in files:
            path = os.path.join(root, f)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as fh:
                    written.append((path, fh.read()))
    assert len(written) > 50, "too few files for a real search"
    assert any("runtime_env_agent" in name for name, _ in written)
    for name, blob in written:
        for secret in (FAKE_KEY_ID, FAKE_SECRET):
            assert secret.encode() not in blob, f"{secret} found in {name}"


def test_bad_sweeps_fail_before_any_trial(s3_data, tmp_path):
    too_big = _sweep_cfg(s3_data, str(tmp_path), "big")
    too_big = dataclasses.replace(too_big, train=dataclasses.replace(
        too_big.train, workers=4, resource_timeout_s=1,
        phase1=PhaseConfig(epochs=1, batch_size=64), phase2=PhaseConfig(epochs=2, batch_size=64)))
    with pytest.raises(cluster.ResourceError, match="CPU: need 4, cluster has 2"):
        tune.sweep(too_big)
    assert not (tmp_path / "big").exists()
    with pytest.raises(runs.ExperimentExistsError, match="--resume: no experiment"):
        tune.sweep(_sweep_cfg(s3_data, str(tmp_path), "none", resume=True))


def test_inspect_of_a_uri_without_an_experiment_is_a_clear_error(tmp_path):
    with pytest.raises(results.NoExperimentError, match="holds no cifar_ray sweep"):
        results.load(str(tmp_path))
