"""The two-phase schedule in one process, without Ray: phases, caching, resume."""

import copy
import dataclasses
import math

import pytest
import torch

from cifar_ray import data, recipe
from cifar_ray import model as M
from cifar_ray.config import PhaseConfig, TrainConfig
from cifar_ray.runtime import DeviceSplits, Runtime


@pytest.fixture(scope="module")
def tiny():
    return DeviceSplits.of(data.synthetic(192, 0), data.synthetic(64, 1))


def _cfg(**kw):
    base = TrainConfig(weights="none", workers=1,
                       phase1=PhaseConfig(epochs=2, lr=1e-3, batch_size=64),
                       phase2=PhaseConfig(epochs=1, lr=1e-4, batch_size=64, augment=True))
    return dataclasses.replace(base, **kw)


def _run(cfg, d, resume=None, notice=None, reported=None):
    states = []

    def report(met, st):
        if reported is not None:
            reported.append(met)
        # deepcopy: a state holds live tensors; train.py serialises it before training goes on.
        states.append(copy.deepcopy(st()))

    m = M.build("none", seed=cfg.seed)
    hist = recipe.PhaseLoop(cfg, m, d, Runtime(preempted=notice), report).run(resume)
    return m, hist, states


def test_two_phases_report_every_epoch(tiny, caplog):
    with caplog.at_level("INFO", logger="cifar_ray"):
        m, hist, states = _run(_cfg(), tiny)
    lines = [r.getMessage() for r in caplog.records]
    assert [(h["phase"], h["epoch"]) for h in hist] == [(1, 0), (1, 1), (2, 0)]
    assert [h["feature_cache"] for h in hist] == [True, True, False]
    assert all(0 <= h["val_acc"] <= 1 and h["images_per_s"] > 0 for h in hist)
    assert [(s["phase"], s["epoch"]) for s in states] == [(1, 0), (1, 1), (2, 0)]
    assert states[-1]["history"] == hist and states[-1]["config"] == _cfg().to_dict()
    assert sum("img/s" in line and "phase ETA" in line for line in lines) == 3
    # Where the time went (timeline.py): the backbone pass in phase 1's first epoch; each
    # row the time the previous report blocked the loop (none before the first).
    assert [h["feature_cache_seconds"] > 0 for h in hist] == [True, False, False]
    assert [h["checkpoint_seconds"] > 0 for h in hist] == [False, True, True]
    assert all(0 < h["train_seconds"] <= h["seconds"] and h["eval_seconds"] > 0 for h in hist)
    assert hist[0]["finished_at"] < hist[1]["finished_at"] < hist[2]["finished_at"]


def test_feature_cache_trains_the_same_head(tiny):
    """Cached and uncached phase 1 follow the same trajectory: same batches, same maths."""
    cfg = _cfg(phase2=PhaseConfig(epochs=0))
    heads = []
    for cache in (True, False):
        m, hist, _ = _run(dataclasses.replace(cfg, cache_features=cache), tiny)
        assert [h["feature_cache"] for h in hist] == [cache, cache]
        heads.append(m.head.state_dict())
    for k in heads[0]:
        assert torch.allclose(heads[0][k], heads[1][k], rtol=1e-3, atol=1e-5), k


def test_resume_continues_after_the_checkpointed_epoch(tiny):
    cfg = _cfg()
    _, full, states = _run(cfg, tiny)
    m, hist, new_states = _run(cfg, tiny, resume=states[1])  # after phase 1 epoch 1
    assert [(h["phase"], h["epoch"]) for h in hist] == [(1, 0), (1, 1), (2, 0)]
    assert hist[2]["restored_from"] == {"phase": 1, "epoch": 1}
    assert [(s["phase"], s["epoch"]) for s in new_states] == [(2, 0)]  # phase 1 not redone
    # Same seeds per (phase, epoch): the resumed epoch equals the uninterrupted one.
    assert hist[2]["train_loss"] == pytest.approx(full[2]["train_loss"], rel=1e-4)


