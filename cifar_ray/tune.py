"""Ray Tune glue: sweep the phase-2 learning rate; phase 1 once; one TorchTrainer per trial.

    python jobs/tune.py --smoke
    python jobs/tune.py --data s3://bucket/datasets --storage s3://bucket/sweeps \
        --name lr-sweep --lrs 3e-5 1e-4 3e-4 1e-3 --workers 2 --use-gpu
    python jobs/tune.py ... --name lr-sweep --resume        # after the driver died

Phase 1 does not depend on the swept LR, so it runs once (<exp>/phase1/) and every trial's
phase 2 starts from its last checkpoint. Each trial is a Tune function that builds and fits
its own TorchTrainer (the Ray 2.60 pattern) named after the trial id, so a restored
experiment resumes every interrupted trial from its own latest checkpoint. The experiment
folder's layout is runs.py's.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from cifar_ray import checkpoint, cluster, ray_internals, runs, storage, timeline, train
from cifar_ray.config import DEFAULT_LRS, SweepConfig, TrainConfig

log = logging.getLogger(__name__)


class ASHA(ASHAScheduler):
    """Tune's ASHA, plus: the rungs a trial already passed are checked again at each result.

    ASHA decides at a rung with whatever has arrived there, so the first trials to reach it
    pass on a (nearly) empty rung, however weak, and may then run to the end. Here a trial
    that passed a rung early is stopped at its next result once later arrivals put it below
    that rung's cutoff: the cut synchronous successive halving would have made, still
    without holding any trial back to wait for others. And a trial's last epoch (max_t)
    is not stopped, as Tune's ASHA does: nothing is left to stop, and a stop kills the
    trial while it writes its last files and its timeline.json; it ends on its own.
    """

    def __init__(self, *, time_attr: str, max_t: int, **kwargs):
        super().__init__(time_attr=time_attr, max_t=max_t, **kwargs)
        self.time_key, self.last = time_attr, max_t

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if result.get(self.time_key, 0) >= self.last:
            return TrialScheduler.CONTINUE  # on_trial_complete records it at its rungs
        passed = ray_internals.asha_rungs_with(self, trial.trial_id)
        action = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.CONTINUE:
            for recorded in passed:
                if recorded[trial.trial_id] < ray_internals.asha_cutoff(self, trial.trial_id,
                                                                        recorded):
                    ray_internals.asha_count_stop(self)
                    return TrialScheduler.STOP
        return action


class EpochReports(TuneReportCallback):
    """Forwards a trial's epoch reports to Tune (one training_iteration each, as ASHA counts
    them), not a mid-epoch checkpoint's on a preemption notice."""

    def after_report(self, run_context, metrics, checkpoint):
        if "step" not in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


def search_space(cfg: SweepConfig) -> tuple[dict, int]:
    """Tune's param_space and num_samples: an LR grid, or log-uniform samples of a range."""
    if cfg.lr_range is not None:
        space, samples = {"lr": tune.loguniform(*cfg.lr_range)}, cfg.samples
    else:
        space, samples = {"lr": tune.grid_search(list(cfg.lrs or DEFAULT_LRS))}, 1
    if cfg.weight_decays is not None:
        space["weight_decay"] = tune.grid_search(list(cfg.weight_decays))
    return space, samples


def phase1_config(cfg: SweepConfig) -> TrainConfig:
    """The shared phase-1 run: the sweep's own recipe with no phase 2."""
    t = cfg.train
    return dataclasses.replace(t, name=runs.PHASE1, storage=t.run_uri(), overwrite=False,
                               phase2=dataclasses.replace(t.phase2, epochs=0, warmup_epochs=0))


def phase1_checkpoint(cfg: SweepConfig) -> str:
    """Phase 1's last epoch: Ray keeps the latest checkpoint whatever its score."""
    return storage.join(phase1_config(cfg).run_uri(),
                        checkpoint.dir_name(1, cfg.train.phase1.epochs - 1))


