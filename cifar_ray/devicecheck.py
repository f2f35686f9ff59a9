"""Correctness of the production path on one device: what a GPU run relies on, checked in
seconds. Plain PyTorch: no Ray, no boto3.

    PYTHONPATH=. python jobs/experiments/gpu_check.py   # these checks + speed, on a GPU
    python -m pytest -q tests/test_devicecheck.py       # the same checks on CPU (and GPU)

Each check runs the code the job runs (recipe.PhaseLoop, engine, checkpoint) with the
settings a CUDA worker uses: bf16 autocast and channels_last (Runtime.for_device on CUDA;
on CPU the same settings are forced, since this CPU runs bf16 autocast too). Each returns
a dict of what it measured; a failed expectation raises CheckFailed naming it.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile

import torch

from cifar_ray import checkpoint, data, engine, model
from cifar_ray.config import PhaseConfig, TrainConfig
from cifar_ray.recipe import PhaseLoop
from cifar_ray.runtime import DeviceSplits, Runtime, image_transform


class CheckFailed(AssertionError):
    """A device check's expectation did not hold; the message says which and by how much."""


def expect(cond: bool, what: str) -> None:
    if not cond:
        raise CheckFailed(what)


def production_runtime(device: torch.device) -> Runtime:
    """A CUDA worker's settings (bf16 autocast, channels_last) on any device."""
    rt = Runtime.for_device(device)
    return dataclasses.replace(rt, amp_dtype=torch.bfloat16, channels_last=True)


def synthetic_splits(device: torch.device, n_train: int, n_val: int) -> DeviceSplits:
    return DeviceSplits.of(data.synthetic(n_train, seed=0), data.synthetic(n_val, seed=1),
                           device)


def small_config(batch: int = 32, image_size: int = 32, **kw) -> TrainConfig:
    return TrainConfig(weights="none", workers=1, image_size=image_size,
                       phase1=PhaseConfig(epochs=1, lr=1e-3, batch_size=batch),
                       phase2=PhaseConfig(epochs=1, lr=1e-4, batch_size=batch, augment=True),
                       **kw)


def _backbone_state(m: model.Classifier) -> dict[str, torch.Tensor]:
    """Every backbone tensor, BatchNorm running statistics included."""
    return {k: v.detach().clone() for k, v in m.backbone.state_dict().items()}


def layout_and_precision(device: torch.device, n: int = 8) -> dict:
    """What a worker's runtime does on this device: a single rank is not wrapped in DDP,
    inputs come out channels_last, and under autocast the logits are bf16."""
    rt = production_runtime(device)
    m = model.build("none", num_classes=10).to(device).to(memory_format=torch.channels_last)
    expect(rt.wrap(m) is m, "a single rank was wrapped (DDP needs a process group)")
    x = image_transform(32, rt, augment=True,
                        gen=torch.Generator(device=device).manual_seed(0))(
        synthetic_splits(device, n, 2).train_x)
    expect(x.is_contiguous(memory_format=torch.channels_last), "input not channels_last")
    with torch.no_grad(), torch.autocast(device_type=device.type, dtype=rt.amp_dtype):
        logits = m.eval()(x)
    expect(logits.dtype == torch.bfloat16, f"autocast gave {logits.dtype} logits")
    expect(x.device.type == device.type, f"input on {x.device}")
    return {"logits_dtype": str(logits.dtype)}


