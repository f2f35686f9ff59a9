"""Run and experiment folders in storage: their file names, reading and writing them, and the
checks that keep a new run from clobbering an old one. No Ray, no torch (checkpoint.py
names the checkpoint folders and decides which runs may go on from which).

    python -c "from cifar_ray import runs; print(runs.read_metrics('results/smoke'))"

A run folder <storage>/<name>/ (`cifar-ray train`; also each sweep trial and a sweep's phase 1):
  config.json                    the resolved config, written before the first epoch
  metrics.jsonl                  one line per epoch (ours: Ray's Result keeps only the last)
  checkpoint-p<phase>-e<epoch>/  Ray-managed: the best --keep-checkpoints by val accuracy and
                                 the latest (-s<step> on the end: taken mid-epoch, on a
                                 preemption notice)
  backbone-<sha256>.pt           the frozen backbone phase-1 checkpoints refer to (they hold
                                 the head only; checkpoint.frozen_backbone)
  worker_starts.json             rank 0's record of each worker-group start (below)
  result.json                    written last: the run is finished
  timeline.json                  a sweep trial's timeline (it has no result.json), if it ran
                                 to its end (a trial the scheduler stops has none)
An experiment folder <storage>/<name>/ (`cifar-ray tune`): Tune's experiment_state-*.json,
phase1/ (a run folder), trials/trial-<id>/ (a run folder each) and best.json, written last.
result.json and best.json name the same things with the same keys (`evaluated` below).

Where the time went (timeline.py builds result.json's `timeline` from these). Seconds; on
the slowest rank where every rank does the work, else on rank 0; Unix times on rank 0's clock:
  metrics.jsonl rows   train_seconds          the epoch's training in this worker-group start
                                              (`seconds`, the epoch's time as a person reads
                                              it, adds feature caching and, after a resume
                                              from a mid-epoch checkpoint, the part before it)
                       feature_cache_seconds  phase 1's backbone pass, in the first epoch after
                                              each (re)start of phase 1; else 0
                       eval_seconds           the epoch's validation
                       checkpoint_seconds     the time the training loop was blocked by the
                                              reports since the previous row of the same
                                              worker-group start: the previous epoch's (copying
                                              the state, waiting for the upload before it,
                                              ray.train.report; with --checkpoint-upload sync
                                              also the upload, metrics.jsonl, TensorBoard and
                                              MLflow) and any mid-epoch one; 0 in
                                              a start's first row (a start's last report is in
                                              worker_starts.json)
                       finished_at            when the epoch ended, before its report
                       workers                the world size it trained at (an elastic
                                              run's changes as nodes go and come)
  worker_starts.json   a list, one entry per worker-group start, oldest first: started (its
                       loop's start), data_load_seconds (this rank's data onto the device),
                       model_setup_seconds (the model, its weights and the checkpoint it
                       resumes from); at a clean end also final_report_seconds (the last
                       report, and the wait for its upload) and ended
  result.json          wall_seconds (from the job's start to Ray's shutdown) and timeline:
                       {"wall_seconds", "seconds": {part: s} in the order they happen,
                       adding up to the wall, "restarts": how many}; best.json the same for
                       the sweep as a whole (timeline.SWEEP_PARTS)
"""

from __future__ import annotations

import json
import logging

from cifar_ray import checkpoint, storage
from cifar_ray.config import SweepConfig, TrainConfig
from cifar_ray.errors import UserError

log = logging.getLogger(__name__)

CONFIG, METRICS, RESULT = "config.json", "metrics.jsonl", "result.json"
WORKER_STARTS, TIMELINE = "worker_starts.json", "timeline.json"
PHASE1, TRIALS, BEST = "phase1", "trials", "best.json"


class RunExistsError(UserError, RuntimeError):
    """The run name holds a finished run (or a different config) and would be overwritten."""


class ExperimentExistsError(UserError, RuntimeError):
    """The experiment name is taken (and --resume was not given), or is missing on --resume."""


# ---------------------------------------------------------------- files


def write_json(uri: str, obj: dict) -> None:
    storage.write_bytes(uri, json.dumps(obj, indent=2).encode())


def read_json(uri: str) -> dict | None:
    """A JSON file's contents, or None when it does not exist (yet)."""
    return json.loads(storage.read_bytes(uri)) if storage.exists(uri) else None


def write_config(cfg: TrainConfig) -> None:
    write_json(storage.join(cfg.run_uri(), CONFIG), cfg.to_dict())


def read_config(run_uri: str) -> TrainConfig | None:
    d = read_json(storage.join(run_uri, CONFIG))
    return TrainConfig.from_dict(d) if d is not None else None


def write_metrics(run_uri: str, history: list[dict]) -> None:
    """The whole history each time: one PUT, no append (object stores have none)."""
    storage.write_bytes(storage.join(run_uri, METRICS),
                        "".join(json.dumps(row) + "\n" for row in history).encode())


def read_metrics(run_uri: str) -> list[dict]:
    """The per-epoch rows of a run (empty before its first epoch)."""
    uri = storage.join(run_uri, METRICS)
    if not storage.exists(uri):
        return []
    return [json.loads(line) for line in storage.read_bytes(uri).decode().splitlines()]


def read_worker_starts(run_uri: str) -> list[dict]:
    """The run's worker-group starts so far (empty before the first)."""
    return read_json(storage.join(run_uri, WORKER_STARTS)) or []