def test_a_preemption_notice_checkpoints_mid_epoch_and_the_resume_carries_on_from_there(tiny):
    """3 steps an epoch, so the notice is asked after every step: the 8th time is phase 2's
    second step. Training goes on after that checkpoint; resumed from it, the run redoes
    nothing and ends with the weights of the run that was never interrupted: the same
    batches, crops and flips."""
    cfg = _cfg(phase2=PhaseConfig(epochs=2, lr=1e-4, batch_size=64, augment=True))
    plain_model, plain, _ = _run(cfg, tiny)
    asked, reported = [], []

    def notice():
        asked.append(1)
        return len(asked) == 8

    _, noticed, states = _run(cfg, tiny, notice=notice, reported=reported)
    assert len(asked) == 12  # 4 epochs of 3 steps
    jit = [s for s in states if "step" in s]
    assert [(s["phase"], s["epoch"], s["step"]) for s in jit] == [(2, 0, 2)]
    assert jit[0]["partial"]["count"] == 128 and len(jit[0]["history"]) == 2
    assert [m["step"] for m in reported if "step" in m] == [2]
    assert math.isnan([m for m in reported if "step" in m][0]["val_acc"])
    assert [h["train_loss"] for h in noticed] == [h["train_loss"] for h in plain]

    resumed_model, resumed, after = _run(cfg, tiny, resume=jit[0])
    assert [(h["phase"], h["epoch"]) for h in resumed] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert resumed[2]["restored_from"] == {"phase": 2, "epoch": 0, "step": 2}
    assert [(s["phase"], s["epoch"]) for s in after] == [(2, 0), (2, 1)]
    # The resumed epoch's metrics count the steps before the checkpoint too.
    assert resumed[2]["train_loss"] == pytest.approx(plain[2]["train_loss"], rel=1e-4)
    assert resumed[2]["train_acc"] == plain[2]["train_acc"]
    assert resumed[2]["lr_start"] == plain[2]["lr_start"]
    for k, v in plain_model.state_dict().items():
        assert torch.allclose(resumed_model.state_dict()[k].float(), v.float(), rtol=1e-4,
                              atol=1e-6), k


def test_preemption_polls_are_seconds_apart_and_at_least_four_an_epoch():
    assert recipe.poll_every(100, None) == 25  # the first epoch: its time is not known yet
    assert recipe.poll_every(100, 1000.0) == 1  # 10 s steps: every step
    assert recipe.poll_every(1000, 10.0) == 250  # 10 ms steps: capped at 4 an epoch
    assert recipe.poll_every(1000, 100.0) == 50  # 0.1 s steps: every 5 s
    assert recipe.poll_every(2, None) == 1


def test_progress_lines_inside_an_epoch_only_when_asked(tiny, caplog):
    cfg = _cfg(phase1=PhaseConfig(epochs=0),
               phase2=PhaseConfig(epochs=1, lr=1e-4, batch_size=64, augment=True))
    with caplog.at_level("INFO", logger="cifar_ray"):
        _run(dataclasses.replace(cfg, progress_s=1e-9), tiny)  # after every step
    lines = [r.getMessage() for r in caplog.records if "] step " in r.getMessage()]
    assert [line.split(" | ")[0] for line in lines] == [
        f"[phase 2 epoch 1/1] step {i}/3" for i in (1, 2, 3)]
    assert all(line.endswith(" s") and "img/s | epoch ETA" in line for line in lines)
    caplog.clear()
    with caplog.at_level("INFO", logger="cifar_ray"):
        _run(dataclasses.replace(cfg, progress_s=0), tiny)
    assert not [r for r in caplog.records if "] step " in r.getMessage()]


def test_batch_larger_than_the_data_is_named(tiny):
    with pytest.raises(ValueError, match="--phase1-batch-size 512"):
        _run(_cfg(phase1=PhaseConfig(epochs=1, batch_size=512)), tiny)