def trial_config(base: TrainConfig, params: dict, trial_id: str, init: str) -> TrainConfig:
    phase2 = dataclasses.replace(base.phase2, lr=float(params["lr"]),
                                 weight_decay=float(params.get("weight_decay",
                                                               base.phase2.weight_decay)))
    return dataclasses.replace(base, name=f"trial-{trial_id}",
                               storage=storage.join(base.run_uri(), runs.TRIALS), phase2=phase2,
                               init_checkpoint=init, overwrite=False)


def run_trial(params: dict) -> None:
    """One trial (runs in a Tune actor): its own TorchTrainer, metrics forwarded to Tune."""
    clock = timeline.Clock()
    base = TrainConfig.from_dict(params["base"])
    cfg = trial_config(base, params, tune.get_context().get_trial_id(), params["init"])
    with storage.retries(cfg.storage_retry_s):
        rows = runs.read_metrics(cfg.run_uri())
        if rows and (rows[-1]["phase"], rows[-1]["epoch"]) == (2, cfg.phase2.epochs - 1):
            # Trained to its end before the driver died, but not yet recorded as finished in
            # Tune's experiment state: its last row again, so that Tune (which wants a result
            # with the metric from every trial) records it, and nothing is trained twice.
            log.info(f"{cfg.name}: already trained to its last epoch")
            tune.report(rows[-1])
            return
        runs.write_config(cfg)
        earlier = len(runs.read_worker_starts(cfg.run_uri()))  # an interrupted sweep's
        fit_start = time.time()
        train.fit_trainer(cfg, callbacks=[EpochReports()])
        clock.lap("fit")  # a trial the scheduler stops early is killed before this: no timeline
        clock.add(*timeline.worker_parts(runs.read_metrics(cfg.run_uri()),
                                         runs.read_worker_starts(cfg.run_uri())[earlier:],
                                         fit_start))
        tl = clock.timeline()
        runs.write_json(storage.join(cfg.run_uri(), runs.TIMELINE), tl)
    log.info(f"{cfg.name}: {timeline.line(tl)}")


def concurrency(cfg: SweepConfig) -> int:
    """Trials that fit on the cluster at once, from its CPUs (and GPUs, fractions included:
    --gpus-per-worker 0.25 puts 4 one-worker trials on each GPU, CPUs permitting)."""
    if cfg.max_concurrent_trials:
        return cfg.max_concurrent_trials
    return max(1, cluster.fits(ray.cluster_resources(), cluster.needed_resources(cfg.train)))


def run_phase1(cfg: SweepConfig, manifest: dict) -> dict | None:
    """Phase 1 once per sweep (skipped when an earlier driver finished it, or not shared)."""
    if not cfg.share_phase1:
        log.info(f"phase 1: not shared, {cfg.train.phase1.epochs} epochs in every trial")
        return None
    p1 = phase1_config(cfg)
    done = runs.read_json(storage.join(p1.run_uri(), runs.RESULT))
    if done is not None:
        log.info(f"phase 1: already done at {storage.display(p1.run_uri())}")
        return done
    log.info(f"phase 1: {p1.phase1.epochs} epochs, once for the whole sweep")
    clock = timeline.Clock()  # within the sweep's Ray session: no start or shutdown of its own
    return train.write_result(p1, train.run_and_evaluate(p1, manifest, clock), clock)


def sweep(cfg: SweepConfig) -> dict:
    """Run (or resume) the sweep end to end; returns best.json's contents."""
    clock = timeline.Clock()  # the sweep's wall: from here to Ray's shutdown
    cfg = cfg.with_smoke()
    t, manifest = train.preflight(cfg.train)
    t = dataclasses.replace(t, mlflow_experiment=t.name)  # phase 1 and the trials, in MLflow
    cfg = dataclasses.replace(cfg, train=t)
    phase1_config(cfg)  # derived configs validate here, before Ray starts
    with storage.retries(t.storage_retry_s):
        resuming = runs.check_experiment(cfg)
        clock.lap("preflight")
        # One trial's workers must fit: "more than the cluster can ever hold" fails here.
        with cluster.session(t):
            clock.lap("ray_start")
            best = _sweep(cfg, manifest, resuming, clock)
        clock.lap("shutdown")
        tl = clock.timeline(timeline.SWEEP_PARTS)
        best.update(wall_seconds=round(clock.wall(), 1), timeline=tl)
        best_uri = storage.join(t.run_uri(), runs.BEST)
        runs.write_json(best_uri, best)
    train.record_result(runs.read_config(storage.join(t.run_uri(), runs.TRIALS, best["trial"])),
                        best)
    log.info(f"best trial {best['trial']}: lr {best['lr']:.3g}; {runs.describe(best)} "
             f"({storage.display(best_uri)})")
    log.info(timeline.line(tl))
    return best