def write_worker_starts(run_uri: str, starts: list[dict]) -> None:
    write_json(storage.join(run_uri, WORKER_STARTS), starts)


def read_runs(folder: str) -> dict[str, tuple[TrainConfig | None, list[dict]]]:
    """Every run under a folder (a sweep's trials): its config (None if not written yet) and
    its per-epoch rows."""
    runs = {}
    for name in storage.list_dir(folder):
        run = storage.join(folder, name)
        runs[name] = (read_config(run), read_metrics(run))
    return runs


# ---------------------------------------------------------------- choices made from the files


def evaluation_split(manifest: dict) -> str:
    """What a finished run is scored on: the test split, else (a dataset without one) val."""
    if "test" in manifest["splits"]:
        return "test"
    log.info("the dataset has no test split: scoring the best checkpoint on val")
    return "val"


def best_epoch(rows: list[dict], phase: int | None = None) -> dict | None:
    """The row with the highest val accuracy (the earliest on a tie), of one phase if given."""
    rows = [r for r in rows if phase is None or r["phase"] == phase]
    return max(rows, key=lambda r: r["val_acc"]) if rows else None


def best_checkpoint(run_uri: str, rows: list[dict], phase: int | None = None
                    ) -> tuple[dict, str] | None:
    """(row, checkpoint URI) of the best epoch whose checkpoint Ray kept: it keeps the best
    --keep-checkpoints by val accuracy, and on a tie may have kept another epoch than ours."""
    kept = set(storage.list_dir(run_uri))
    row = best_epoch([r for r in rows if checkpoint.dir_name(r["phase"], r["epoch"]) in kept],
                     phase)
    if row is None:
        return None
    return row, storage.join(run_uri, checkpoint.dir_name(row["phase"], row["epoch"]))


def evaluated(row: dict, checkpoint_uri: str, ev: dict) -> dict:
    """The keys result.json and best.json share: the best epoch and its checkpoint's score."""
    return {"best_checkpoint": storage.display(checkpoint_uri), "best_val_acc": row["val_acc"],
            "best_phase": row["phase"], "best_epoch": row["epoch"],
            "evaluated_split": ev["split"], "evaluated_acc": ev["accuracy"],
            "evaluated_loss": ev["loss"], "evaluated_images": ev["count"]}


def describe(summary: dict) -> str:
    """One line for the log, from result.json's or best.json's shared keys."""
    return (f"best checkpoint {summary['best_checkpoint']} (phase {summary['best_phase']} "
            f"epoch {summary['best_epoch'] + 1}, val acc {summary['best_val_acc']:.4f}): "
            f"{summary['evaluated_split']} accuracy {summary['evaluated_acc']:.4f} on "
            f"{summary['evaluated_images']} images")


# ---------------------------------------------------------------- before writing


def check_run(cfg: TrainConfig) -> None:
    """Refuse to clobber a finished run; refuse to resume a run with a different recipe. A
    finished smoke run is replaced by the next smoke run of the same name, and so is any
    finished run with --overwrite."""
    run_uri = cfg.run_uri()
    if storage.exists(storage.join(run_uri, RESULT)):
        stored = read_config(run_uri)
        if cfg.smoke and stored is not None and stored.smoke:
            log.info(f"replacing the previous smoke run at {storage.display(run_uri)}")
        elif cfg.overwrite:
            log.info(f"--overwrite: deleting the finished run at {storage.display(run_uri)}")
        else:
            raise RunExistsError(
                f"{storage.display(run_uri)} holds a finished run (result.json); refusing to "
                "overwrite it. Choose another --name, or pass --overwrite to replace it.")
        storage.delete_dir(run_uri)
        return
    old = read_json(storage.join(run_uri, CONFIG))
    if old is not None:
        diff = checkpoint.mismatches(old, cfg, "resume")
        if diff:
            raise RunExistsError(
                f"{storage.display(run_uri)} holds an unfinished run with a different "
                f"configuration ({', '.join(diff)} differ); resume it with the same settings "
                "or choose another --name")
        log.info(f"resuming unfinished run {storage.display(run_uri)} from its latest checkpoint")


def _smoke_experiment(exp: str) -> bool:
    """Whether the runs of an experiment (its phase 1, else its trials) were smoke runs."""
    cfg = read_config(storage.join(exp, PHASE1))
    if cfg is None:
        cfg = next((c for c, _ in read_runs(storage.join(exp, TRIALS)).values() if c), None)
    return cfg is not None and cfg.smoke


def check_experiment(cfg: SweepConfig) -> bool:
    """True when resuming. A taken name without --resume, or --resume of nothing, is refused;
    a previous smoke sweep of the same name is replaced by the next smoke sweep."""
    exp = cfg.train.run_uri()
    exists = storage.exists(exp) and any(
        n.startswith("experiment_state") or n == PHASE1 for n in storage.list_dir(exp))
    if cfg.resume and not exists:
        raise ExperimentExistsError(f"--resume: no experiment at {storage.display(exp)}")
    if exists and not cfg.resume:
        if not (cfg.train.smoke and _smoke_experiment(exp)):
            raise ExperimentExistsError(
                f"{storage.display(exp)} already holds an experiment; pass --resume to continue "
                "it or choose another --name")
        log.info(f"replacing the previous smoke sweep at {storage.display(exp)}")
        storage.delete_dir(exp)
        return False
    return exists