def test_each_epoch_records_the_lr_it_trained_with(tiny):
    # Phase 1: 3 steps per epoch, cosine from 1e-3 to 0 over its 6 steps, no warmup. Epoch 1
    # trains at steps 0-2, epoch 2 at steps 3-5, so the last epoch ends at a small non-zero
    # LR: the schedule reaches 0 only after the last step, at which no batch trains.
    _, hist, _ = _run(_cfg(), tiny)
    p1 = [h for h in hist if h["phase"] == 1]
    assert "lr" not in p1[0]
    assert p1[0]["lr_start"] == 1e-3 and p1[0]["lr_end"] == pytest.approx(0.75e-3)
    assert p1[1]["lr_start"] == pytest.approx(0.5e-3)
    assert p1[1]["lr_end"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 5 / 6)))
    assert all(0 < h["lr_end"] <= h["lr_start"] for h in hist)


def test_compiled_and_eager_phases_give_the_same_losses(tiny):
    """--compile: torch.compile of the module each phase trains (here phase 1's head on
    cached features, small enough to compile in seconds on CPU) follows eager's trajectory."""
    cfg = _cfg(phase2=PhaseConfig(epochs=0))
    eager = _run(cfg, tiny)[1]
    compiled = _run(dataclasses.replace(cfg, compile=True), tiny)[1]
    for e, c in zip(eager, compiled, strict=True):
        assert c["train_loss"] == pytest.approx(e["train_loss"], rel=1e-4)
        assert c["val_acc"] == pytest.approx(e["val_acc"], abs=1e-6)


def _resume_on_two_ranks(rank: int, port: int, cfg, jit: dict, out: str) -> None:
    """One of two gloo ranks on loopback (torch.multiprocessing.spawn): this rank's slice of
    the data, the loop resumed from `jit`; rank 0 saves the history to `out`."""
    import torch.distributed as dist

    torch.set_num_threads(1)  # as a Train worker does with --cpus-per-worker 1 (train.py)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    try:
        train, val = data.synthetic(192, 0), data.synthetic(64, 1)
        lo, hi = data.shard_range(len(train.labels), rank, 2, equal=True)
        vlo, vhi = data.shard_range(len(val.labels), rank, 2, equal=False)
        d = DeviceSplits.of(data.Split(train.images[lo:hi], train.labels[lo:hi]),
                            data.Split(val.images[vlo:vhi], val.labels[vlo:vhi]))
        rt = Runtime.for_device(torch.device("cpu"), rank, 2)
        hist = recipe.PhaseLoop(cfg, M.build("none", seed=cfg.seed), d, rt,
                                lambda met, st: None).run(jit)
        if rank == 0:
            torch.save(hist, out)
    finally:
        dist.destroy_process_group()


def test_a_mid_epoch_checkpoint_resumes_at_another_world_size(tiny, tmp_path):
    """An elastic run shrinks or grows at a restart, and a preemption notice's checkpoint
    may be the one it resumes from: taken on one worker at phase 2's second step, resumed on
    two (a real gloo group of two processes). Steps per epoch come from the global batch, so
    the epoch goes on from the same step at the same LR, and its row records the size it
    ran at."""
    from conftest import free_port

    cfg = _cfg(phase2=PhaseConfig(epochs=2, lr=1e-4, batch_size=64, augment=True))
    asked = []  # one worker's run, noticed at phase 2's second step (its history: `plain`)
    _, plain, states = _run(cfg, tiny, notice=lambda: asked.append(1) or len(asked) == 8)
    jit = next(s for s in states if "step" in s)
    out = tmp_path / "history.pt"
    torch.multiprocessing.spawn(_resume_on_two_ranks, args=(free_port(), cfg, jit, str(out)),
                                nprocs=2)
    resumed = torch.load(out)
    assert [(h["phase"], h["epoch"], h["workers"]) for h in resumed] == [
        (1, 0, 1), (1, 1, 1), (2, 0, 2), (2, 1, 2)]
    assert resumed[2]["restored_from"] == {"phase": 2, "epoch": 0, "step": 2}
    for a, b in zip(resumed[2:], plain[2:], strict=True):
        # The same 3 steps of 64 images an epoch at either size, on the same LR schedule.
        assert a["lr_start"] == pytest.approx(b["lr_start"])
        assert a["lr_end"] == pytest.approx(b["lr_end"])
    assert all(math.isfinite(h["train_loss"]) for h in resumed)