def two_phases(device: torch.device, n: int = 128, batch: int = 32,
               compile: bool = False) -> dict:
    """A two-phase run through recipe.PhaseLoop: finite losses; phase 1 leaves every
    backbone weight and BatchNorm statistic bit-identical (frozen, BN in eval mode) and
    phase 2 moves them."""
    m = model.build("none", num_classes=10).to(device).to(memory_format=torch.channels_last)
    before = _backbone_state(m)
    after: dict[int, dict] = {}

    def report(metrics: dict, state) -> None:  # the backbone as each phase's epoch left it
        after[metrics["phase"]] = _backbone_state(m)

    splits = synthetic_splits(device, n, n // 2)
    hist = PhaseLoop(small_config(batch, compile=compile), m, splits,
                     production_runtime(device), report).run()
    changed = [k for k in before if not torch.equal(before[k], after[1][k])]
    expect(not changed, f"phase 1 changed the frozen backbone: {changed[:3]}")
    moved = sum(not torch.equal(before[k], v) for k, v in after[2].items())
    expect(moved > 0, "phase 2 did not change the backbone")
    losses = [h[k] for h in hist for k in ("train_loss", "val_loss")]
    expect(all(math.isfinite(v) for v in losses), f"non-finite loss in {losses}")
    return {"losses": losses, "backbone_tensors": len(before), "phase2_changed": moved}


def cached_features(device: torch.device, n: int = 96, batch: int = 32) -> dict:
    """Phase 1's cached features (one bf16 pass in batches) equal the backbone's output on
    the same images computed in float32, within bf16's tolerance."""
    rt = production_runtime(device)
    cfg = small_config(batch)
    m = model.build("none", num_classes=10).to(device).to(memory_format=torch.channels_last)
    m.eval()
    x = synthetic_splits(device, n, 2).train_x
    plain = image_transform(cfg.image_size, rt)
    cached = engine.extract_features(m.backbone, x, batch_size=batch, transform=plain,
                                     amp_dtype=rt.amp_dtype)
    with torch.no_grad():
        exact = m.backbone(plain(x)).float()
    err = ((cached - exact).norm() / exact.norm()).item()
    expect(cached.shape == exact.shape == (n, model.FEATURES), f"shape {cached.shape}")
    expect(err < 0.02, f"cached features differ from float32 ones by {err:.4f} (relative)")
    return {"relative_error": err}


def augmentation(device: torch.device, n: int = 64) -> dict:
    """Augmentation on the device is seeded: the same seed gives the same batch, another
    seed another; crops and flips only move pixels."""
    x = synthetic_splits(device, n, 2).train_x

    def run(seed: int) -> torch.Tensor:
        return engine.augment(x, torch.Generator(device=device).manual_seed(seed))

    a, b, c = run(1), run(1), run(2)
    expect(a.device.type == device.type and a.dtype == torch.uint8, f"{a.device} {a.dtype}")
    expect(torch.equal(a, b), "same seed, different augmentation")
    expect(not torch.equal(a, c), "different seeds, same augmentation")
    return {"images": n}


def checkpoint_to_cpu(device: torch.device, n: int = 64) -> dict:
    """A checkpoint written from the device loads on CPU and predicts the same classes."""
    m = model.build("none", num_classes=10, seed=3).to(device)
    m.eval()
    x = synthetic_splits(device, n, 2).train_x
    plain = image_transform(32, Runtime(device=device))
    # float32 on both sides: cuDNN's default TF32 convolutions would differ from the CPU's
    # by more than a checkpoint round trip may.
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        here = m(plain(x)).float().cpu()
    with tempfile.TemporaryDirectory() as d:
        checkpoint.write_dir({"model": m.state_dict(), "phase": 2, "epoch": 0}, d)
        cpu_model, state = checkpoint.load_classifier(d, "cpu")  # as evaluate and predict do
    expect(all(t.device.type == "cpu" for t in state["model"].values()), "not loaded on CPU")
    with torch.no_grad():
        there = cpu_model(engine.preprocess(x.cpu())).float()
    agree = (here.argmax(1) == there.argmax(1)).float().mean().item()
    diff = (here - there).abs().max().item()
    expect(agree >= 0.98, f"CPU and {device} predictions agree on {agree:.1%} only")
    expect(diff < 1e-2, f"logits differ by up to {diff:.2e}")
    return {"agreement": agree, "max_logit_diff": diff}


CHECKS = {"layout_and_precision": layout_and_precision, "two_phases": two_phases,
          "cached_features": cached_features, "augmentation": augmentation,
          "checkpoint_to_cpu": checkpoint_to_cpu}
