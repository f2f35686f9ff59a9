"""TensorBoard event files beside metrics.jsonl: what a run logs, read back by an independent
parser (tests/conftest.py), on a local folder; the Ray tests read a run's from S3.

    python -m pytest -q tests/test_tracking.py
"""

from __future__ import annotations

import os

import pytest
from conftest import tensorboard_scalars

from cifar_ray import tracking


def _row(phase: int, epoch: int, global_epoch: int, val_acc: float) -> dict:
    return {"phase": phase, "epoch": epoch, "global_epoch": global_epoch, "train_loss": 1.5,
            "val_loss": 1.25, "train_acc": 0.5, "val_acc": val_acc, "lr_start": 1e-3,
            "lr_end": 5e-4, "images_per_s": 321.0, "seconds": 9.5, "feature_cache": True}


def test_each_epoch_lands_under_global_and_per_phase_tags(tmp_path):
    run = str(tmp_path / "run")
    board = tracking.TensorBoard(run)
    rows = [_row(1, 0, 1, 0.25), _row(1, 1, 2, 0.5), _row(2, 0, 3, 0.75)]
    for r in rows:
        board.epoch(r)
    board.close()
    (name,) = os.listdir(tmp_path / "run" / "tb")  # copied whole after every epoch
    assert name.startswith("events.out.tfevents.")
    scalars = tensorboard_scalars((tmp_path / "run" / "tb" / name).read_bytes())
    assert scalars["accuracy/val"] == {1: 0.25, 2: 0.5, 3: 0.75}
    assert scalars["phase1/accuracy/val"] == {1: 0.25, 2: 0.5}
    assert scalars["phase2/accuracy/val"] == {1: 0.75}
    assert scalars["phase"] == {1: 1.0, 2: 1.0, 3: 2.0}
    assert scalars["lr/end"][3] == pytest.approx(5e-4)
    assert scalars["images_per_s"][2] == 321.0 and scalars["loss/train"][1] == 1.5
    assert not os.path.exists(board.local)


def test_a_restarted_worker_adds_a_second_event_file_and_keeps_the_first(tmp_path):
    run = str(tmp_path / "run")
    first = tracking.TensorBoard(run)
    first.epoch(_row(1, 0, 1, 0.25))
    first.close()
    second = tracking.TensorBoard(run)
    second.epoch(_row(1, 1, 2, 0.5))
    second.close()
    files = sorted(os.listdir(tmp_path / "run" / "tb"))
    assert len(files) == 2
    steps = [tensorboard_scalars((tmp_path / "run" / "tb" / f).read_bytes())["accuracy/val"]
             for f in files]
    assert sorted(steps, key=lambda d: min(d)) == [{1: 0.25}, {2: 0.5}]
