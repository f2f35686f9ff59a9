"""The two-phase schedule: frozen-backbone head training, then full fine-tuning.

    python -m pytest tests/test_recipe.py      # runs it without Ray, on CPU

`run_phases` is plain PyTorch. Distribution enters only through the `Runtime` it is given
(DDP wrapping and an all-reduce: identity in a single process) and reporting through the
`report` callback, so the Ray glue in train.py stays small and this stays testable.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from cifar_ray import engine
from cifar_ray.config import TrainConfig
from cifar_ray.model import Classifier, set_phase, train_mode


def _identity(module: nn.Module) -> nn.Module:
    return module


def _no_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    return t


@dataclass
class Runtime:
    """Where and how this process trains. The defaults describe a single CPU process."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    world: int = 1
    wrap: Callable[[nn.Module], nn.Module] = _identity      # DDP under Ray
    all_reduce: Callable[..., torch.Tensor] = _no_reduce    # (tensor, op) across ranks
    amp_dtype: torch.dtype | None = None                    # bf16 on CUDA
    channels_last: bool = False                             # on CUDA

    def reduce(self, values: list[float], op: str = "sum") -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        return self.all_reduce(t, op).tolist()


@dataclass
class Data:
    """This rank's images (uint8 [N, 3, 32, 32]) and labels on the training device."""

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


