"""Ray Train glue: the per-worker loop, the TorchTrainer, checkpoints, the final test.

    python jobs/train.py --smoke
    ray job submit --working-dir . -- python jobs/train.py --data s3://bucket/datasets \
        --storage s3://bucket/runs --name r50-a --workers 4 --use-gpu

Everything Ray-specific about training lives here; the schedule itself is recipe.py.
Run folder <storage>/<name>/: config.json (resolved config), metrics.jsonl (one line per
epoch), checkpoint-p<phase>-e<epoch>/ (Ray-managed, best K by val accuracy), model_final.pt
(weights after the last epoch) and result.json (written last: the run is finished).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import sys
import tempfile
import time

import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train.torch import TorchTrainer

from cifar_ray import checkpoint, data, rendezvous, storage
from cifar_ray.config import PrepareConfig, TrainConfig, UserError
from cifar_ray.engine import to_tensor
from cifar_ray.model import build
from cifar_ray.recipe import Data, Runtime, evaluate_split, run_phases

CONFIG, METRICS, FINAL, RESULT = "config.json", "metrics.jsonl", "model_final.pt", "result.json"
# Fields that may change between a run and its resumption: they say how to run, not what.
OPERATIONAL = {"workers", "use_gpu", "cpus_per_worker", "max_failures", "resource_timeout_s",
               "overwrite", "smoke", "data", "storage", "keep_checkpoints", "ray_log_level"}
# Passed to every worker so that each node reaches the same object store endpoint. Keys and
# secrets are deliberately absent: workers get credentials from their own chain (roles).
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")


class RunExistsError(UserError, RuntimeError):
    """The run name holds a finished run (or a different config) and would be overwritten."""


class ResourceError(UserError, RuntimeError):
    """The cluster cannot place the requested workers within the bounded wait."""


# ---------------------------------------------------------------- on each worker


def _say(line: str) -> None:
    """One line to the driver. Train V2 patches print() to log AND echo, so a plain print in
    a worker shows twice; the process's own stdout shows it once."""
    print(line, file=sys.__stdout__, flush=True)


def _all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t


def _wrapper(device: torch.device, world: int):
    def wrap(module: torch.nn.Module) -> torch.nn.Module:
        if world == 1:
            return module
        ids = [device.index] if device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)
    return wrap


def runtime_for(device: torch.device, rank: int, world: int) -> Runtime:
    cuda = device.type == "cuda"
    return Runtime(device=device, rank=rank, world=world, wrap=_wrapper(device, world),
                   all_reduce=_all_reduce, amp_dtype=torch.bfloat16 if cuda else None,
                   channels_last=cuda)


