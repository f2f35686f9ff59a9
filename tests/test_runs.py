"""Run and experiment folders without Ray: names, refuse/resume/replace, best checkpoints,
and `inspect` on a hand-made experiment in a fresh interpreter that never imports Ray.

    python -m pytest -q tests/test_runs.py
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cifar_ray import checkpoint, runs, storage, timeline
from cifar_ray.cli import main as cli
from cifar_ray.config import PhaseConfig, SweepConfig, TrainConfig

REPO = Path(__file__).resolve().parents[1]


def _cfg(root: Path, **kw) -> TrainConfig:
    return TrainConfig(**{"storage": str(root), "name": "r", "workers": 1, "weights": "none",
                          "phase1": PhaseConfig(epochs=1, batch_size=8),
                          "phase2": PhaseConfig(epochs=2, batch_size=8), **kw})


def _row(phase: int, epoch: int, val_acc: float) -> dict:
    return {"phase": phase, "epoch": epoch, "val_acc": val_acc, "seconds": 1.0}


def _finished(cfg: TrainConfig) -> None:
    runs.write_config(cfg)
    runs.write_json(storage.join(cfg.run_uri(), runs.RESULT), {"done": True})


def test_a_finished_run_is_refused_replaced_by_overwrite_and_by_the_next_smoke_run(
        tmp_path, caplog):
    real = _cfg(tmp_path)
    _finished(real)
    with pytest.raises(runs.RunExistsError, match="finished run.*--overwrite"):
        runs.check_run(real)
    # --smoke over a run that was not a smoke run: refused too, nothing deleted.
    with pytest.raises(runs.RunExistsError, match="finished run"):
        runs.check_run(_cfg(tmp_path, smoke=True))
    assert (tmp_path / "r" / runs.RESULT).exists()

    smoke = _cfg(tmp_path, smoke=True)
    runs.write_config(smoke)  # now the stored run is a smoke run
    with caplog.at_level("INFO", logger="cifar_ray"):
        runs.check_run(smoke)
    assert "replacing the previous smoke run" in caplog.text
    assert not (tmp_path / "r").exists()

    _finished(real)
    runs.check_run(_cfg(tmp_path, overwrite=True))
    assert not (tmp_path / "r").exists()


def test_an_unfinished_run_resumes_only_with_the_same_recipe(tmp_path):
    cfg = _cfg(tmp_path)
    runs.write_config(cfg)
    runs.check_run(_cfg(tmp_path, workers=2, max_failures=3, log_level="DEBUG"))  # how, not what
    with pytest.raises(runs.RunExistsError, match=r"different configuration \(phase2 differ"):
        runs.check_run(_cfg(tmp_path, phase2=PhaseConfig(epochs=2, batch_size=8, lr=0.5)))


def test_experiments_are_refused_without_resume_and_smoke_sweeps_are_replaced(tmp_path):
    def sweep(**kw):
        train = TrainConfig(storage=str(tmp_path), name="e", smoke=kw.pop("smoke", False))
        return SweepConfig(train=train, **kw)

    with pytest.raises(runs.ExperimentExistsError, match="--resume: no experiment"):
        runs.check_experiment(sweep(resume=True))
    assert runs.check_experiment(sweep()) is False  # nothing there: a fresh start

    phase1 = dataclasses.replace(sweep().train, storage=str(tmp_path / "e"), name=runs.PHASE1)
    runs.write_config(phase1)
    with pytest.raises(runs.ExperimentExistsError, match="pass --resume"):
        runs.check_experiment(sweep())
    with pytest.raises(runs.ExperimentExistsError, match="pass --resume"):
        runs.check_experiment(sweep(smoke=True))  # not a smoke sweep: kept
    assert runs.check_experiment(sweep(resume=True)) is True

    runs.write_config(dataclasses.replace(phase1, smoke=True))
    assert runs.check_experiment(sweep(smoke=True)) is False
    assert not (tmp_path / "e").exists()


def test_best_checkpoint_is_the_best_epoch_that_ray_kept(tmp_path):
    run = str(tmp_path / "r")
    rows = [_row(1, 0, 0.5), _row(2, 0, 0.7), _row(2, 1, 0.7), _row(2, 2, 0.6)]
    # Ray kept two (best by val accuracy, ties broken its own way) and the latest.
    for phase, epoch in ((2, 1), (2, 2)):
        (tmp_path / "r" / checkpoint.dir_name(phase, epoch)).mkdir(parents=True)
    row, uri = runs.best_checkpoint(run, rows)
    assert (row["phase"], row["epoch"]) == (2, 1) and uri.endswith("checkpoint-p2-e001")
    assert runs.best_checkpoint(run, rows, phase=1) is None
    assert runs.best_epoch(rows)["epoch"] == 0  # the earliest of a tie
    ev = {"split": "test", "accuracy": 0.66, "loss": 1.0, "count": 10}
    summary = runs.evaluated(row, uri, ev)
    assert summary["best_checkpoint"] == uri and summary["evaluated_acc"] == 0.66
    assert "test accuracy 0.6600 on 10 images" in runs.describe(summary)


def test_checkpoints_order_by_how_far_training_had_got():
    """A resume takes the newest: a checkpoint taken mid-epoch (on a preemption notice) comes
    after the epoch before it and before its own epoch's end."""
    names = [checkpoint.dir_name(*p) for p in
             ((2, 3), (1, 9), (2, 3, 40), (2, 2), (2, 3, 7), (2, 4, 1))]
    assert names[2] == "checkpoint-p2-e003-s00040"
    assert sorted(names, key=checkpoint.progress) == [
        "checkpoint-p1-e009", "checkpoint-p2-e002", "checkpoint-p2-e003-s00007",
        "checkpoint-p2-e003-s00040", "checkpoint-p2-e003", "checkpoint-p2-e004-s00001"]
    assert checkpoint.progress("metrics.jsonl") is None


