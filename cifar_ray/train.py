"""Ray Train glue: the per-worker loop, the TorchTrainer, and a run from start to result.json.

    python jobs/train.py --smoke
    ray job submit --working-dir . -- python jobs/train.py --data s3://bucket/datasets \
        --storage s3://bucket/runs --name r50-a --workers 4 --use-gpu

The schedule itself is recipe.py (PhaseLoop), checkpoints checkpoint.py, the run folder's files
runs.py, the Ray session cluster.py.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
import os
import posixpath
import shutil
import sys
import tempfile
import threading
import time

import pyarrow.fs as pafs
import ray
import ray.train
import torch
from ray.train import CheckpointUploadMode
from ray.train.torch import TorchTrainer

from cifar_ray import (
    checkpoint,
    cluster,
    data,
    logs,
    ray_internals,
    rendezvous,
    runs,
    storage,
    timeline,
    tracking,
)
from cifar_ray.checkpoint import ResumePoint
from cifar_ray.config import PrepareConfig, TrainConfig, show_workers
from cifar_ray.errors import UserError
from cifar_ray.evaluate import evaluate_checkpoint
from cifar_ray.model import WeightsError, build
from cifar_ray.recipe import PhaseLoop
from cifar_ray.runtime import DeviceSplits, Runtime

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- on each worker


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker: load this rank's data, restore, train, report. Rank 0
    records this worker-group start in the run's worker_starts.json (for the timeline)."""
    started = time.time()
    cfg = TrainConfig.from_dict(config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    logs.setup_worker(rank, cfg.log_level)
    ray_internals.quiet_train_reports(cfg.ray_log_level)
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(cfg.cpus_per_worker)
    rt = dataclasses.replace(Runtime.for_device(device, rank, world),
                             preempted=preemption_notice())
    with storage.retries(cfg.storage_retry_s):
        t0 = time.perf_counter()
        splits, num_classes = storage.retrying(
            cfg.dataset_uri(), "reading the dataset",
            lambda: load_device_splits(cfg, rank, world, device))
        t1 = time.perf_counter()
        model = build(cfg.weights, cfg.weights_sha256, num_classes, cfg.seed).to(device)
        if rt.channels_last:
            model = model.to(memory_format=torch.channels_last)
        resume, source = checkpoint.resume_state(cfg)
        if resume is not None:
            log.info(f"starting from {source}: {ResumePoint.of(resume).describe()}")
        start = WorkerStart(cfg.run_uri(), rank, {
            "started": started, "data_load_seconds": t1 - t0,
            "model_setup_seconds": time.perf_counter() - t1})
        with Reporter(cfg, rank) as report:
            loop = PhaseLoop(cfg, model, splits, rt, report)
            loop.run(resume)
        if rank == 0:
            start.finished(final_report_seconds=loop.report_seconds
                           + report.final_wait_seconds)
            log.info(f"training done: {len(loop.history)} epochs recorded in "
                     f"{storage.display(cfg.run_uri())}")


class WorkerStart:
    """Rank 0's entry for this worker-group start in <run>/worker_starts.json: written once
    the data and model are ready, completed at a clean end (runs.py lists the fields). Rank
    0 of one group at a time writes it, so a read, an append and a write do."""

    def __init__(self, run_uri: str, rank: int, entry: dict):
        self.run_uri, self.entry, self.starts = run_uri, entry, None
        if rank == 0:
            self.starts = [*runs.read_worker_starts(run_uri), entry]
            runs.write_worker_starts(run_uri, self.starts)

    def finished(self, **seconds: float) -> None:
        self.entry.update(seconds, ended=time.time())
        runs.write_worker_starts(self.run_uri, self.starts)


def load_device_splits(cfg: TrainConfig, rank: int, world: int, device: torch.device
                       ) -> tuple[DeviceSplits, int]:
    """This rank's train and val slices on its device, and the number of classes."""
    uri = cfg.dataset_uri()
    manifest = data.read_manifest(uri)
    # Each rank reads only its slice; train slices are equal so ranks step in lockstep.
    tr = data.load_split(uri, "train", rank, world, equal=True, manifest=manifest)
    va = data.load_split(uri, "val", rank, world, manifest=manifest)
    return DeviceSplits.of(tr, va, device), len(manifest["classes"])


def preemption_notice():
    """Runtime.preempted for a Ray Train worker: asks Ray Train whether a node of this run is
    about to be preempted (a collective), True once per new notice; None where Train's
    preemption watcher is off (a private local instance, whose nodes no cloud reclaims)."""
    if os.environ.get(ray_internals.PREEMPTION_WATCHER_ENV, "1").lower() in ("0", "false"):
        return None
    seen = []

    def notice() -> bool:
        info = ray.train.get_preemption_info()
        if info is None or info in seen:
            return False
        seen.append(info)
        log.warning(f"node(s) {', '.join(info.preempted_node_ids)} to be preempted (ranks "
                    f"{info.preempted_ranks}): a checkpoint now, then on until Ray restarts")
        return True
    return notice


class Reporter:
    """The PhaseLoop's report callback on a Ray Train worker. Every rank reports (report is a
    barrier); rank 0 also stores the checkpoint (in phase 1: the head, referring to the
    frozen backbone, stored once), then our own metrics.jsonl (Result.metrics keeps only the
    last) and the epoch's TensorBoard and MLflow entries. A mid-epoch report (a preemption
    notice's; it has a "step") adds no metrics row.

    With --checkpoint-upload async (the default) the report only copies the state
    (checkpoint.snapshot) and hands it to Ray's upload thread (CheckpointUploadMode.ASYNC,
    one thread: one upload at a time), which serialises, uploads and writes the metrics row
    while the next epoch trains. The next report waits for that upload first, so at most one
    snapshot waits in memory. An upload that fails (storage down past --storage-retry-s)
    fails the worker as a synchronous one does: Ray raises it in the training thread, and
    the run restarts from its newest complete checkpoint."""

    def __init__(self, cfg: TrainConfig, rank: int):
        self.cfg, self.run_uri, self.rank = cfg, cfg.run_uri(), rank
        self.backbone: dict | None = None  # phase 1's frozen backbone: where, its sha256
        self.board = tracking.TensorBoard(self.run_uri) if rank == 0 else None
        self.flow = tracking.mlflow_run(cfg, params=True) if rank == 0 else None
        self.idle = threading.Event()  # set: no upload of ours in flight
        self.idle.set()
        self.final_wait_seconds = 0.0  # the wait for the last upload, at the end

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:  # training is done once its last checkpoint is stored
            t0 = time.perf_counter()
            self.idle.wait()
            self.final_wait_seconds = time.perf_counter() - t0
        if self.board is not None:
            self.board.close()
        if self.flow is not None and exc[0] is None:
            self.flow.end()

    def __call__(self, metrics: dict, checkpoint_state) -> None:
        self.idle.wait()  # the last upload first: one snapshot in memory at a time
        name = checkpoint.dir_name(metrics["phase"], metrics["epoch"], metrics.get("step", 0))
        ckpt = upload = None
        if self.rank == 0:
            state = checkpoint_state()
            if state["phase"] == 1 and self.backbone is not None:
                state = checkpoint.head_only(state, self.backbone)
            history = None if "step" in metrics else state["history"]
            # Filled and removed by `upload`; Ray's report wants the folder now.
            ckpt = ray.train.Checkpoint.from_directory(tempfile.mkdtemp(prefix="cifar-ckpt-"))
            upload = functools.partial(self.upload, checkpoint.snapshot(state), metrics,
                                       history)
            self.idle.clear()
        overlap = self.cfg.checkpoint_upload == "async" and "step" not in metrics
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name,
                         checkpoint_upload_fn=upload, delete_local_checkpoint_after_upload=False,
                         checkpoint_upload_mode=(CheckpointUploadMode.ASYNC if overlap
                                                 else CheckpointUploadMode.SYNC))

    def upload(self, state: dict, metrics: dict, history: list[dict] | None,
               ckpt: ray.train.Checkpoint, dir_name: str) -> ray.train.Checkpoint:
        """ray.train.report's upload, ours (Ray calls it in its upload thread, or in report
        itself when synchronous): write the snapshot into the checkpoint's folder and copy
        it to storage, retrying each object through outages of up to --storage-retry-s
        (Ray's own upload does not retry, ray-project/ray#47939) with the digest last, so
        Ray only registers a checkpoint whose every byte has arrived; then the metrics row.
        Ray may call it again after a failure, so each call starts from the snapshot."""
        try:
            with storage.retries(self.cfg.storage_retry_s):  # this thread's own window
                if state["phase"] == 1 and "model" in state:  # the first phase-1 checkpoint
                    self.backbone = self.backbone or checkpoint.frozen_backbone(
                        self.cfg, state["model"])
                    state = checkpoint.head_only(state, self.backbone)
                os.makedirs(ckpt.path, exist_ok=True)
                checkpoint.write_dir(state, ckpt.path)
                fs, run_folder = ray_internals.run_storage()
                dest = posixpath.join(run_folder, dir_name)
                checkpoint.upload_dir(ckpt.path, fs, dest,
                                      local=isinstance(fs, pafs.LocalFileSystem))
                if history is not None:  # after its checkpoint: a row implies its checkpoint
                    self.board.epoch(metrics)
                    if self.flow is not None:
                        self.flow.epoch(metrics)
                    # Last: once the row is there, this upload's work is all done.
                    runs.write_metrics(self.run_uri, history)
            return ray.train.Checkpoint(dest, fs)
        finally:
            shutil.rmtree(ckpt.path, ignore_errors=True)
            self.idle.set()


