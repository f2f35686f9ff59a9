"""Ray Tune glue: sweep the phase-2 learning rate; phase 1 once; one TorchTrainer per trial.

    python jobs/tune.py --smoke
    python jobs/tune.py --data s3://bucket/datasets --storage s3://bucket/sweeps \
        --name lr-sweep --lrs 3e-5 1e-4 3e-4 1e-3 --workers 2 --use-gpu
    python jobs/tune.py ... --name lr-sweep --resume        # after the driver died

Phase 1 does not depend on the swept LR, so it runs once (<exp>/phase1/) and every trial's
phase 2 starts from its last checkpoint. Each trial is a Tune function that builds and fits
its own TorchTrainer (the Ray 2.60 pattern) named after the trial id, so a restored
experiment resumes every interrupted trial from its own latest checkpoint. Experiment
folder <storage>/<name>/: Tune's state, phase1/, trials/trial-<id>/ (a train run each:
config.json, metrics.jsonl, checkpoints) and best.json, written last.
"""

from __future__ import annotations

import dataclasses
import json
import math

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from cifar_ray import data, storage, train
from cifar_ray.config import DEFAULT_LRS, SweepConfig, TrainConfig, UserError

PHASE1, TRIALS, BEST = "phase1", "trials", "best.json"


class ExperimentExistsError(UserError, RuntimeError):
    """The experiment name is taken (and --resume was not given), or is missing on --resume."""


class ASHA(ASHAScheduler):
    """Tune's ASHA, plus: the rungs a trial already passed are checked again at each result.

    ASHA decides at a rung with whatever has arrived there, so the first trials to reach it
    pass on a (nearly) empty rung, however weak, and may then run to the end. Here a trial
    that passed a rung early is stopped at its next result once later arrivals put it below
    that rung's cutoff: the cut synchronous successive halving would have made, still
    without holding any trial back to wait for others.
    """

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        bracket = self._trial_info.get(trial.trial_id)
        passed = [r for _, r in bracket._rungs if trial.trial_id in r] if bracket else []
        action = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.CONTINUE:
            for recorded in passed:
                if recorded[trial.trial_id] < bracket.cutoff(recorded):
                    self._num_stopped += 1
                    return TrialScheduler.STOP
        return action


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
    return dataclasses.replace(t, name=PHASE1, storage=t.run_uri(), overwrite=False,
                               phase2=dataclasses.replace(t.phase2, epochs=0, warmup_epochs=0))


def phase1_checkpoint(cfg: SweepConfig) -> str:
    """Phase 1's last epoch: Ray keeps the latest checkpoint whatever its score."""
    return storage.join(phase1_config(cfg).run_uri(),
                        f"checkpoint-p1-e{cfg.train.phase1.epochs - 1:03d}")


def trial_config(base: TrainConfig, params: dict, trial_id: str, init: str) -> TrainConfig:
    phase2 = dataclasses.replace(base.phase2, lr=float(params["lr"]),
                                 weight_decay=float(params.get("weight_decay",
                                                               base.phase2.weight_decay)))
    return dataclasses.replace(base, name=f"trial-{trial_id}",
                               storage=storage.join(base.run_uri(), TRIALS), phase2=phase2,
                               init_checkpoint=init, overwrite=False)


def run_trial(params: dict) -> None:
    """One trial (runs in a Tune actor): its own TorchTrainer, metrics forwarded to Tune."""
    base = TrainConfig.from_dict(params["base"])
    cfg = trial_config(base, params, tune.get_context().get_trial_id(), params["init"])
    train.write_config(cfg)
    train.build_trainer(cfg, callbacks=[TuneReportCallback()]).fit()