def _load_data(cfg: TrainConfig, rank: int, world: int, device: torch.device) -> tuple[Data, int]:
    uri = cfg.dataset_uri()
    manifest = data.read_manifest(uri)
    # Each rank reads only its slice; train slices are equal so ranks step in lockstep.
    tr = data.load_split(uri, "train", rank, world, equal=True, manifest=manifest)
    va = data.load_split(uri, "val", rank, world, manifest=manifest)
    pin = device.type == "cuda"

    def put(x: torch.Tensor) -> torch.Tensor:
        return x.pin_memory().to(device, non_blocking=True) if pin else x.to(device)

    return (Data(put(to_tensor(tr.images)), put(torch.from_numpy(tr.labels)),
                 put(to_tensor(va.images)), put(torch.from_numpy(va.labels))),
            len(manifest["classes"]))


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker: load this rank's data, restore, train, report."""
    cfg = TrainConfig.from_dict(config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(cfg.cpus_per_worker)
    rt = runtime_for(device, rank, world)
    train_data, num_classes = _load_data(cfg, rank, world, device)
    model = build(cfg.weights, cfg.weights_sha256, num_classes, cfg.seed).to(device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)

    resume = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            resume = checkpoint.load_dir(d)
        source = ckpt.path
    elif cfg.init_checkpoint:  # a sweep trial starts from the shared phase 1
        resume = checkpoint.load_uri(cfg.init_checkpoint)
        check_init_compatible(cfg, resume["config"], cfg.init_checkpoint)
        source = storage.display(cfg.init_checkpoint)
    if resume is not None and rank == 0:
        _say(f"starting from {source}: phase {resume['phase']}, epoch {resume['epoch'] + 1} done")

    run_uri = cfg.run_uri()

    def report(metrics: dict, state) -> None:
        # Every rank reports (report is a barrier); only rank 0 writes a checkpoint.
        with tempfile.TemporaryDirectory() as d:
            ckpt_out = None
            if rank == 0:
                st = state()
                checkpoint.write_dir(st, d)
                ckpt_out = ray.train.Checkpoint.from_directory(d)
                # Our own per-epoch log: Result.metrics keeps only the latest report.
                storage.write_bytes(storage.join(run_uri, METRICS), "".join(
                    json.dumps(h) + "\n" for h in st["history"]).encode())
            ray.train.report(metrics, checkpoint=ckpt_out,
                             checkpoint_dir_name=f"checkpoint-p{metrics['phase']}"
                                                 f"-e{metrics['epoch']:03d}")

    run_phases(cfg, model, train_data, rt, report, resume,
               log=_say if rank == 0 else (lambda _: None))
    if rank == 0:
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        storage.write_bytes(storage.join(run_uri, FINAL), buf.getvalue())


# Fields of the phase-1 recipe that a checkpoint given as --init-checkpoint must share.
PHASE1_FIELDS = ("dataset", "weights", "weights_sha256", "image_size", "phase1",
                 "cache_features", "seed")


def check_init_compatible(cfg: TrainConfig, stored: dict, uri: str) -> None:
    ours = cfg.to_dict()
    diff = [k for k in PHASE1_FIELDS if stored.get(k) != ours[k]]
    if diff:
        raise checkpoint.CheckpointError(
            f"--init-checkpoint {storage.display(uri)}: trained with different {', '.join(diff)}")


# ---------------------------------------------------------------- evaluation task


def evaluate_checkpoint(ckpt_uri: str, cfg: TrainConfig, split: str = "test",
                        state: dict | None = None) -> dict:
    """Accuracy of a checkpoint on a split (runs anywhere: a Ray task, or plain Python).
    `state`: the checkpoint's contents when the caller has already loaded them."""
    device = torch.device("cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu")
    state = state if state is not None else checkpoint.load_uri(ckpt_uri)
    uri = cfg.dataset_uri()
    manifest = data.read_manifest(uri)
    s = data.load_split(uri, split, manifest=manifest)
    model = build("none", num_classes=len(manifest["classes"]))
    model.load_state_dict(state["model"])
    model.to(device)
    y = torch.from_numpy(s.labels).to(device)
    out = evaluate_split(model, to_tensor(s.images, device), y, cfg, runtime_for(device, 0, 1))
    preds = out.pop("predictions").tolist()
    return {**out, "split": split, "checkpoint": ckpt_uri, "phase": state["phase"],
            "epoch": state["epoch"], "labels": s.labels.tolist(), "predictions": preds,
            "classes": manifest["classes"]}


# ---------------------------------------------------------------- on the driver


def _comparable(d: dict) -> dict:
    return {k: v for k, v in d.items() if k not in OPERATIONAL}


def check_run(cfg: TrainConfig, log=print) -> None:
    """Refuse to clobber a finished run; refuse to resume a run with a different recipe."""
    run_uri = cfg.run_uri()
    if storage.exists(storage.join(run_uri, RESULT)):
        if not cfg.overwrite:
            raise RunExistsError(
                f"{storage.display(run_uri)} holds a finished run (result.json); refusing to "
                "overwrite it. Choose another --name, or pass --overwrite to replace it.")
        log(f"--overwrite: deleting the finished run at {storage.display(run_uri)}")
        storage.delete_dir(run_uri)
        return
    config_uri = storage.join(run_uri, CONFIG)
    if storage.exists(config_uri):
        old = json.loads(storage.read_bytes(config_uri))
        diff = sorted(k for k in _comparable(old) | _comparable(cfg.to_dict())
                      if old.get(k) != cfg.to_dict().get(k))
        if diff:
            raise RunExistsError(
                f"{storage.display(run_uri)} holds an unfinished run with a different "
                f"configuration ({', '.join(diff)} differ); resume it with the same settings "
                "or choose another --name")
        log(f"resuming unfinished run {storage.display(run_uri)} from its latest checkpoint")


def preflight(cfg: TrainConfig, log=print) -> dict:
    """Everything that can fail cheaply, before Ray starts a worker. Returns the manifest."""
    manifest = data.read_manifest(cfg.dataset_uri())
    for split in ("train", "val"):
        if split not in manifest["splits"]:
            raise data.DataError(f"{storage.display(cfg.dataset_uri())}: no {split!r} split")
    n_train = manifest["splits"]["train"]["count"]
    for i in (1, 2):
        pc = cfg.phase(i)
        if pc.epochs and (n_train // cfg.workers) < pc.batch_size // cfg.workers:
            raise ValueError(f"--phase{i}-batch-size {pc.batch_size}: more than the "
                             f"{n_train} training images allow with --workers {cfg.workers}")
    storage.check_writable(cfg.storage)
    check_run(cfg, log)
    return manifest


def needed_resources(cfg: TrainConfig) -> dict[str, float]:
    need = {"CPU": float(cfg.workers * cfg.cpus_per_worker)}
    if cfg.use_gpu:
        need["GPU"] = float(cfg.workers)
    return need


# Written by `ray up` on the head node, where `ray job submit` runs the job's driver.
AUTOSCALER_CONFIG = "~/ray_bootstrap_config.yaml"


def autoscaler_max_resources(config: dict) -> dict[str, float]:
    """The most of each resource an autoscaler config can bring up: the head's resources plus
    every worker type's times its max_workers (capped by the cluster's max_workers)."""
    cap = config.get("max_workers", 0)
    total: dict[str, float] = {}
    for name, node_type in config.get("available_node_types", {}).items():
        count = 1 if name == config.get("head_node_type") else min(
            node_type.get("max_workers", cap), cap)
        for k, v in node_type.get("resources", {}).items():
            total[k] = total.get(k, 0.0) + float(v) * count
    return total


def max_cluster_resources() -> dict[str, float] | None:
    """What the connected cluster can grow to, or None when nothing can add nodes to it (a
    local instance, a fixed `ray start` cluster): then what it has now is all it will have."""
    from ray._private.state import state

    reported = state.get_max_resources_from_cluster_config()  # autoscaler v2, KubeRay
    if reported:
        return {k: float(v) for k, v in reported.items()}
    path = os.path.expanduser(AUTOSCALER_CONFIG)  # the classic autoscaler of `ray up`
    if os.path.exists(path):
        import yaml

        with open(path) as f:
            return autoscaler_max_resources(yaml.safe_load(f))
    return None


def wait_for_resources(cfg: TrainConfig, timeout_s: float, log=print) -> None:
    """Ray Train would wait forever for workers the cluster cannot place. Fail at once when
    the cluster can never hold them (no autoscaler, or beyond its largest size); otherwise
    wait a bounded time for the autoscaler to add nodes, then fail saying what is missing."""
    need = needed_resources(cfg)
    deadline = time.monotonic() + timeout_s
    said = False
    while True:
        have = ray.cluster_resources()
        short = {k: (v, have.get(k, 0.0)) for k, v in need.items() if have.get(k, 0.0) < v}
        if not short:
            return
        text = ", ".join(f"{k}: need {v:g}, cluster has {h:g}" for k, (v, h) in short.items())
        hint = (" (--use-gpu on a machine without GPUs? drop --use-gpu to train on CPU)"
                if "GPU" in short else "")
        ceiling = max_cluster_resources()
        if ceiling is None:
            raise ResourceError(f"--workers {cfg.workers} cannot be placed: {text}, and no "
                                f"autoscaler can add nodes to this cluster{hint}.")
        beyond = {k: ceiling.get(k, 0.0) for k in short if ceiling.get(k, 0.0) < need[k]}
        if beyond:
            most = ", ".join(f"{k}: {v:g}" for k, v in beyond.items())
            raise ResourceError(f"--workers {cfg.workers} cannot be placed: {text}; even at "
                                f"its largest the autoscaler gives {most}{hint}.")
        if time.monotonic() >= deadline:
            raise ResourceError(f"--workers {cfg.workers} cannot be placed: {text}{hint}. "
                               f"Waited {timeout_s:g} s for the autoscaler "
                               "(--resource-timeout-s).")
        if not said:
            log(f"waiting up to {timeout_s:g} s for the autoscaler to add nodes ({text})")
            said = True
        time.sleep(2)


def worker_env() -> dict:
    return {"env_vars": {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}}


def ensure_smoke_data(cfg: TrainConfig, log=print) -> None:
    data.prepare(PrepareConfig(source="synthetic", data=cfg.data, dataset=cfg.dataset,
                               val_size=400, synthetic_size=2000), log=log)


def init_ray(log=print) -> bool:
    """Connect to the cluster named by RAY_ADDRESS (as `ray job submit` sets it) or a local
    `ray start` instance; else start a private one. Returns True if we started it."""
    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        return False
    try:
        ray.init(address="auto", log_to_driver=True)
        return False
    except ConnectionError:
        log("no Ray cluster found: starting a local instance")
        start_local_ray()
        return True


def start_local_ray(**kwargs) -> None:
    """A private one-machine Ray instance: every server on loopback, token auth on."""
    from ray._private import ray_constants

    # Ray binds its servers to the node's IP, and on Linux swaps 127.0.0.1 for the machine's
    # routable address unless told the instance is single-machine: the switch it uses on
    # macOS/Windows. The env var is for the daemons and workers, the constant for this
    # process (read when `ray` was imported). Only ever set for an instance we start.
    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    # gloo's peer connections, likewise: the loopback interface rather than the host's name.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # Token authentication: Ray 2.60 turns it on for a new local instance unless the user
    # set RAY_AUTH_MODE (setting it here, after `import ray`, would desync Ray's cached
    # config from its daemons). The dashboard runs (on 127.0.0.1) because Train V2 cleans up
    # placement groups through the State API.
    ray.init(dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1", **kwargs)


def fit(cfg: TrainConfig, log=print) -> dict:
    """Train a run end to end and return its result.json contents."""
    cfg = cfg.with_smoke()
    if cfg.smoke:
        ensure_smoke_data(cfg, log)
    cfg = dataclasses.replace(cfg, data=storage.normalize(cfg.data),
                              storage=storage.normalize(cfg.storage))
    manifest = preflight(cfg, log)
    started_here = init_ray(log)
    try:
        wait_for_resources(cfg, cfg.resource_timeout_s, log)
        return run_and_evaluate(cfg, manifest, log)
    finally:
        if started_here:
            ray.shutdown()


def write_config(cfg: TrainConfig) -> None:
    storage.write_bytes(storage.join(cfg.run_uri(), CONFIG),
                        json.dumps(cfg.to_dict(), indent=2).encode())


def read_metrics(run_uri: str) -> list[dict]:
    """The per-epoch rows of a run (empty before its first epoch)."""
    uri = storage.join(run_uri, METRICS)
    if not storage.exists(uri):
        return []
    return [json.loads(line) for line in storage.read_bytes(uri).decode().splitlines()]


def read_runs(folder: str) -> dict[str, tuple[TrainConfig | None, list[dict]]]:
    """Every run under a folder (a sweep's trials): its config (None if not written yet) and
    its per-epoch rows."""
    runs = {}
    for name in storage.list_dir(folder):
        run = storage.join(folder, name)
        cfg_uri = storage.join(run, CONFIG)
        cfg = (TrainConfig.from_dict(json.loads(storage.read_bytes(cfg_uri)))
               if storage.exists(cfg_uri) else None)
        runs[name] = (cfg, read_metrics(run))
    return runs


def evaluate_remote(ckpt_uri: str, cfg: TrainConfig, split: str) -> dict:
    """evaluate_checkpoint as a Ray task with one worker's resources (its GPU, if any)."""
    task = ray.remote(evaluate_checkpoint).options(
        num_cpus=cfg.cpus_per_worker, num_gpus=1 if cfg.use_gpu else 0,
        runtime_env=worker_env())
    return ray.get(task.remote(ckpt_uri, cfg, split))


def build_trainer(cfg: TrainConfig, callbacks: list | None = None) -> TorchTrainer:
    storage_path, storage_fs = storage.for_ray(cfg.storage)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg.to_dict(),
        torch_config=rendezvous.BoundTorchConfig(),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.workers, use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker,
                                  **({"GPU": 1} if cfg.use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=cfg.name, storage_path=storage_path, storage_filesystem=storage_fs,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.keep_checkpoints, checkpoint_score_attribute="val_acc",
                checkpoint_score_order="max"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            worker_runtime_env=worker_env(),
            logging_config=ray.train.LoggingConfig(log_level=cfg.ray_log_level),
            callbacks=callbacks))


def run_and_evaluate(cfg: TrainConfig, manifest: dict, log=print) -> dict:
    """Fit the run, evaluate its best checkpoint, write result.json (last) and return it."""
    run_uri = cfg.run_uri()
    write_config(cfg)
    t0 = time.time()
    result = build_trainer(cfg).fit()
    wall = time.time() - t0
    best_ckpt, best_metrics = max(result.best_checkpoints, key=lambda cm: cm[1]["val_acc"])
    best_uri = storage.join(run_uri, os.path.basename(best_ckpt.path.rstrip("/")))
    history = read_metrics(run_uri)
    summary = {"name": cfg.name, "run": storage.display(run_uri), "wall_seconds": round(wall, 1),
               "epochs": len(history), "best_checkpoint": storage.display(best_uri),
               "best_val_acc": best_metrics["val_acc"],
               "best_phase": best_metrics["phase"], "best_epoch": best_metrics["epoch"],
               "final_weights": storage.display(storage.join(run_uri, FINAL))}
    split = "test" if "test" in manifest["splits"] else "val"
    if split == "val":
        log("the dataset has no test split: reporting the best checkpoint's val accuracy")
    ev = evaluate_remote(best_uri, cfg, split)
    summary.update({f"{split}_acc": ev["accuracy"], f"{split}_loss": ev["loss"],
                    "evaluated_split": split, "evaluated_images": ev["count"]})
    storage.write_bytes(storage.join(run_uri, RESULT), json.dumps(summary, indent=2).encode())
    log(f"best checkpoint {summary['best_checkpoint']} (phase {summary['best_phase']} epoch "
        f"{summary['best_epoch'] + 1}, val acc {summary['best_val_acc']:.4f}): {split} accuracy "
        f"{ev['accuracy']:.4f} on {ev['count']} images; wall {wall:.0f} s")
    log(f"run folder: {summary['run']}")
    return summary