# ---------------------------------------------------------------- on the driver


def preflight(cfg: TrainConfig) -> tuple[TrainConfig, dict]:
    """Everything that can fail cheaply, before Ray starts: --compile's toolchain, the smoke
    data, the dataset and its splits, batch sizes against it, --weights there, storage
    writable. Returns the config with absolute local paths (Ray requires them) and the
    dataset's manifest."""
    if cfg.compile:
        check_compiler(cfg.use_gpu)
    if cfg.mlflow_tracking_uri:
        tracking.check_mlflow(cfg.mlflow_tracking_uri)
    if cfg.smoke:
        data.prepare(PrepareConfig(source="synthetic", data=cfg.data, dataset=cfg.dataset,
                                   val_size=400, synthetic_size=2000))
    # Progress lines inside an epoch by default only where someone watches this terminal.
    progress = cfg.progress_s if cfg.progress_s is not None else (
        30.0 if sys.stdout.isatty() else 0.0)
    cfg = dataclasses.replace(cfg, data=storage.normalize(cfg.data),
                              storage=storage.normalize(cfg.storage), progress_s=progress)
    manifest = data.read_manifest(cfg.dataset_uri())
    for split in ("train", "val"):
        if split not in manifest["splits"]:
            raise data.DataError(f"{storage.display(cfg.dataset_uri())}: no {split!r} split")
    n_train = manifest["splits"]["train"]["count"]
    for i in (1, 2):
        pc = cfg.phase(i)
        # Each of `size` workers gets an equal slice: one step takes the whole batch.
        sizes = range(cfg.fewest_workers(), cfg.workers + 1)
        if pc.epochs and any((n_train // k) * k < pc.batch_size for k in sizes):
            raise ValueError(f"--phase{i}-batch-size {pc.batch_size}: more than the "
                             f"{n_train} training images allow with --workers "
                             f"{show_workers(cfg)}")
    if cfg.weights not in ("imagenet", "none") and not storage.exists(cfg.weights):
        raise WeightsError(f"--weights {storage.display(cfg.weights)}: no such file "
                           "(a ResNet50 state_dict: path or s3:// URI)")
    storage.check_writable(cfg.storage)
    return cfg, manifest


def check_compiler(gpu: bool) -> None:
    """--compile needs what torch's inductor generates code with: triton for CUDA kernels, a
    C++ compiler for CPU ones. Checked here, on the driver, before any worker starts."""
    if gpu:
        if importlib.util.find_spec("triton") is None:
            raise ValueError("--compile: torch.compile on GPUs needs triton, which is not "
                             "installed here; install it (pip install triton) or drop --compile")
        return
    names = [os.environ.get("CXX"), "g++", "clang++", "c++"]
    if not any(n and shutil.which(n) for n in names):
        raise ValueError("--compile: torch.compile on CPU needs a C++ compiler (CXX, g++, "
                         "clang++ or c++ on PATH) and none was found; install one or drop "
                         "--compile")


# Ray Train's wait for a restarted worker group's placement (read from the environment only;
# TorchTrainer passes it on to its controller). A placement on a live cluster takes a moment.
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
MIN_START_TIMEOUT_S = 10.0
# How often Train's controller polls the workers, and so takes in their reports: a worker
# holds one report at a time, so the next one waits for this poll. Train's 2 s made every
# phase-1 epoch on a GPU (0.4 s of training) take 2 s; 0.5 s unless the user set it.
POLL_ENV, POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"


# An elastic run's placement of a group of the size Train decided on (see build_trainer).
ELASTIC_PLACEMENT_WAIT_S = 20.0
# On a cluster nothing can grow, a lost node comes back by hand or not at all: a restart
# waits this long at most (a node restarted by its owner rejoins in seconds).
FIXED_CLUSTER_RESTART_WAIT_S = 120.0


def restart_wait_s(cfg: TrainConfig, can_grow: bool = True) -> float:
    """How long a restart after a lost node waits for room: --resource-timeout-s where an
    autoscaler can bring a replacement (a cold node takes minutes), else at most
    FIXED_CLUSTER_RESTART_WAIT_S."""
    wait = cfg.resource_timeout_s if can_grow else min(cfg.resource_timeout_s,
                                                       FIXED_CLUSTER_RESTART_WAIT_S)
    return max(wait, MIN_START_TIMEOUT_S)


def build_trainer(cfg: TrainConfig, callbacks: list | None = None) -> TorchTrainer:
    storage_path, storage_fs = storage.for_ray(cfg.storage, cfg.storage_retry_s)
    # A restart after a lost node waits for room (restart_wait_s), and then the run stops
    # (fit_trainer says why). Train's own default is 60 s retried without limit
    # (controller_failure_limit -1), and an elastic run's wait has no limit at all: a run
    # whose node never came back waited forever, holding the rest of the cluster.
    wait = restart_wait_s(cfg, cluster.can_grow())
    retries = 0
    if cfg.elastic():
        # Train sizes an elastic group from a view of the nodes refreshed every 20 s, so a
        # restart right after a node is lost may still ask for the old size: its placement
        # gives up after ELASTIC_PLACEMENT_WAIT_S and Train decides again (retries without
        # limit), on the survivors or on nodes that came meanwhile. The whole time without
        # a running group is bounded by `wait` (BoundedElasticWait).
        retries = -1
        callbacks = [*(callbacks or []), ray_internals.BoundedElasticWait(wait)]
        wait = min(wait, ELASTIC_PLACEMENT_WAIT_S)
    os.environ[START_TIMEOUT_ENV] = str(wait)
    os.environ.setdefault(POLL_ENV, POLL_S)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg.to_dict(),
        torch_config=rendezvous.BoundTorchConfig(),
        scaling_config=ray.train.ScalingConfig(
            # Elastic: Train starts once MIN fit, goes on with the survivors after a loss and
            # restarts at a larger size every --resize-check-s while there is room to grow.
            num_workers=(cfg.min_workers, cfg.workers) if cfg.elastic() else cfg.workers,
            elastic_resize_monitor_interval_s=cfg.resize_check_s, use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker,
                                  **({"GPU": cfg.gpus_per_worker} if cfg.use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=cfg.name, storage_path=storage_path, storage_filesystem=storage_fs,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.keep_checkpoints, checkpoint_score_attribute="val_acc",
                checkpoint_score_order="max"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures,
                                                   controller_failure_limit=retries),
            worker_runtime_env=cluster.worker_env(),
            logging_config=ray.train.LoggingConfig(log_level=cfg.ray_log_level),
            callbacks=callbacks))


def fit_trainer(cfg: TrainConfig, callbacks: list | None = None) -> None:
    """Build and fit cfg's TorchTrainer, except that a UserError raised in a worker (a batch
    that does not fit, weights that cannot be read) reaches the caller as itself: one line
    naming the flag, not Ray's wrapper with every worker's traceback; and a restart that found
    no room says what is missing and where the run will resume."""
    try:
        build_trainer(cfg, callbacks).fit()
    except ray.train.WorkerGroupError as e:
        user = [f for f in e.worker_failures.values() if isinstance(f, UserError)]
        if user:
            raise user[0] from None
        raise
    except ray.train.ControllerError as e:
        if not isinstance(e.controller_failure, (ray_internals.WorkerGroupStartupTimeoutError,
                                                 ray_internals.RestartWaitExceeded)):
            raise
        raise no_room_to_restart(cfg) from None


def no_room_to_restart(cfg: TrainConfig) -> cluster.ResourceError:
    """A worker group Train could not place in time: at a restart after lost workers, or at
    the start when something took the room preflight saw."""
    short = cluster.shortfall(cfg)
    newest = checkpoint.newest_complete(cfg.run_uri())
    where = (f"its newest complete checkpoint, {storage.display(newest)}" if newest
             else "the start (no checkpoint was stored)")
    return cluster.ResourceError(
        f"run {storage.display(cfg.run_uri())}: its workers (--workers {show_workers(cfg)}) "
        f"could not be placed within "
        f"{restart_wait_s(cfg, cluster.can_grow()):g} s (--resource-timeout-s): "
        f"{cluster.describe_shortfall(short) or 'the cluster had room only after the wait'}. "
        f"Run the same command again once the cluster has room: it resumes from {where}.")


def evaluate_on_a_worker(ckpt_uri: str, cfg: TrainConfig, split: str) -> dict:
    """evaluate_checkpoint with one worker's resources: a Ray task that asks for them (its
    GPU, if any); in this process where the cluster is this machine alone and no GPU is
    asked for, where such a task would only add a process start (and its torch import)."""
    if not cfg.use_gpu and cluster.this_machine_only():
        return evaluate_checkpoint(ckpt_uri, cfg, split)
    task = ray.remote(evaluate_checkpoint).options(
        num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker if cfg.use_gpu else 0,
        runtime_env=cluster.worker_env())
    return ray.get(task.remote(ckpt_uri, cfg, split))


def score_best(run_uri: str, cfg: TrainConfig, manifest: dict, rows: list[dict],
               phase: int | None = None) -> dict:
    """The best kept checkpoint of a run (of one phase, if given), scored on the evaluation
    split: the keys result.json and best.json share."""
    best = runs.best_checkpoint(run_uri, rows, phase)
    if best is None:
        raise RuntimeError(f"{storage.display(run_uri)}: no checkpoint"
                           + (f" of phase {phase}" if phase else "") + " to evaluate")
    row, ckpt_uri = best
    return runs.evaluated(row, ckpt_uri,
                          evaluate_on_a_worker(ckpt_uri, cfg, runs.evaluation_split(manifest)))


def run_and_evaluate(cfg: TrainConfig, manifest: dict, clock: timeline.Clock) -> dict:
    """Fit the run and score its best checkpoint: result.json's contents but for the wall and
    the timeline, which `write_result` adds once the caller has stopped `clock` (after Ray's
    shutdown, when it started Ray). The workers' parts of the timeline go into `clock`."""
    run_uri = cfg.run_uri()
    runs.write_config(cfg)
    earlier = len(runs.read_worker_starts(run_uri))  # a resumed run's earlier jobs
    fit_start = time.time()
    fit_trainer(cfg)
    clock.lap("fit")  # what the workers' parts below do not explain of it: `other`
    history = runs.read_metrics(run_uri)
    clock.add(*timeline.worker_parts(history, runs.read_worker_starts(run_uri)[earlier:],
                                     fit_start))
    summary = {"name": cfg.name, "run": storage.display(run_uri), "epochs": len(history),
               **score_best(run_uri, cfg, manifest, history),
               # The last epoch's weights: its checkpoint (Ray always keeps the latest), not
               # a second copy of them.
               "final_checkpoint": storage.display(checkpoint.newest_complete(run_uri))}
    clock.lap("final_evaluation")
    return summary


def write_result(cfg: TrainConfig, summary: dict, clock: timeline.Clock) -> dict:
    """result.json, written last (the run is finished), with the wall and where it went;
    logged, and recorded in MLflow. Returns it."""
    tl = clock.timeline()
    summary = {**summary, "wall_seconds": round(clock.wall(), 1), "timeline": tl}
    runs.write_json(storage.join(cfg.run_uri(), runs.RESULT), summary)
    record_result(cfg, summary)
    log.info(f"{runs.describe(summary)}; wall {clock.wall():.0f} s")
    log.info(timeline.line(tl))
    log.info(f"run folder: {summary['run']}")
    return summary


def record_result(cfg: TrainConfig, summary: dict) -> None:
    """With MLflow: the best checkpoint and its test accuracy, on the run's MLflow run."""
    flow = tracking.mlflow_run(cfg)
    if flow is not None:
        try:
            flow.result(summary)
        except Exception as e:
            log.warning(f"MLflow: result not logged ({e})")


def fit(cfg: TrainConfig) -> dict:
    """Train a run end to end and return its result.json contents."""
    clock = timeline.Clock()  # the run's wall: from here to Ray's shutdown
    cfg, manifest = preflight(cfg.with_smoke())
    with storage.retries(cfg.storage_retry_s):
        runs.check_run(cfg)
        clock.lap("preflight")
        with cluster.session(cfg):
            clock.lap("ray_start")
            summary = run_and_evaluate(cfg, manifest, clock)
        clock.lap("shutdown")
        return write_result(cfg, summary, clock)