def _sweep(cfg: SweepConfig, manifest: dict, resuming: bool, clock: timeline.Clock) -> dict:
    """Phase 1, the trials and the best trial's score: best.json's contents but the wall and
    its timeline."""
    t = cfg.train
    p1 = run_phase1(cfg, manifest)
    clock.lap("phase1")
    space, samples = search_space(cfg)
    n_trials = samples * math.prod(len(v["grid_search"]) for v in space.values()
                                   if isinstance(v, dict) and "grid_search" in v)
    saved = t.phase1.epochs * (n_trials - 1) if cfg.share_phase1 else 0
    if cfg.share_phase1:
        log.info(f"phase 1 shared by {n_trials} trials: {saved} phase-1 epochs not run")
    # Trials report every epoch they run; unshared, phase 1's come first and count too.
    offset = 0 if cfg.share_phase1 else t.phase1.epochs
    # A trial only drives its TorchTrainer, whose workers reserve the CPUs/GPUs. Tune refuses
    # an empty request, so the driver asks for a token 1 MiB of memory and no CPU.
    trainable = tune.with_resources(run_trial, {"cpu": 0, "memory": 2**20})
    storage_path, storage_fs = storage.for_ray(t.storage, t.storage_retry_s)
    exp = t.run_uri()
    exp_path = storage.for_ray(exp)[0]
    if resuming and tune.Tuner.can_restore(exp_path, storage_filesystem=storage_fs):
        log.info(f"resuming experiment {storage.display(exp)}")
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=True, storage_filesystem=storage_fs)
    else:
        scheduler = (ASHA(time_attr="training_iteration", max_t=offset + t.phase2.epochs,
                          grace_period=offset + cfg.grace_period,
                          reduction_factor=cfg.reduction_factor)
                     if cfg.scheduler == "asha" else FIFOScheduler())
        tuner = tune.Tuner(
            trainable,
            param_space={**space, "base": t.to_dict(),
                         "init": phase1_checkpoint(cfg) if cfg.share_phase1 else None},
            tune_config=tune.TuneConfig(metric="val_acc", mode="max", scheduler=scheduler,
                                        num_samples=samples,
                                        max_concurrent_trials=concurrency(cfg)),
            run_config=tune.RunConfig(name=t.name, storage_path=storage_path,
                                      storage_filesystem=storage_fs))
    grid = tuner.fit()
    clock.lap("trials")
    best = best_trial(cfg, manifest, grid.num_errors)
    best.update({"phase1": {"epochs": t.phase1.epochs, "shared": cfg.share_phase1,
                            "val_acc": p1["best_val_acc"] if p1 else None},
                 "trials": n_trials, "phase1_epochs_saved": saved,
                 "scheduler": cfg.scheduler})
    clock.lap("final_evaluation")
    return best


def best_trial(cfg: SweepConfig, manifest: dict, errors: int) -> dict:
    """The trial with the best phase-2 val accuracy; its best checkpoint scored once."""
    trials = storage.join(cfg.train.run_uri(), runs.TRIALS)
    best = None
    for tc, rows in runs.read_runs(trials).values():
        row = runs.best_epoch(rows, phase=2)
        if tc is not None and row is not None and (best is None
                                                   or row["val_acc"] > best[2]["val_acc"]):
            best = (tc, rows, row)
    if best is None:
        raise RuntimeError(f"{storage.display(trials)}: no trial reported a phase-2 epoch; "
                           f"see the trial errors above ({errors} errored)")
    tc, rows, _ = best
    return {"trial": tc.name, "run": storage.display(tc.run_uri()), "lr": tc.phase2.lr,
            "weight_decay": tc.phase2.weight_decay,
            **train.score_best(tc.run_uri(), tc, manifest, rows, phase=2)}