def run_phases(cfg: TrainConfig, model: Classifier, data: Data, rt: Runtime, report: Report,
               resume: dict | None = None, log: Callable[[str], None] = print) -> list[dict]:
    """Train both phases, reporting after every epoch. `resume` is a checkpoint state (as
    built by the state thunk) to continue from: its phase and epoch are skipped. Returns the
    per-epoch metrics history (including epochs from before a resume)."""
    history: list[dict] = list(resume["history"]) if resume else []
    restored_from = None
    if resume:
        model.load_state_dict(resume["model"])
        restored_from = {"phase": resume["phase"], "epoch": resume["epoch"]}
    eval_batch = max(cfg.phase1.batch_size, cfg.phase2.batch_size) // rt.world
    total_epochs = cfg.phase1.epochs + cfg.phase2.epochs
    for phase in (1, 2):
        pc = cfg.phase(phase)
        start_epoch = 0
        if resume and resume["phase"] > phase:
            continue
        if resume and resume["phase"] == phase:
            start_epoch = resume["epoch"] + 1
        if start_epoch >= pc.epochs:
            continue
        per_rank_batch = pc.batch_size // rt.world
        steps = len(data.train_y) // per_rank_batch
        if steps == 0:
            raise ValueError(f"--phase{phase}-batch-size {pc.batch_size}: larger than the "
                             f"{len(data.train_y) * rt.world} training images")
        set_phase(model, phase)
        cached = phase == 1 and cfg.caches_features()
        if cached:
            # Frozen backbone + BN in eval + no augmentation: features are a pure function
            # of the image, so one backbone pass replaces one per epoch.
            t0 = time.perf_counter()
            plain = image_transform(cfg, rt, augment=False, gen=None)
            feats = {k: engine.extract_features(model.backbone, x, batch_size=eval_batch,
                                                transform=plain, amp_dtype=rt.amp_dtype)
                     for k, x in (("train", data.train_x), ("val", data.val_x))}
            feature_seconds = rt.reduce([time.perf_counter() - t0], "max")[0]
            log(f"phase 1: cached backbone features for {len(data.train_y)} train + "
                f"{len(data.val_y)} val images per worker in {feature_seconds:.1f} s")
            module, train_x, val_x = model.head, feats["train"], feats["val"]
            transform_train = transform_eval = _identity
        else:
            feature_seconds = 0.0
            module, train_x, val_x = model, data.train_x, data.val_x
            transform_eval = image_transform(cfg, rt, augment=False, gen=None)
        wrapped = rt.wrap(module)  # (re)wrapped per phase: DDP keeps the params it saw
        optimizer = engine.make_optimizer(pc, module.parameters())
        scheduler = engine.make_scheduler(optimizer, pc, steps)
        if resume and resume["phase"] == phase:
            optimizer.load_state_dict(resume["optimizer"])
            scheduler.load_state_dict(resume["scheduler"])
        loss_fn = nn.CrossEntropyLoss(label_smoothing=pc.label_smoothing)
        for epoch in range(start_epoch, pc.epochs):
            # Seeded per (phase, epoch, rank): a resumed run replays the same order.
            epoch_seed = ((cfg.seed * 3 + phase) * 1009 + epoch) * 1009 + rt.rank
            gen_cpu = torch.Generator().manual_seed(epoch_seed)
            gen_dev = torch.Generator(device=rt.device).manual_seed(epoch_seed + 1)
            if not cached:
                transform_train = image_transform(cfg, rt, pc.augment, gen_dev)
            if cached:
                module.train()
            else:
                train_mode(model, phase)
            tr = engine.train_one_epoch(wrapped, train_x, data.train_y, batch_size=per_rank_batch,
                                        optimizer=optimizer, scheduler=scheduler, loss_fn=loss_fn,
                                        transform=transform_train, gen=gen_cpu,
                                        amp_dtype=rt.amp_dtype)
            lr = optimizer.param_groups[0]["lr"]  # where the schedule stands after this epoch
            va = engine.evaluate(module, val_x, data.val_y, batch_size=eval_batch,
                                 transform=transform_eval, amp_dtype=rt.amp_dtype)
            sums = rt.reduce([tr["loss_sum"], tr["correct"], tr["count"],
                              va["loss_sum"], va["correct"], va["count"]])
            train_seconds = rt.reduce([tr["seconds"]], "max")[0]
            seconds = train_seconds + (feature_seconds if epoch == start_epoch else 0.0)
            metrics = {
                "phase": phase, "epoch": epoch, "global_epoch": len(history) + 1,
                "train_loss": sums[0] / sums[2], "train_acc": sums[1] / sums[2],
                "val_loss": sums[3] / max(sums[5], 1), "val_acc": sums[4] / max(sums[5], 1),
                "lr": lr, "seconds": seconds, "images_per_s": sums[2] / max(train_seconds, 1e-9),
                "feature_cache": cached,
            }
            if restored_from is not None:
                # Marks the first epoch after a restore: a record of where training resumed.
                metrics["restored_from"], restored_from = restored_from, None
            history.append(metrics)
            eta = seconds * (pc.epochs - epoch - 1)
            log(f"[phase {phase} epoch {epoch + 1}/{pc.epochs} | {len(history)}/{total_epochs}] "
                f"train loss {metrics['train_loss']:.4f} acc {metrics['train_acc']:.4f} | "
                f"val loss {metrics['val_loss']:.4f} acc {metrics['val_acc']:.4f} | "
                f"lr {lr:.2e} | {metrics['images_per_s']:.0f} img/s | {seconds:.1f} s | "
                f"phase ETA {eta:.0f} s")

            def state(phase=phase, epoch=epoch, optimizer=optimizer, scheduler=scheduler) -> dict:
                return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "phase": phase, "epoch": epoch,
                        "history": list(history), "config": cfg.to_dict()}

            report(metrics, state)
    return history


@torch.no_grad()
def evaluate_split(model: Classifier, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
                   rt: Runtime, batch_size: int = 512) -> dict:
    """Loss, accuracy and predictions of `model` on one split (no augmentation)."""
    out = engine.evaluate(model, x, y, batch_size=batch_size,
                          transform=image_transform(cfg, rt, augment=False, gen=None),
                          amp_dtype=rt.amp_dtype, return_predictions=True)
    n = max(out["count"], 1)
    return {"loss": out["loss_sum"] / n, "accuracy": out["correct"] / n, "count": out["count"],
            "predictions": out["predictions"]}
