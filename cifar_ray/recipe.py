"""The two-phase schedule: frozen-backbone head training, then full fine-tuning.

    python -m pytest tests/test_recipe.py      # runs it without Ray, on CPU

`run_phases` is plain PyTorch. Distribution enters only through the `Runtime` it is given
(DDP wrapping and an all-reduce: identity in a single process) and reporting through the
`report` callback, so the Ray glue in train.py stays small and this stays testable.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from cifar_ray import engine
from cifar_ray.config import PhaseConfig, TrainConfig
from cifar_ray.errors import UserError
from cifar_ray.model import Classifier, set_phase, train_mode

log = logging.getLogger(__name__)


class BatchTooLargeError(UserError, RuntimeError):
    """A phase's batch does not fit in the device's memory; the message names the flag."""


def _identity(module: nn.Module) -> nn.Module:
    return module


def _all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Across the process group when there is one of several ranks; else t as it is."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t


@dataclass
class Runtime:
    """Where and how this process trains. The defaults describe a single CPU process."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    world: int = 1
    wrap: Callable[[nn.Module], nn.Module] = _identity      # DDP when world > 1
    all_reduce: Callable[..., torch.Tensor] = _all_reduce   # (tensor, op) across ranks
    amp_dtype: torch.dtype | None = None                    # bf16 on CUDA
    channels_last: bool = False                             # on CUDA

    @classmethod
    def for_device(cls, device: torch.device, rank: int = 0, world: int = 1) -> Runtime:
        """Production settings: bf16 autocast and channels_last on CUDA, DDP over several
        ranks (with the device's index on CUDA)."""
        cuda = device.type == "cuda"
        if cuda:  # every step of a phase has one input shape: let cuDNN pick its fastest kernels
            torch.backends.cudnn.benchmark = True

        def wrap(module: nn.Module) -> nn.Module:
            if world == 1:
                return module
            return nn.parallel.DistributedDataParallel(
                module, device_ids=[device.index] if cuda else None)

        return cls(device=device, rank=rank, world=world, wrap=wrap,
                   amp_dtype=torch.bfloat16 if cuda else None, channels_last=cuda)

    def reduce(self, values: list[float], op: str = "sum") -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        return self.all_reduce(t, op).tolist()


@dataclass
class DeviceSplits:
    """This rank's images (uint8 [N, 3, 32, 32]) and labels, on the training device."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor


Report = Callable[[dict, Callable[[], dict]], None]  # (epoch metrics, checkpoint state thunk)


def image_transform(cfg: TrainConfig, rt: Runtime, augment: bool, gen: torch.Generator | None):
    """uint8 image batch -> model input, with augmentation when asked."""
    def transform(x: torch.Tensor) -> torch.Tensor:
        if augment:
            x = engine.augment(x, gen)
        return engine.preprocess(x, cfg.image_size, rt.channels_last)
    return transform


@dataclass
class PhaseInputs:
    """What one phase trains and on what: the whole model on images, or (phase 1 with cached
    features) the head alone on the frozen backbone's features."""

    module: nn.Module
    train_x: torch.Tensor
    val_x: torch.Tensor
    cached: bool
    setup_seconds: float  # the one backbone pass of cached features, else 0


# How often, at most, the workers ask whether a node of theirs is being preempted (a barrier
# across them, so a step count they agree on: from the last epoch's time, 4 times an epoch at
# first). Clouds give 30 s (GCP) to 2 min (AWS) of notice; a checkpoint upload takes seconds.
PREEMPTION_POLL_S = 5.0


def start_epoch(phase: int, pc: PhaseConfig, resume: dict | None) -> int | None:
    """The epoch a phase starts at, or None when there is nothing left of it to run. A
    checkpoint taken mid-epoch (it has a "step") resumes inside its epoch."""
    if resume and resume["phase"] > phase:
        return None
    start = 0
    if resume and resume["phase"] == phase:
        start = resume["epoch"] + (0 if resume.get("step") else 1)
    return start if start < pc.epochs else None


