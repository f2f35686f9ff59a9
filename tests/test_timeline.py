"""Where a run's wall went: the timeline's arithmetic and its one-line summary, without Ray.

    python -m pytest -q tests/test_timeline.py
"""

from __future__ import annotations

import pytest

from cifar_ray import timeline

pytestmark = pytest.mark.fast


class FakeTime:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _row(phase, finished_at, train, eval_s=1.0, ckpt=0.0, cache=0.0):
    return {"phase": phase, "finished_at": finished_at, "train_seconds": train,
            "eval_seconds": eval_s, "checkpoint_seconds": ckpt, "feature_cache_seconds": cache}


def test_the_parts_of_a_restarted_run_add_up_to_its_wall_and_the_restart_is_counted():
    # Two worker-group starts of one fit begun at t=1000: the first trains phase 1 and one
    # phase-2 epoch, then fails; the second resumes and finishes. An epoch row of an earlier
    # job (a resumed run) ended before this fit's first start: not counted again.
    fit_start = 1000.0
    starts = [{"started": 1003.0, "data_load_seconds": 2.0, "model_setup_seconds": 1.0},
              {"started": 1030.0, "data_load_seconds": 2.0, "model_setup_seconds": 1.0,
               "final_report_seconds": 0.8, "ended": 1051.0}]
    rows = [_row(1, 900.0, 99.0, 9.0, 9.0, 9.0),  # the earlier job's
            _row(1, 1010.0, 4.0, cache=1.5), _row(2, 1020.0, 6.0, ckpt=1.2),
            _row(2, 1040.0, 6.0), _row(2, 1050.0, 7.0, ckpt=1.0)]
    parts, restarts = timeline.worker_parts(rows, starts, fit_start)
    assert restarts == 1
    assert parts == pytest.approx({
        "worker_start": 3.0, "data_load": 4.0, "model_setup": 2.0, "feature_cache": 1.5,
        "phase1_training": 4.0, "phase2_training": 19.0, "validation": 4.0,
        # each row's blocked time (the previous report's) and the last report, at the end
        "checkpoints": 1.2 + 1.0 + 0.8,
        # from the failed group's last epoch (t=1020) to the new group's start (t=1030)
        "restarts": 10.0})

    now = FakeTime()
    clock = timeline.Clock(now)
    for name, seconds in (("preflight", 1.0), ("ray_start", 5.0), ("fit", 55.0),
                          ("final_evaluation", 2.0), ("shutdown", 1.5)):
        now.t += seconds
        assert clock.lap(name) == seconds
    clock.add(parts, restarts)
    tl = clock.timeline()
    assert clock.wall() == tl["wall_seconds"] == 64.5
    assert list(tl["seconds"]) == list(timeline.RUN_PARTS)  # every part, in time order
    assert sum(tl["seconds"].values()) == pytest.approx(64.5, abs=0.01)
    assert tl["seconds"]["other"] == pytest.approx(55.0 - 50.5)  # the fit's unexplained rest
    assert tl["seconds"]["ray_start"] == 5.0 and tl["restarts"] == 1
    assert all(v >= 0 for v in tl["seconds"].values())


def test_a_failed_start_without_an_epoch_loses_everything_after_its_setup():
    starts = [{"started": 10.0, "data_load_seconds": 3.0, "model_setup_seconds": 1.0},
              {"started": 40.0, "data_load_seconds": 3.0, "model_setup_seconds": 1.0},
              {"started": 60.0}]
    parts, restarts = timeline.worker_parts([_row(2, 70.0, 5.0)], starts, 8.0)
    assert restarts == 2
    assert parts["restarts"] == pytest.approx((40 - 14) + (60 - 44))
    assert parts["phase2_training"] == 5.0 and parts["data_load"] == 6.0
    assert timeline.worker_parts([], [], 0.0) == ({}, 0)  # no worker ever started


def test_parts_below_zero_are_clamped_and_other_never_goes_negative():
    # A worker's clock behind the driver's makes the worker start negative.
    parts, _ = timeline.worker_parts([], [{"started": 99.0}], fit_start=100.0)
    assert parts["worker_start"] == 0.0
    tl = timeline.build(10.0, {"ray_start": -1.0, "phase2_training": 12.0})
    assert tl["seconds"]["ray_start"] == 0.0 and tl["seconds"]["other"] == 0.0
    assert tl["seconds"]["phase2_training"] == 12.0
    sweep = timeline.build(30.0, {"phase1": 10.0, "trials": 15.0}, parts=timeline.SWEEP_PARTS)
    assert list(sweep["seconds"]) == list(timeline.SWEEP_PARTS)
    assert sweep["seconds"]["other"] == 5.0


def test_the_summary_line_puts_the_largest_part_first_and_leaves_out_the_small_ones():
    tl = timeline.build(131.2, {"phase2_training": 50.0, "checkpoints": 9.0, "ray_start": 12.4,
                                "validation": 4.0, "data_load": 4.0, "shutdown": 0.4,
                                "restarts": 30.0}, restarts=2)
    assert timeline.line(tl) == (
        "wall 131 s: 50 s phase 2 training, 30 s lost to 2 restarts, 21 s other, "
        "12 s Ray start, 9.0 s blocked on checkpoints, 4.0 s data load, 4.0 s validation")
    one = timeline.build(3.0, {"restarts": 1.0}, restarts=1)
    assert timeline.line(one) == "wall 3 s: 2.0 s other, 1.0 s lost to 1 restart"
    assert timeline.line(timeline.build(0.3, {})) == "wall 0 s"