def concurrency(cfg: SweepConfig) -> int:
    """Trials that fit on the cluster at once, from its CPUs (and GPUs)."""
    if cfg.max_concurrent_trials:
        return cfg.max_concurrent_trials
    have = ray.cluster_resources()
    need = train.needed_resources(cfg.train)
    return max(1, min(int(have.get(k, 0) // v) for k, v in need.items()))


def check_experiment(cfg: SweepConfig) -> bool:
    """True when resuming. A taken name without --resume, or --resume of nothing, is refused."""
    exp = cfg.train.run_uri()
    exists = storage.exists(exp) and any(
        n.startswith("experiment_state") or n == PHASE1 for n in storage.list_dir(exp))
    if exists and not cfg.resume:
        raise ExperimentExistsError(
            f"{storage.display(exp)} already holds an experiment; pass --resume to continue it "
            "or choose another --name")
    if cfg.resume and not exists:
        raise ExperimentExistsError(f"--resume: no experiment at {storage.display(exp)}")
    return exists


def run_phase1(cfg: SweepConfig, manifest: dict, log=print) -> dict | None:
    """Phase 1 once per sweep (skipped when an earlier driver finished it, or not shared)."""
    if not cfg.share_phase1:
        log(f"phase 1: not shared, {cfg.train.phase1.epochs} epochs in every trial")
        return None
    p1 = phase1_config(cfg)
    result_uri = storage.join(p1.run_uri(), train.RESULT)
    if storage.exists(result_uri):
        log(f"phase 1: already done at {storage.display(p1.run_uri())}")
        return json.loads(storage.read_bytes(result_uri))
    log(f"phase 1: {p1.phase1.epochs} epochs, once for the whole sweep")
    return train.run_and_evaluate(p1, manifest, log)


def sweep(cfg: SweepConfig, log=print) -> dict:
    """Run (or resume) the sweep end to end; returns best.json's contents."""
    cfg = cfg.with_smoke()
    if cfg.train.smoke:
        train.ensure_smoke_data(cfg.train, log)
    t = dataclasses.replace(cfg.train, data=storage.normalize(cfg.train.data),
                            storage=storage.normalize(cfg.train.storage))
    cfg = dataclasses.replace(cfg, train=t)
    manifest = data.read_manifest(t.dataset_uri())
    phase1_config(cfg)  # derived configs validate here, before Ray starts
    storage.check_writable(t.storage)
    resuming = check_experiment(cfg)
    started_here = train.init_ray(log)
    try:
        # "More workers per trial than the cluster can ever hold" fails here, not in a trial.
        train.wait_for_resources(t, t.resource_timeout_s, log)
        return _sweep(cfg, manifest, resuming, log)
    finally:
        if started_here:
            ray.shutdown()


def _sweep(cfg: SweepConfig, manifest: dict, resuming: bool, log) -> dict:
    t = cfg.train
    exp = t.run_uri()
    p1 = run_phase1(cfg, manifest, log)
    space, samples = search_space(cfg)
    n_trials = samples * math.prod(len(v["grid_search"]) for v in space.values()
                                   if isinstance(v, dict) and "grid_search" in v)
    saved = t.phase1.epochs * (n_trials - 1) if cfg.share_phase1 else 0
    if cfg.share_phase1:
        log(f"phase 1 shared by {n_trials} trials: {saved} phase-1 epochs not run")
    # Trials report every epoch they run; unshared, phase 1's come first and count too.
    offset = 0 if cfg.share_phase1 else t.phase1.epochs
    # A trial only drives its TorchTrainer, whose workers reserve the CPUs/GPUs. Tune refuses
    # an empty request, so the driver asks for a token 1 MiB of memory and no CPU.
    trainable = tune.with_resources(run_trial, {"cpu": 0, "memory": 2**20})
    storage_path, storage_fs = storage.for_ray(t.storage)
    exp_path = storage.for_ray(exp)[0]
    if resuming and tune.Tuner.can_restore(exp_path, storage_filesystem=storage_fs):
        log(f"resuming experiment {storage.display(exp)}")
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
    best = _best(cfg, grid, log)
    best.update({"phase1": {"epochs": t.phase1.epochs, "shared": cfg.share_phase1,
                            "val_acc": p1["best_val_acc"] if p1 else None},
                 "trials": n_trials, "phase1_epochs_saved": saved,
                 "scheduler": cfg.scheduler})
    storage.write_bytes(storage.join(exp, BEST), json.dumps(best, indent=2).encode())
    log(f"best trial: lr {best['lr']:.3g}, val acc {best['best_val_acc']:.4f} at phase-2 "
        f"epoch {best['best_epoch'] + 1}; {best['evaluated_split']} accuracy "
        f"{best['test_acc']:.4f} ({storage.display(storage.join(exp, BEST))})")
    return best


def _best(cfg: SweepConfig, grid, log) -> dict:
    """The trial with the best phase-2 val accuracy; its best checkpoint evaluated once."""
    trials = storage.join(cfg.train.run_uri(), TRIALS)
    best = None
    for tc, rows in train.read_runs(trials).values():
        for r in rows:
            if r["phase"] == 2 and (best is None or r["val_acc"] > best[0]["val_acc"]):
                best = (r, tc)
    if best is None:
        raise RuntimeError(f"{storage.display(trials)}: no trial reported a phase-2 epoch; "
                           f"see the trial errors above ({grid.num_errors} errored)")
    row, tc = best
    ckpt = storage.join(tc.run_uri(), f"checkpoint-p2-e{row['epoch']:03d}")
    manifest = data.read_manifest(tc.dataset_uri())
    split = "test" if "test" in manifest["splits"] else "val"
    ev = train.evaluate_remote(ckpt, tc, split)
    return {"trial": tc.name, "lr": tc.phase2.lr, "weight_decay": tc.phase2.weight_decay,
            "best_val_acc": row["val_acc"], "best_epoch": row["epoch"],
            "checkpoint": storage.display(ckpt), "evaluated_split": split,
            "test_acc": ev["accuracy"], "test_loss": ev["loss"]}