def poll_every(steps: int, last_train_seconds: float | None) -> int:
    """Steps between preemption polls: about PREEMPTION_POLL_S apart, at least 4 an epoch."""
    most = max(1, steps // 4)
    if not last_train_seconds:
        return most
    return max(1, min(most, int(PREEMPTION_POLL_S * steps / last_train_seconds)))


def phase_inputs(cfg: TrainConfig, model: Classifier, data: DeviceSplits, rt: Runtime,
                 phase: int, batch_size: int) -> PhaseInputs:
    """Freeze or unfreeze for the phase, and say what it trains on: images, or (phase 1
    with cached features) the backbone's features, computed here once."""
    set_phase(model, phase)
    if not (phase == 1 and cfg.caches_features()):
        return PhaseInputs(model, data.train_x, data.val_x, cached=False, setup_seconds=0.0)
    # Frozen backbone + BN in eval + no augmentation: features are a pure function of the
    # image, so one backbone pass replaces one per epoch.
    t0 = time.perf_counter()
    plain = image_transform(cfg, rt, augment=False, gen=None)
    train_x, val_x = (engine.extract_features(model.backbone, x, batch_size=batch_size,
                                              transform=plain, amp_dtype=rt.amp_dtype)
                      for x in (data.train_x, data.val_x))
    seconds = rt.reduce([time.perf_counter() - t0], "max")[0]
    log.info(f"phase 1: cached backbone features for {len(data.train_y)} train + "
             f"{len(data.val_y)} val images per worker in {seconds:.1f} s")
    return PhaseInputs(model.head, train_x, val_x, cached=True, setup_seconds=seconds)


def checkpoint_state(cfg: TrainConfig, model: nn.Module, optimizer, scheduler, phase: int,
                     epoch: int, history: list[dict], step: int | None = None,
                     partial: dict | None = None) -> dict:
    """Everything a resume needs: weights, optimizer and schedule, where it stood, the
    history so far and the config that produced it. Taken mid-epoch (on a preemption
    notice): also the steps done in that epoch and its train sums so far, over all ranks."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "phase": phase, "epoch": epoch,
             "history": list(history), "config": cfg.to_dict()}
    if step is not None:
        state.update(step=step, partial=partial)
    return state


def run_phases(cfg: TrainConfig, model: Classifier, data: DeviceSplits, rt: Runtime,
               report: Report, resume: dict | None = None,
               notice: Callable[[], bool] | None = None) -> list[dict]:
    """Train both phases, reporting after every epoch. `resume` is a checkpoint state (as
    built by checkpoint_state) to continue from: what it had done is skipped. `notice`, if
    given, is asked every few steps (by every rank: a collective) whether a node is about to
    be preempted; when it says so, a checkpoint is reported there, mid-epoch, with metrics
    {phase, epoch, step, val_acc: nan}, and training goes on. Returns the per-epoch metrics
    history (including epochs from before a resume)."""
    history: list[dict] = list(resume["history"]) if resume else []
    restored_from = None
    if resume:
        model.load_state_dict(resume["model"])
        restored_from = {k: resume[k] for k in ("phase", "epoch", "step") if resume.get(k)
                         is not None}
    eval_batch = max(cfg.phase1.batch_size, cfg.phase2.batch_size) // rt.world
    for phase in (1, 2):
        pc = cfg.phase(phase)
        first = start_epoch(phase, pc, resume)
        if first is None:
            continue
        per_rank_batch = pc.batch_size // rt.world
        steps = len(data.train_y) // per_rank_batch
        if steps == 0:
            raise ValueError(f"--phase{phase}-batch-size {pc.batch_size}: larger than the "
                             f"{len(data.train_y) * rt.world} training images")
        inputs = phase_inputs(cfg, model, data, rt, phase, eval_batch)
        wrapped = rt.wrap(inputs.module)  # (re)wrapped per phase: DDP keeps the params it saw
        if cfg.compile:  # per phase too: each phase trains another module (or a frozen part)
            wrapped = compile_module(wrapped, rt.device)
        optimizer = engine.make_optimizer(pc, inputs.module.parameters())
        scheduler = engine.make_scheduler(optimizer, pc, steps)
        if resume and resume["phase"] == phase:
            optimizer.load_state_dict(resume["optimizer"])
            scheduler.load_state_dict(resume["scheduler"])
        loss_fn = nn.CrossEntropyLoss(label_smoothing=pc.label_smoothing)
        midway = resume if resume and resume["phase"] == phase and resume.get("step") else None
        last_seconds = None
        for epoch in range(first, pc.epochs):
            carry = midway if midway and epoch == midway["epoch"] else None
            state = functools.partial(checkpoint_state, cfg, model, optimizer, scheduler,
                                      phase, epoch, history)
            on_step = step_hook(cfg, rt, phase, epoch, steps, carry["step"] if carry else 0,
                                per_rank_batch, poll_every(steps, last_seconds),
                                notice and preemption_poll(notice, report, rt, phase, epoch,
                                                           state, carry))
            try:
                tr, va = run_epoch(cfg, model, inputs, wrapped, data, rt, phase, epoch,
                                   optimizer=optimizer, scheduler=scheduler, loss_fn=loss_fn,
                                   batch_size=per_rank_batch, eval_batch=eval_batch,
                                   start=carry["step"] if carry else 0, on_step=on_step)
            except torch.OutOfMemoryError:
                raise out_of_memory(cfg, rt, phase, per_rank_batch) from None
            if carry:
                tr = carried(tr, carry["partial"], rt.rank)
            setup = inputs.setup_seconds if epoch == first else 0.0
            metrics = epoch_metrics(rt, phase, epoch, len(history) + 1, tr, va, setup, inputs)
            if restored_from is not None:
                # Marks the first epoch after a restore: a record of where training resumed.
                metrics["restored_from"], restored_from = restored_from, None
            last_seconds = metrics["seconds"] - setup  # the same on every rank (reduced)
            history.append(metrics)
            log.info(epoch_line(cfg, metrics))
            report(metrics, state)
    return history


def step_hook(cfg: TrainConfig, rt: Runtime, phase: int, epoch: int, steps: int, start: int,
              per_rank_batch: int, every: int, poll: Callable | None):
    """What runs after each training step, if anything: rank 0's progress line every
    --progress-s seconds (step, images/s, the epoch's ETA), and every `every` steps the
    preemption poll (on all ranks)."""
    progress = bool(cfg.progress_s) and rt.rank == 0
    if not progress and poll is None:
        return None
    t0 = last = time.monotonic()

    def on_step(step: int, sums: Callable[[], dict]) -> None:
        nonlocal last
        now = time.monotonic()
        if progress and now - last >= cfg.progress_s:
            last = now
            rate = (step - start) / (now - t0)  # steps/s since this attempt's start
            log.info(f"[phase {phase} epoch {epoch + 1}/{cfg.phase(phase).epochs}] step "
                     f"{step}/{steps} | {rate * per_rank_batch * rt.world:.0f} img/s | "
                     f"epoch ETA {(steps - step) / rate:.0f} s")
        if poll is not None and step % every == 0:
            poll(step, sums)
    return on_step


def preemption_poll(notice: Callable[[], bool], report: Report, rt: Runtime, phase: int,
                    epoch: int, state: Callable[..., dict], carry: dict | None):
    """The poll step_hook calls every few steps: on a preemption notice, report a
    checkpoint of this very step (every rank takes part: the sums are reduced over ranks)."""
    def poll(step: int, sums: Callable[[], dict]) -> None:
        if not notice():
            return
        so_far = sums()
        if carry:
            so_far = carried(so_far, carry["partial"], rt.rank)
        total = rt.reduce([so_far["loss_sum"], so_far["correct"], so_far["count"]])
        partial = {"loss_sum": total[0], "correct": int(total[1]), "count": int(total[2]),
                   "seconds": rt.reduce([so_far["seconds"]], "max")[0],
                   "lr_start": so_far["lr_start"], "lr_end": so_far["lr_end"]}
        log.warning(f"preemption notice: checkpointing phase {phase} epoch {epoch + 1} at "
                    f"step {step}")
        report({"phase": phase, "epoch": epoch, "step": step, "val_acc": float("nan")},
               functools.partial(state, step=step, partial=partial))
    return poll


def carried(tr: dict, partial: dict, rank: int) -> dict:
    """An epoch's train sums with those from before its mid-epoch checkpoint added: the
    checkpoint holds them summed over ranks, so rank 0 adds them (the time, every rank)."""
    out = dict(tr, seconds=tr["seconds"] + partial["seconds"],
               lr_start=partial["lr_start"],
               lr_end=tr["lr_end"] if tr["lr_end"] is not None else partial["lr_end"])
    if rank == 0:
        for k in ("loss_sum", "correct", "count"):
            out[k] = tr[k] + partial[k]
    return out


def compile_module(module: nn.Module, device: torch.device) -> nn.Module:
    """torch.compile for --compile. On CUDA with CUDA graphs ("reduce-overhead"): ResNet50
    at 32 px is launch-bound, and replaying a step's hundreds of kernels as one graph is
    what pays (H200, batch 256: 51k img/s against 14.5k eager; inductor's default mode
    alone was slower than eager, 10k). The batch shape is fixed (drop_last), so one graph
    per phase. On CPU there are no CUDA graphs: the default mode."""
    # A fresh Dynamo cache: both phases (and every run in a process) start from static
    # shapes, instead of recompiling with dynamic ones after a shape change.
    torch.compiler.reset()
    return torch.compile(module, mode="reduce-overhead" if device.type == "cuda" else None)


def out_of_memory(cfg: TrainConfig, rt: Runtime, phase: int, per_rank_batch: int
                  ) -> BatchTooLargeError:
    """What to change when a phase's batch does not fit, with the memory seen (instead of
    the allocator's traceback)."""
    seen = ""
    if rt.device.type == "cuda":
        free, total = torch.cuda.mem_get_info(rt.device)
        seen = (f" ({torch.cuda.get_device_name(rt.device)}: {total / 2**30:.1f} GiB, "
                f"{torch.cuda.max_memory_allocated(rt.device) / 2**30:.1f} GiB at its peak "
                f"in this process, {free / 2**30:.1f} GiB free after the failure)")
    return BatchTooLargeError(
        f"--phase{phase}-batch-size {cfg.phase(phase).batch_size}: {per_rank_batch} images "
        f"per worker at --image-size {cfg.image_size} do not fit in {rt.device}'s memory"
        f"{seen}. Use a smaller --phase{phase}-batch-size (scaling --phase{phase}-lr with "
        "it), more --workers, or a smaller --image-size.")


def run_epoch(cfg: TrainConfig, model: Classifier, inputs: PhaseInputs, wrapped: nn.Module,
              data: DeviceSplits, rt: Runtime, phase: int, epoch: int, *, optimizer,
              scheduler, loss_fn: nn.Module, batch_size: int, eval_batch: int,
              start: int = 0, on_step=None) -> tuple[dict, dict]:
    """One training pass (from step `start`, with train_one_epoch's `on_step`) and one
    validation pass: (train sums, val sums) of this rank."""
    # Seeded per (phase, epoch, rank): a resumed run replays the same order.
    seed = ((cfg.seed * 3 + phase) * 1009 + epoch) * 1009 + rt.rank
    if inputs.cached:
        inputs.module.train()
        transform_train = transform_eval = _identity
    else:
        train_mode(model, phase)
        gen_dev = torch.Generator(device=rt.device).manual_seed(seed + 1)
        transform_train = image_transform(cfg, rt, cfg.phase(phase).augment, gen_dev)
        transform_eval = image_transform(cfg, rt, augment=False, gen=None)
    tr = engine.train_one_epoch(wrapped, inputs.train_x, data.train_y, batch_size=batch_size,
                                optimizer=optimizer, scheduler=scheduler, loss_fn=loss_fn,
                                transform=transform_train,
                                gen=torch.Generator().manual_seed(seed), amp_dtype=rt.amp_dtype,
                                start=start, on_step=on_step)
    va = engine.evaluate(inputs.module, inputs.val_x, data.val_y, batch_size=eval_batch,
                         transform=transform_eval, amp_dtype=rt.amp_dtype)
    return tr, va


def epoch_metrics(rt: Runtime, phase: int, epoch: int, global_epoch: int, tr: dict, va: dict,
                  setup_seconds: float, inputs: PhaseInputs) -> dict:
    """One metrics.jsonl row: sums over every rank, the slowest rank's time."""
    sums = rt.reduce([tr["loss_sum"], tr["correct"], tr["count"],
                      va["loss_sum"], va["correct"], va["count"]])
    train_seconds = rt.reduce([tr["seconds"]], "max")[0]
    return {
        "phase": phase, "epoch": epoch, "global_epoch": global_epoch,
        "train_loss": sums[0] / sums[2], "train_acc": sums[1] / sums[2],
        "val_loss": sums[3] / max(sums[5], 1), "val_acc": sums[4] / max(sums[5], 1),
        # The LR of the epoch's first and last step (a cosine phase ends near 0).
        "lr_start": tr["lr_start"], "lr_end": tr["lr_end"],
        "seconds": train_seconds + setup_seconds,
        "images_per_s": sums[2] / max(train_seconds, 1e-9), "feature_cache": inputs.cached,
    }


def epoch_line(cfg: TrainConfig, m: dict) -> str:
    epochs = cfg.phase(m["phase"]).epochs
    eta = m["seconds"] * (epochs - m["epoch"] - 1)
    return (f"[phase {m['phase']} epoch {m['epoch'] + 1}/{epochs} | "
            f"{m['global_epoch']}/{cfg.phase1.epochs + cfg.phase2.epochs}] "
            f"train loss {m['train_loss']:.4f} acc {m['train_acc']:.4f} | "
            f"val loss {m['val_loss']:.4f} acc {m['val_acc']:.4f} | "
            f"lr {m['lr_start']:.2e} -> {m['lr_end']:.2e} | {m['images_per_s']:.0f} img/s | "
            f"{m['seconds']:.1f} s | phase ETA {eta:.0f} s")
