"""Plain PyTorch: batched augmentation, preprocessing, one training epoch, evaluation.

    python -m pytest tests/test_engine.py

Nothing here knows about Ray. Data arrives as whole uint8 tensors already on the device;
augmentation works on whole batches with tensor ops (no per-image Python), so the same code
runs on CPU in tests and on a GPU in production.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cifar_ray.config import PhaseConfig

# ImageNet statistics: what the pretrained backbone's first layer expects.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def to_tensor(images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 [N, H, W, 3] (as stored) -> uint8 [N, 3, H, W] on `device` (4x smaller than
    float: the whole CIFAR-10 train split is 150 MB this way)."""
    x = torch.from_numpy(np.ascontiguousarray(images))
    return x.permute(0, 3, 1, 2).contiguous().to(device)


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with zero padding + horizontal flip, per image, for a whole uint8 batch
    [B, C, H, W] in a handful of kernels. `gen` lives on x's device."""
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen, device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen, device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]   # [B, H, 1]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]   # [B, 1, W]
    batch = torch.arange(b, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows, cols]                     # [B, H, W, C]
    flip = torch.rand(b, generator=gen, device=x.device) < 0.5
    out = torch.where(flip[:, None, None, None], out.flip(2), out)
    return out.permute(0, 3, 1, 2).contiguous()


def preprocess(x: torch.Tensor, image_size: int = 32, channels_last: bool = False) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> normalised float, upsampled on the device when asked."""
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    x = (x.float().div_(255) - mean) / std
    if image_size != x.shape[-1]:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def batch_indices(n: int, batch_size: int, gen: torch.Generator | None = None,
                  drop_last: bool = False) -> Iterator[torch.Tensor]:
    """Index batches over n items: shuffled when a (CPU) generator is given."""
    order = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for i in range(0, stop, batch_size):
        yield order[i:i + batch_size]


def make_optimizer(pc: PhaseConfig, params) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    # On CUDA, Adam(W)'s fused kernel updates all ~160 ResNet50 tensors in a few launches
    # instead of a loop of foreach kernels (jobs/experiments/gpu_check.py times both).
    fused = {"fused": True} if params and params[0].is_cuda else {}
    if pc.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=pc.lr, weight_decay=pc.weight_decay, **fused)
    if pc.optimizer == "adam":
        return torch.optim.Adam(params, lr=pc.lr, weight_decay=pc.weight_decay, **fused)
    return torch.optim.SGD(params, lr=pc.lr, momentum=pc.momentum, weight_decay=pc.weight_decay,
                           nesterov=pc.momentum > 0)


def make_scheduler(opt: torch.optim.Optimizer, pc: PhaseConfig, steps_per_epoch: int):
    """Per-step linear warmup then cosine decay to zero over the phase."""
    total = max(1, pc.epochs * steps_per_epoch)
    warmup = int(pc.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _autocast(x: torch.Tensor, amp_dtype: torch.dtype | None):
    """bf16 autocast on CUDA in production; tests run the same path on CPU tensors."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=x.device.type, dtype=amp_dtype)


def train_one_epoch(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, *,
                    batch_size: int, optimizer: torch.optim.Optimizer, scheduler,
                    loss_fn: nn.Module, transform: Callable[[torch.Tensor], torch.Tensor],
                    gen: torch.Generator, amp_dtype: torch.dtype | None = None,
                    start: int = 0,
                    on_step: Callable[[int, Callable[[], dict]], None] | None = None) -> dict:
    """One pass over (inputs, labels) in shuffled batches; returns sums, so that ranks can
    add them up: loss_sum, correct, count, seconds; and the LR of the first and the last step
    (lr_start, lr_end: the range the epoch trained with).

    `start` steps were done before (a resume from a checkpoint taken mid-epoch): they are
    skipped. `on_step(step, sums)` is called after every step with the steps done so far and a
    function giving the sums so far (it syncs with the device: call it only when they are
    needed)."""
    loss_sum = torch.zeros((), device=inputs.device)
    correct = torch.zeros((), device=inputs.device, dtype=torch.long)
    count = 0
    lr_start = lr_end = None
    t0 = time.perf_counter()

    def sums() -> dict:
        return {"loss_sum": float(loss_sum), "correct": int(correct), "count": count,
                "seconds": time.perf_counter() - t0, "lr_start": lr_start, "lr_end": lr_end}

    for step, idx in enumerate(batch_indices(len(labels), batch_size, gen, drop_last=True), 1):
        idx = idx.to(inputs.device, non_blocking=True)
        if step <= start:
            # Done before the checkpoint. Its augmentation is drawn again and thrown away so
            # that the rest of the epoch gets the crops and flips it would have had.
            transform(inputs[idx])
            continue
        lr_end = optimizer.param_groups[0]["lr"]  # a host float: no device sync
        lr_start = lr_end if lr_start is None else lr_start
        x, y = transform(inputs[idx]), labels[idx]
        with _autocast(x, amp_dtype):
            logits = model(x)
            loss = loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        # Accumulate on the device: no host sync per step.
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
        count += len(y)
        if on_step is not None:
            on_step(step, sums)
    if inputs.device.type == "cuda":
        torch.cuda.synchronize(inputs.device)
    return sums()


@torch.no_grad()
def evaluate(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, *, batch_size: int,
             transform: Callable[[torch.Tensor], torch.Tensor],
             amp_dtype: torch.dtype | None = None, return_predictions: bool = False) -> dict:
    """Cross-entropy sum, correct count and count over (inputs, labels); model in eval mode."""
    was_training = model.training
    model.eval()
    loss_sum, correct, preds = 0.0, 0, []
    for idx in batch_indices(len(labels), batch_size):
        idx = idx.to(inputs.device)
        x, y = transform(inputs[idx]), labels[idx]
        with _autocast(x, amp_dtype):
            logits = model(x).float()
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        pred = logits.argmax(1)
        correct += int((pred == y).sum())
        if return_predictions:
            preds.append(pred.cpu())
    model.train(was_training)
    out = {"loss_sum": loss_sum, "correct": correct, "count": len(labels)}
    if return_predictions:
        out["predictions"] = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)
    return out


@torch.no_grad()
def extract_features(backbone: nn.Module, images: torch.Tensor, *, batch_size: int,
                     transform: Callable[[torch.Tensor], torch.Tensor],
                     amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Frozen-backbone features [N, 2048] in float32 (eval mode: BatchNorm uses its running
    statistics, exactly as the frozen backbone does in phase-1 training)."""
    was_training = backbone.training
    backbone.eval()
    out = []
    for idx in batch_indices(len(images), batch_size):
        x = transform(images[idx.to(images.device)])
        with _autocast(x, amp_dtype):
            out.append(backbone(x).float())
    backbone.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 2048, device=images.device)
