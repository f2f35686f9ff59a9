"""The sweep's ASHA scheduler, driven with Tune's own Trial objects (no Ray instance)."""

import pytest
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from cifar_ray.tune import ASHA

CONTINUE, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP


def _run(scheduler_cls, events):
    """Feed (trial, epoch, val_acc) results in order; return the decision for each."""
    sched = scheduler_cls(time_attr="training_iteration", metric="val_acc", mode="max",
                          max_t=8, grace_period=1, reduction_factor=4)
    trials = {}
    out = []
    for name, epoch, acc in events:
        if name not in trials:
            trials[name] = Trial("run_trial", trial_id=name, stub=True)
            sched.on_trial_add(None, trials[name])
        out.append(sched.on_trial_result(None, trials[name], {"training_iteration": epoch,
                                                              "val_acc": acc}))
    return out


# Trials a and b reach the first rung (epoch 1) before anyone else: a passes on an empty
# rung and b on a's score alone. c, d, e then fill the rung, all with better scores.
EARLY = [("a", 1, 0.10), ("b", 1, 0.20), ("c", 1, 0.30), ("d", 1, 0.40), ("e", 1, 0.50)]


def test_plain_asha_lets_the_first_arrivals_through():
    # Tune's own ASHA: a and b keep running although the filled rung ranks them last.
    assert _run(ASHAScheduler, EARLY + [("a", 2, 0.11), ("b", 2, 0.21)])[-2:] == [CONTINUE,
                                                                                 CONTINUE]


def test_asha_stops_early_passers_once_the_rung_fills():
    decisions = _run(ASHA, EARLY + [("a", 2, 0.11), ("b", 2, 0.21), ("e", 2, 0.55)])
    assert decisions[:5] == [CONTINUE] * 5  # each beat the rivals it found at the rung
    # The full rung's cutoff (its 75th percentile, reduction factor 4) is 0.40: a and b
    # stop at their next result; e, the best, goes on.
    assert decisions[5:] == [STOP, STOP, CONTINUE]


def test_asha_decides_a_fresh_arrival_as_tune_does():
    # At its own rung an arrival is judged against the rivals there, as in Tune's ASHA:
    # rivals 0.10 and 0.30 put the cutoff at 0.25.
    for acc, decision in ((0.24, STOP), (0.26, CONTINUE)):
        events = [("a", 1, 0.10), ("b", 1, 0.30), ("c", 1, acc)]
        assert _run(ASHA, events)[-1] == _run(ASHAScheduler, events)[-1] == decision


@pytest.mark.parametrize("acc", [0.45, 0.60])
def test_asha_keeps_a_trial_that_stays_above_every_cutoff(acc):
    decisions = _run(ASHA, EARLY + [("f", 1, acc), ("f", 2, acc), ("f", 3, acc)])
    assert decisions[-3:] == [CONTINUE] * 3


def test_asha_lets_a_trial_end_on_its_own_after_its_last_epoch():
    # Tune's ASHA stops every trial at max_t, killing it while it writes its last files
    # and timeline; ours lets it end: its last epoch (8) is done, nothing is left to stop.
    last = [("a", 1, 0.5), ("b", 1, 0.6), ("a", 8, 0.1)]
    assert _run(ASHAScheduler, last)[-1] == STOP
    assert _run(ASHA, last)[-1] == CONTINUE