def test_inspect_reads_an_experiment_without_importing_ray_or_torch(tmp_path):
    exp = tmp_path / "exp"
    base = TrainConfig(storage=str(exp / runs.TRIALS), workers=1, weights="none")
    for i, (lr, accs) in enumerate(((1e-4, [0.2, 0.3]), (1e-3, [0.4, 0.6]))):
        cfg = dataclasses.replace(base, name=f"trial-x_{i:05d}",
                                phase2=dataclasses.replace(base.phase2, lr=lr, epochs=2))
        runs.write_config(cfg)
        runs.write_metrics(cfg.run_uri(), [_row(1, 0, 0.1)] + [
            _row(2, e, a) for e, a in enumerate(accs)])
    runs.write_metrics(str(exp / runs.PHASE1), [_row(1, 0, 0.1)])
    # The second trial ran to its end: its timeline.json; the first was stopped: none.
    trial_tl = timeline.build(20.0, {"phase2_training": 12.0, "checkpoints": 3.0})
    runs.write_json(str(exp / runs.TRIALS / "trial-x_00001" / runs.TIMELINE), trial_tl)
    code = textwrap.dedent(f"""
        import sys
        from cifar_ray.cli import main
        rc = main(["inspect", {str(exp)!r}, "--json"])
        print("LOADED", sorted(m for m in ("ray", "torch", "torchvision") if m in sys.modules))
        sys.exit(rc)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout[:out.stdout.rindex("LOADED")])
    assert [t["best_val_acc"] for t in info["trials"] if t["is_best"]] == [0.6]
    assert [t["timeline"] for t in info["trials"]] == [None, trial_tl]
    assert info["best"] is None  # no best.json: the sweep has not finished
    assert "LOADED []" in out.stdout


def test_inspect_shows_where_a_runs_wall_went_in_its_table_and_json(tmp_path, capsys):
    cfg = _cfg(tmp_path)
    runs.write_config(cfg)
    rows = [dict(_row(1, 0, 0.5), global_epoch=1, train_loss=2.0, train_acc=0.2, val_loss=2.1,
                 lr_start=1e-3, lr_end=1e-4, images_per_s=100.0)]
    runs.write_metrics(cfg.run_uri(), rows)
    tl = timeline.build(25.0, {"ray_start": 5.0, "phase1_training": 9.0, "checkpoints": 2.5,
                               "restarts": 4.0, "shutdown": 0.2}, restarts=1)
    ev = {"split": "test", "accuracy": 0.4, "loss": 1.9, "count": 40}
    result = {**runs.evaluated(rows[0], str(tmp_path / "r" / "checkpoint-p1-e000"), ev),
              "wall_seconds": 25.0, "timeline": tl}
    runs.write_json(storage.join(cfg.run_uri(), runs.RESULT), result)

    assert cli(["inspect", cfg.run_uri()]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[-2].startswith("best checkpoint ")  # the timeline right under the result
    assert text[-1] == ("timeline: wall 25 s: 9.0 s phase 1 training, 5.0 s Ray start, "
                        "4.3 s other, 4.0 s lost to 1 restart, 2.5 s blocked on checkpoints")
    assert cli(["inspect", cfg.run_uri(), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)["result"]["timeline"]
    assert shown == tl and sum(shown["seconds"].values()) == pytest.approx(25.0)
