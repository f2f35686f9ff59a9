"""The two-phase schedule: frozen-backbone head training, then full fine-tuning.

    python -m pytest tests/test_recipe.py      # runs it without Ray, on CPU

`PhaseLoop` is plain PyTorch. Distribution enters only through the `Runtime` it is given
(DDP wrapping, an all-reduce and a preemption notice: no-ops in a single process) and
reporting through the `report` callback, so the Ray glue in train.py stays small and this
stays testable.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from torch import nn

from cifar_ray import checkpoint, engine
from cifar_ray.checkpoint import ResumePoint
from cifar_ray.config import TrainConfig
from cifar_ray.errors import UserError
from cifar_ray.model import Classifier, set_phase, train_mode
from cifar_ray.runtime import DeviceSplits, Runtime, image_transform

log = logging.getLogger(__name__)

# report(metrics, checkpoint_state): after every epoch, and mid-epoch on a preemption
# notice. checkpoint_state() builds what the checkpoint holds (only rank 0 calls it).
Report = Callable[[dict, Callable[[], dict]], None]

# How often, at most, the workers ask whether a node of theirs is being preempted (a barrier
# across them, so a step count they agree on: from the last epoch's time, 4 times an epoch at
# first). Clouds give 30 s (GCP) to 2 min (AWS) of notice; a checkpoint upload takes seconds.
PREEMPTION_POLL_S = 5.0


class BatchTooLargeError(UserError, RuntimeError):
    """A phase's batch does not fit in the device's memory; the message names the flag."""


class PhaseLoop:
    """Both phases of the recipe on one rank, and the state of the phase in progress.

        history = PhaseLoop(cfg, model, data, rt, report).run(resume=state)

    Read top to bottom: run -> start_phase -> run_epoch -> after_step, and
    checkpoint_state (what a report stores). Per phase it holds the module it trains (the
    model; or, in phase 1 with cached features, the head alone) and what that module sees
    (images, or the frozen backbone's features), the same module as stepped (wrapped in DDP
    over several ranks, compiled with --compile), the optimizer with its schedule; and,
    throughout, the metrics history and where training stands (`at`).
    """

    def __init__(self, cfg: TrainConfig, model: Classifier, data: DeviceSplits, rt: Runtime,
                 report: Report):
        self.cfg, self.model, self.data, self.rt, self.report = cfg, model, data, rt, report
        self.history: list[dict] = []
        self.at = ResumePoint(phase=1, epoch=0)   # where training stands (checkpoint_state)
        self.restored: ResumePoint | None = None  # where it resumed, until an epoch records it
        self.eval_batch = max(cfg.phase1.batch_size, cfg.phase2.batch_size) // rt.world
        # The phase in progress (start_phase).
        self.phase = 0
        self.module = self.stepped = model
        self.train_x, self.val_x = data.train_x, data.val_x
        self.cached = False
        self.optim: engine.Optimization | None = None
        self.batch = self.steps = 0               # per rank; per epoch
        self.setup_seconds = 0.0                  # feature caching, counted in the 1st epoch
        self.last_train_seconds: float | None = None
        # Time blocked in `report` since the last metrics row (on rank 0: the checkpoint's
        # writing, Ray's report and the metrics files); after run(), the last report's.
        self.report_seconds = 0.0
        # The epoch in progress (run_epoch).
        self.midway: ResumePoint | None = None    # the mid-epoch checkpoint it went on from
        self.poll_every = 1
        self.epoch_t0 = self.last_line = 0.0

    def run(self, resume: dict | None = None) -> list[dict]:
        """Train both phases, reporting after every epoch; from the start, or from a
        checkpoint's state (`resume`), skipping what it had done. Returns the per-epoch
        metrics history (the epochs from before a resume included)."""
        start = ResumePoint(phase=0, epoch=0)  # phase 0: nothing done yet
        if resume is not None:
            self.model.load_state_dict(resume["model"])
            self.history = list(resume["history"])
            start = self.restored = ResumePoint.of(resume)
        for phase in (1, 2):
            epochs = self.cfg.phase(phase).epochs
            first = start.first_epoch(phase, epochs)
            if first is None:
                continue
            self.start_phase(phase, resume if start.phase == phase else None)
            for epoch in range(first, epochs):
                self.run_epoch(epoch, start if start.midway(phase, epoch) else None)
        return self.history

    def start_phase(self, phase: int, resume: dict | None) -> None:
        """Freeze or unfreeze for the phase, say what it trains on, and build what steps it:
        wrapped (and compiled) anew each phase, since DDP keeps the parameters it saw and
        each phase trains another module; the optimizer and its schedule, restored from
        `resume` (a checkpoint taken in this phase) when given."""
        cfg, rt = self.cfg, self.rt
        pc = cfg.phase(phase)
        # Steps per epoch from the global batch, not the rank's: the same at every world size
        # an elastic run goes through (train slices are equal), so the LR schedule and a
        # mid-epoch checkpoint's step mean the same after a resize. A size that does not
        # divide the batch rounds each rank's share down (config.TrainConfig allows it only
        # for elastic runs).
        self.phase, self.batch = phase, pc.batch_size // rt.world
        self.steps = len(self.data.train_y) * rt.world // pc.batch_size
        if self.steps == 0:
            raise ValueError(f"--phase{phase}-batch-size {pc.batch_size}: larger than the "
                             f"{len(self.data.train_y) * rt.world} training images")
        if pc.batch_size % rt.world and rt.rank == 0:
            log.warning(f"phase {phase} on {rt.world} workers: {self.batch} images each, a "
                        f"global batch of {self.batch * rt.world} (--phase{phase}-batch-size "
                        f"{pc.batch_size} does not divide by {rt.world})")
        set_phase(self.model, phase)
        self.module, self.train_x, self.val_x = self.model, self.data.train_x, self.data.val_x
        self.cached, self.setup_seconds = phase == 1 and cfg.caches_features(), 0.0
        if self.cached:
            self.cache_features()
        self.stepped = rt.wrap(self.module)
        if cfg.compile:
            self.stepped = compile_module(self.stepped, rt.device)
        self.optim = engine.Optimization.for_phase(pc, self.module.parameters(), self.steps,
                                                   rt.amp_dtype)
        if resume is not None:
            self.optim.load_state_dict(resume)
        self.last_train_seconds = None

    def cache_features(self) -> None:
        """Phase 1 on cached features: the frozen backbone (BatchNorm in eval mode, no
        augmentation) makes them a pure function of the image, so one backbone pass here
        replaces one per epoch, and the head trains on them alone."""
        t0 = time.perf_counter()
        plain = image_transform(self.cfg.image_size, self.rt)
        self.train_x, self.val_x = (
            engine.extract_features(self.model.backbone, x, batch_size=self.eval_batch,
                                    transform=plain, amp_dtype=self.rt.amp_dtype)
            for x in (self.data.train_x, self.data.val_x))
        self.module = self.model.head
        self.setup_seconds = self.rt.reduce([time.perf_counter() - t0], "max")[0]
        log.info(f"phase 1: cached backbone features for {len(self.data.train_y)} train + "
                 f"{len(self.data.val_y)} val images per worker in {self.setup_seconds:.1f} s")

    def run_epoch(self, epoch: int, midway: ResumePoint | None = None) -> None:
        """Train one epoch (from the step a mid-epoch checkpoint `midway` had reached),
        validate, record the epoch and report it with its checkpoint."""
        self.at, self.midway = ResumePoint(self.phase, epoch), midway
        # Seeded per (phase, epoch, rank): a resumed run replays the same order and crops.
        seed = ((self.cfg.seed * 3 + self.phase) * 1009 + epoch) * 1009 + self.rt.rank
        train_mode(self.model, self.phase)
        augment = plain = None  # cached features go to the head as they are
        if not self.cached:
            gen = torch.Generator(device=self.rt.device).manual_seed(seed + 1)
            augment = image_transform(self.cfg.image_size, self.rt,
                                      self.cfg.phase(self.phase).augment, gen)
            plain = image_transform(self.cfg.image_size, self.rt)
        batches = engine.batches(self.train_x, self.data.train_y, self.batch, augment,
                                 torch.Generator().manual_seed(seed))
        self.poll_every = poll_every(self.steps, self.last_train_seconds)
        self.epoch_t0 = self.last_line = time.monotonic()
        blocked = self.report_seconds  # a mid-epoch checkpoint's report counts as blocked
        try:
            tr = engine.train_one_epoch(self.stepped, batches, self.optim,
                                        start=midway.step if midway else 0,
                                        on_step=self.after_step)
        except torch.OutOfMemoryError:
            raise self.out_of_memory() from None
        # This worker-group start's own training (a mid-epoch resume carries the rest).
        tr["own_seconds"] = tr["seconds"] - (self.report_seconds - blocked)
        if midway:
            tr = carried(tr, midway.partial, self.rt.rank)
        self.at = ResumePoint(self.phase, epoch)  # the epoch is done (no mid-epoch step)
        t0 = time.perf_counter()
        va = engine.evaluate(self.module, engine.batches(self.val_x, self.data.val_y,
                                                         self.eval_batch, plain),
                             self.rt.amp_dtype)
        va["seconds"] = time.perf_counter() - t0
        metrics = self.epoch_metrics(tr, va)
        self.history.append(metrics)
        log.info(epoch_line(self.cfg, metrics))
        self.report_timed(metrics)

    def report_timed(self, metrics: dict) -> None:
        """Report (with the checkpoint), adding the time it blocked training to the next
        metrics row's checkpoint_seconds."""
        t0 = time.perf_counter()
        self.report(metrics, self.checkpoint_state)
        self.report_seconds += time.perf_counter() - t0

    def after_step(self, step: int, sums: Callable[[], dict]) -> None:
        """After each training step: rank 0's progress line every --progress-s seconds;
        every `poll_every` steps (on all ranks: a collective) the preemption poll, and on a
        notice, a checkpoint of this very step."""
        now = time.monotonic()
        progress = self.cfg.progress_s and self.rt.rank == 0
        if progress and now - self.last_line >= self.cfg.progress_s:
            self.last_line = now
            log.info(self.progress_line(step, now))
        poll = self.rt.preempted is not None and step % self.poll_every == 0
        if poll and self.rt.preempted():
            self.checkpoint_midway(step, sums())

    def checkpoint_midway(self, step: int, so_far: dict) -> None:
        """Report a checkpoint taken after `step` steps of the epoch, with the epoch's sums
        so far over all ranks, so that a resume from it records the whole epoch."""
        if self.midway:
            so_far = carried(so_far, self.midway.partial, self.rt.rank)
        total = self.rt.reduce([so_far["loss_sum"], so_far["correct"], so_far["count"]])
        partial = {"loss_sum": total[0], "correct": int(total[1]), "count": int(total[2]),
                   "seconds": self.rt.reduce([so_far["seconds"]], "max")[0],
                   "lr_start": so_far["lr_start"], "lr_end": so_far["lr_end"]}
        epoch = self.at.epoch
        self.at = ResumePoint(self.phase, epoch, step, partial)
        log.warning(f"preemption notice: checkpointing phase {self.phase} epoch {epoch + 1} "
                    f"at step {step}")
        self.report_timed({"phase": self.phase, "epoch": epoch, "step": step,
                           "val_acc": float("nan")})

    def checkpoint_state(self) -> dict:
        """What a report's checkpoint holds: where training stands, with everything a
        resume from there needs (checkpoint.state)."""
        return checkpoint.state(self.model, self.optim, self.at, self.history, self.cfg)

    def epoch_metrics(self, tr: dict, va: dict) -> dict:
        """One metrics.jsonl row: sums over every rank, the slowest rank's times (the keys
        are runs.py's)."""
        rt = self.rt
        sums = rt.reduce([tr["loss_sum"], tr["correct"], tr["count"],
                          va["loss_sum"], va["correct"], va["count"]])
        train_seconds, own_seconds, eval_seconds = rt.reduce(
            [tr["seconds"], tr["own_seconds"], va["seconds"]], "max")
        self.last_train_seconds = train_seconds  # the same on every rank (reduced)
        row = {
            "phase": self.phase, "epoch": self.at.epoch, "global_epoch": len(self.history) + 1,
            "train_loss": sums[0] / sums[2], "train_acc": sums[1] / sums[2],
            "val_loss": sums[3] / max(sums[5], 1), "val_acc": sums[4] / max(sums[5], 1),
            # The LR of the epoch's first and last step (a cosine phase ends near 0).
            "lr_start": tr["lr_start"], "lr_end": tr["lr_end"],
            "seconds": train_seconds + self.setup_seconds,
            "images_per_s": sums[2] / max(train_seconds, 1e-9), "feature_cache": self.cached,
            # The world size this start of the workers trained the epoch at (an elastic run's
            # changes; an epoch resumed mid-way counts the size that finished it).
            "workers": rt.world,
            # Where the time went (timeline.py): this worker-group start's own share.
            "train_seconds": own_seconds, "feature_cache_seconds": self.setup_seconds,
            "eval_seconds": eval_seconds, "checkpoint_seconds": self.report_seconds,
            "finished_at": time.time(),
        }
        self.setup_seconds = self.report_seconds = 0.0  # each counted once
        if self.restored is not None:  # the first epoch after a restore says where from
            row["restored_from"], self.restored = self.restored.record(), None
        return row

    def progress_line(self, step: int, now: float) -> str:
        done = step - (self.midway.step if self.midway else 0)
        rate = done / max(now - self.epoch_t0, 1e-9)  # steps/s since this attempt's start
        return (f"[phase {self.phase} epoch {self.at.epoch + 1}/"
                f"{self.cfg.phase(self.phase).epochs}] step {step}/{self.steps} | "
                f"{rate * self.batch * self.rt.world:.0f} img/s | "
                f"epoch ETA {(self.steps - step) / max(rate, 1e-9):.0f} s")

    def out_of_memory(self) -> BatchTooLargeError:
        """What to change when a phase's batch does not fit, with the memory seen (instead
        of the allocator's traceback)."""
        rt, phase, seen = self.rt, self.phase, ""
        if rt.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(rt.device)
            seen = (f" ({torch.cuda.get_device_name(rt.device)}: {total / 2**30:.1f} GiB, "
                    f"{torch.cuda.max_memory_allocated(rt.device) / 2**30:.1f} GiB at its "
                    f"peak in this process, {free / 2**30:.1f} GiB free after the failure)")
        return BatchTooLargeError(
            f"--phase{phase}-batch-size {self.cfg.phase(phase).batch_size}: {self.batch} "
            f"images per worker at --image-size {self.cfg.image_size} do not fit in "
            f"{rt.device}'s memory{seen}. Use a smaller --phase{phase}-batch-size (scaling "
            f"--phase{phase}-lr with it), more --workers, or a smaller --image-size.")


def poll_every(steps: int, last_train_seconds: float | None) -> int:
    """Steps between preemption polls: about PREEMPTION_POLL_S apart, at least 4 an epoch."""
    most = max(1, steps // 4)
    if not last_train_seconds:
        return most
    return max(1, min(most, int(PREEMPTION_POLL_S * steps / last_train_seconds)))


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
    what pays (docs/gpu.md has the figures; inductor's default mode alone was slower than
    eager there). The batch shape is fixed (only full batches), so one graph per phase. On
    CPU there are no CUDA graphs: the default mode."""
    # A fresh Dynamo cache: both phases (and every run in a process) start from static
    # shapes, instead of recompiling with dynamic ones after a shape change.
    torch.compiler.reset()
    return torch.compile(module, mode="reduce-overhead" if device.type == "cuda" else None)


def epoch_line(cfg: TrainConfig, m: dict) -> str:
    epochs = cfg.phase(m["phase"]).epochs
    eta = m["seconds"] * (epochs - m["epoch"] - 1)
    return (f"[phase {m['phase']} epoch {m['epoch'] + 1}/{epochs} | "
            f"{m['global_epoch']}/{cfg.phase1.epochs + cfg.phase2.epochs}] "
            f"train loss {m['train_loss']:.4f} acc {m['train_acc']:.4f} | "
            f"val loss {m['val_loss']:.4f} acc {m['val_acc']:.4f} | "
            f"lr {m['lr_start']:.2e} -> {m['lr_end']:.2e} | {m['images_per_s']:.0f} img/s | "
            f"{m['seconds']:.1f} s | phase ETA {eta:.0f} s")
