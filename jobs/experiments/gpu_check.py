"""The GPU path, proven in one command: correctness on the device, speed per image size,
and (when Ray is importable) real TorchTrainer runs. Prints a table and writes JSON.

    PYTHONPATH=. python jobs/experiments/gpu_check.py --out results/gpu_check.json  # 1 GPU: < 6 min
    PYTHONPATH=. python jobs/experiments/gpu_check.py --device cpu --tiny           # CPU, seconds

Needs torch, torchvision, numpy and pyarrow; nothing is installed or fetched, and Ray or
boto3 are used only if importable. Checks (cifar_ray/devicecheck.py): a two-phase run with
bf16 autocast + channels_last has finite losses and leaves the backbone bit-identical in
phase 1; cached features equal float32 ones within bf16 tolerance; augmentation on the
device is seeded; a checkpoint written there loads on CPU with the same predictions. Speed,
per image size: phase-1 feature extraction and phase-2 training images/s (the recipe's eager
step; the same without fused AdamW and cuDNN autotuning; compiled, as --compile does), peak
memory at the default batch, the largest batch that fits at 224 px, and model FLOP
utilisation against the chip's bf16 peak. With Ray: the default recipe (10 + 10 epochs at
32 px, 49,000 synthetic images) through jobs/train.py, eager and --compile. Work is ordered
most telling first and --budget-s stops new work, so the JSON (written after every step)
always holds the most important figures.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo, without an install

import common  # noqa: E402  (this folder's shared helpers)
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from cifar_ray import data, devicecheck, engine, model, recipe, runs, timeline  # noqa: E402
from cifar_ray.config import PhaseConfig, PrepareConfig  # noqa: E402

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, by device name.
BF16_PEAK = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12,
             "L40S": 362e12, "A10G": 70e12, "L4": 121e12}


def peak_flops(device: torch.device) -> tuple[str, float | None]:
    name = common.device_name(device)
    if device.type != "cuda":
        return name, None
    return name, next((v for k, v in BF16_PEAK.items() if k in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_flops(size: int) -> float:
    """Model FLOPs of one image's forward pass at size x size (counted, not estimated)."""
    m = model.Classifier().eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        m(torch.zeros(2, 3, size, size))
    return counter.get_total_flops() / 2


def images(device: torch.device, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8).to(device)


def feature_speed(device: torch.device, size: int, batch: int, n: int) -> float:
    """Phase-1 feature extraction (frozen backbone, bf16), images/s."""
    m = model.build("none").to(device).to(memory_format=torch.channels_last)
    x = images(device, n)
    rt = devicecheck.production_runtime(device)

    def transform(b):
        return engine.preprocess(b, size, rt.channels_last)

    engine.extract_features(m.backbone, x[:batch], batch_size=batch, transform=transform,
                            amp_dtype=rt.amp_dtype)  # warm-up: cuDNN picks its kernels
    sync(device)
    t0 = time.perf_counter()
    engine.extract_features(m.backbone, x, batch_size=batch, transform=transform,
                            amp_dtype=rt.amp_dtype)
    sync(device)
    return n / (time.perf_counter() - t0)


def train_speed(device: torch.device, size: int, batch: int, steps: int, variant: str,
                warmup: int = 3) -> dict:
    """Phase-2 training steps (whole model, augmentation, bf16, AdamW), images/s after
    `warmup` steps (which include compilation), and the peak memory of the steps.
    variant: "eager" (the recipe's: fused AdamW on CUDA, cuDNN autotuned), "compiled" (the
    same plus torch.compile with CUDA graphs, as --compile does) or "plain" (foreach AdamW,
    cuDNN's default heuristics: what the recipe did before it measured the other two)."""
    m = model.build("none").to(device).to(memory_format=torch.channels_last)
    model.set_phase(m, 2)
    m.train()
    rt = devicecheck.production_runtime(device)  # turns cuDNN autotuning on, as workers do
    torch.backends.cudnn.benchmark = variant != "plain"
    step_model = recipe.compile_module(m, device) if variant == "compiled" else m
    if variant == "plain":
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.05)
    else:
        opt = engine.make_optimizer(PhaseConfig(lr=1e-4, weight_decay=0.05), m.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    gen = torch.Generator(device=device).manual_seed(0)

    def transform(b):
        return engine.preprocess(engine.augment(b, gen), size, rt.channels_last)

    def run(n_steps: int) -> float:
        x = images(device, batch * n_steps)
        y = torch.randint(0, 10, (len(x),), device=device)
        sync(device)
        t0 = time.perf_counter()
        engine.train_one_epoch(step_model, engine.batches(x, y, batch, transform,
                                                          torch.Generator().manual_seed(0)),
                               engine.Optimization(opt, sched, nn.CrossEntropyLoss(),
                                                   rt.amp_dtype))
        sync(device)
        return time.perf_counter() - t0

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    first = run(warmup)
    out = {"warmup_s": first}
    for alongside in (False, True) if variant == "uploads" else (False,):
        with checkpoint_writer(m, opt) if alongside else contextlib.nullcontext() as w:
            seconds = run(steps)
        key = "images_per_s_writing" if alongside else "images_per_s"
        out[key] = batch * steps / seconds
        if alongside:
            out["checkpoints_written"] = w["written"]
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {**out, "peak_memory_gib": peak / 2**30 if peak is not None else None}


@contextlib.contextmanager
def checkpoint_writer(m: nn.Module, opt):
    """A thread that writes and 'uploads' (a local copy, digest last) the snapshot of a
    phase-2 checkpoint (weights + AdamW moments) over and over while the block trains: what
    an overlapped upload asks of the training process, continuously."""
    import pyarrow.fs as pafs

    from cifar_ray import checkpoint

    snap = checkpoint.snapshot({"model": m.state_dict(), "optimizer": opt.state_dict()})
    stop, counts = threading.Event(), {"written": 0}

    def loop() -> None:
        with tempfile.TemporaryDirectory() as d:
            src, dst = os.path.join(d, "src"), os.path.join(d, "dst")
            os.makedirs(src)
            while not stop.is_set():
                checkpoint.write_dir(snap, src)
                checkpoint.upload_dir(src, pafs.LocalFileSystem(), dst, local=True)
                counts["written"] += 1
    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield counts
    finally:
        stop.set()
        t.join()


def largest_batch(device: torch.device, size: int, start: int, limit: int) -> int | None:
    """The largest power-of-two batch (from `start`, up to `limit`) whose training step fits."""
    fits, batch = None, start
    while batch <= limit:
        try:
            train_speed(device, size, batch, steps=1, variant="eager", warmup=1)
            fits = batch
        except torch.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
        batch *= 2
    return fits


def synthetic(work: str, tiny: bool) -> tuple[str, str]:
    """(data dir, size name): 49,000 synthetic training images (CIFAR-10's train split less
    the validation carve-out) at full size, 640 with --tiny; prepared once per check."""
    n, name = (640, "tiny") if tiny else (50000, "full")
    data_dir = os.path.join(work, f"data-{name}")
    if not os.path.exists(data_dir):
        data.prepare(PrepareConfig(source="synthetic", data=data_dir, dataset="synthetic",
                                   val_size=n // 5 if tiny else 1000, synthetic_size=n))
    return data_dir, name


def ray_job(device: torch.device, tiny: bool, work: str, script: str, run: str,
            flags: list[str]) -> Path:
    """jobs/<script>.py on the synthetic data, 1 worker on this device, storage on local
    disk; returns the run (or sweep) folder once it has succeeded."""
    data_dir, _ = synthetic(work, tiny)
    cmd = [*common.job(script), "--data", data_dir, "--dataset", "synthetic",
           "--storage", os.path.join(work, "runs"), "--name", run, "--workers", "1",
           "--weights", "none", "--use-gpu" if device.type == "cuda" else "--no-use-gpu",
           "--resource-timeout-s", "0", *flags]
    if tiny:
        cmd += ["--phase1-epochs", "1", "--phase2-epochs", "1", "--phase1-batch-size", "64",
                "--phase2-batch-size", "64", "--phase2-warmup-epochs", "0"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=common.REPO)
    folder = Path(work, "runs", run)
    if done.returncode != 0:
        raise devicecheck.CheckFailed(f"jobs/{script}.py exited {done.returncode}:\n"
                                      f"{done.stderr[-3000:]}")
    return folder


def ray_run(device: torch.device, tiny: bool, work: str, variant: str = "eager") -> dict:
    """jobs/train.py through a real TorchTrainer (1 worker, its GPU), checkpoints on disk.
    Full size: the default recipe (10 + 10 epochs, batch 256, 32 px) on 49,000 synthetic
    images. Variants: eager (uploads overlap training, the default), sync
    (--checkpoint-upload sync: training waits for each upload), compile (--compile)."""
    flags = {"eager": [], "sync": ["--checkpoint-upload", "sync"],
             "compile": ["--compile"]}[variant]
    t0 = time.perf_counter()
    folder = ray_job(device, tiny, work, "train",
                     f"gpu-check-{synthetic(work, tiny)[1]}-{variant}",
                     ["--cpus-per-worker", "1" if tiny else "8", *flags])
    summary = json.loads((folder / runs.RESULT).read_text())
    rows = [json.loads(line) for line in (folder / runs.METRICS).read_text().splitlines()]

    def phase(p: int) -> dict:
        mine = [r for r in rows if r["phase"] == p]
        return {"epochs": len(mine), "seconds": sum(r["seconds"] for r in mine),
                "epoch_images_per_s": [round(r["images_per_s"]) for r in mine],
                "blocked_s": [round(r["checkpoint_seconds"], 2) for r in mine]}

    return {"wall_s": time.perf_counter() - t0,
            "training_s": sum(r["seconds"] for r in rows),
            "phase1": phase(1), "phase2": phase(2),
            "evaluated_acc": summary["evaluated_acc"],
            "best_checkpoint": summary["best_checkpoint"],
            "timeline": summary["timeline"], "timeline_line": timeline.line(summary["timeline"])}


def ray_sweep(device: torch.device, tiny: bool, work: str) -> dict:
    """jobs/tune.py: four trials of one worker each sharing this one GPU
    (--gpus-per-worker 0.25), their shared phase 1 first; 2 + 3 epochs at full size."""
    t0 = time.perf_counter()
    flags = ["--gpus-per-worker", "0.25" if device.type == "cuda" else "1",
             "--cpus-per-worker", "1" if tiny else "3", "--scheduler", "fifo",
             "--lrs", "1e-5", "3e-5", "1e-4", "3e-4", "--max-concurrent-trials", "4"]
    if not tiny:
        flags += ["--phase1-epochs", "2", "--phase2-epochs", "3", "--phase2-warmup-epochs", "0"]
    folder = ray_job(device, tiny, work, "tune", "gpu-check-sweep", flags)
    best = json.loads((folder / "best.json").read_text())
    trials = []
    for path in sorted(folder.glob("trials/*/timeline.json")):
        trials.append({"trial": path.parent.name,
                       "line": timeline.line(json.loads(path.read_text()))})
    return {"wall_s": time.perf_counter() - t0, "best": {k: best.get(k) for k in
            ("trial", "lr", "best_val_acc", "evaluated_acc")},
            "timeline_line": timeline.line(best["timeline"]) if "timeline" in best else None,
            "trials": trials}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--tiny", action="store_true", help="few images and steps: seconds")
    ap.add_argument("--sizes", type=int, nargs="+", default=None,
                    help="image sizes to time, in this order (default 32 224 64 128; "
                         "--tiny: 32)")
    ap.add_argument("--compile-sizes", type=int, nargs="*", default=[32],
                    help="sizes that also get a compiled row (default 32, where compiling "
                         "pays; each compile of ResNet50 takes 30 s to 2 min)")
    ap.add_argument("--batch", type=int, default=None,
                    help="per-GPU batch for the speed rows (default 256, the recipe's; "
                         "--tiny: 16)")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled rows")
    ap.add_argument("--no-ray", action="store_true", help="skip the TorchTrainer runs")
    ap.add_argument("--uploads-only", action="store_true",
                    help="only phase-2 steps at 32 px with and without a checkpoint being "
                         "written alongside (what an overlapped upload costs the training)")
    ap.add_argument("--ray-only", action="store_true",
                    help="only the Ray runs: the default run, a sweep of four trials on one "
                         "GPU, --compile, then uploads that block training (sync)")
    ap.add_argument("--budget-s", type=float, default=330,
                    help="start nothing new after this many seconds: what is left is "
                         "reported as skipped (default 330: the whole check ends < 6 min)")
    ap.add_argument("--out", default="results/gpu_check.json")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: --device cuda, but torch sees no CUDA device "
                 f"(torch {torch.__version__}); use --device cpu --tiny on a CPU machine")
    device = torch.device(args.device)
    tiny = args.tiny
    sizes = args.sizes or ([32] if tiny else [32, 224, 64, 128])
    batch = args.batch or (16 if tiny else 256)
    steps = 2 if tiny else (300 if args.uploads_only else 50)
    deadline = time.monotonic() + args.budget_s
    name, peak = peak_flops(device)
    report = {"device": name, "bf16_peak_flops": peak, "torch": torch.__version__,
              "cuda": torch.version.cuda, "tiny": tiny, "batch": batch, "checks": {},
              "speed": {}, "skipped": []}
    rows: list[tuple[str, str, str]] = []
    failures = 0

    def save() -> None:  # after every step: a check cut short still leaves what it measured
        common.write_json(report, args.out, default=str, announce=False)

    def attempt(label: str, fn, *a, **kw):
        nonlocal failures
        if time.monotonic() > deadline:
            rows.append((label, "skipped", f"past --budget-s {args.budget_s:.0f}"))
            report["skipped"].append(label)
            return {"skipped": "time budget"}
        t0 = time.perf_counter()
        try:
            out = fn(*a, **kw)
            rows.append((label, "ok", f"{time.perf_counter() - t0:.1f} s"))
            return out
        except Exception as e:  # every check runs and reports; the exit status sums them up
            failures += 1
            rows.append((label, "FAILED", f"{type(e).__name__}: {str(e)[:120]}"))
            traceback.print_exc()
            return {"error": f"{type(e).__name__}: {e}"}
        finally:
            print(f"{label}: {rows[-1][1]} ({rows[-1][2]})", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            save()

    print(f"device: {name}; torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    n = 64 if tiny else 512
    for check, fn in ({} if args.ray_only or args.uploads_only
                      else devicecheck.CHECKS).items():
        report["checks"][check] = attempt(f"check: {check}", fn, device, n=n)

    compile_ok = not args.no_compile and not (tiny and device.type == "cpu")

    def speed(size: int) -> None:
        fwd = forward_flops(size)
        row = report["speed"][size] = {"forward_gflops_per_image": fwd / 1e9}
        row["features_images_per_s"] = attempt(
            f"{size} px: features", feature_speed, device, size, batch,
            n=batch * (8 if tiny else 100))
        variants = ["eager"] + (["plain"] if device.type == "cuda" else [])
        variants += ["compiled"] if compile_ok and size in args.compile_sizes else []
        for variant in variants:
            r = attempt(f"{size} px: phase-2 training, {variant}", train_speed, device, size,
                        batch, steps, variant)
            if "images_per_s" in r and peak:
                r["mfu"] = r["images_per_s"] * 3 * fwd / peak  # forward + 2x backward
            row[variant] = r

    ray_ok = not args.no_ray and importlib.util.find_spec("ray") is not None
    report["ray"] = ("skipped: " + ("--no-ray" if args.no_ray else "ray is not importable")
                     if not ray_ok else {})
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        if args.uploads_only:
            report["uploads"] = attempt("32 px: phase-2 training, writing alongside",
                                        train_speed, device, 32, batch, steps, "uploads")
            sizes = []
        if args.ray_only:
            # Most telling first: a 600-s device command fits about three of them.
            for key, fn, a in (("ray", ray_run, ()), ("ray_sync", ray_run, ("sync",)),
                               ("ray_sweep", ray_sweep, ()),
                               ("ray_compiled", ray_run, ("compile",))):
                if ray_ok and (key != "ray_compiled" or compile_ok):
                    report[key] = attempt(f"Ray: {key}", fn, device, tiny, work, *a)
            sizes = []
        # Most telling first, so that a short budget cuts the least: the sizes the targets
        # name, the largest batch, the real TorchTrainer run, then the rest.
        for size in sizes[:2]:
            speed(size)
        # --compile through recipe.PhaseLoop: both phases, CUDA graphs
        if compile_ok and not args.ray_only and not args.uploads_only:
            report["checks"]["two_phases_compiled"] = attempt(
                "check: two_phases, --compile", devicecheck.two_phases, device, n=n,
                compile=True)
        if device.type == "cuda" and not tiny and not args.ray_only and not args.uploads_only:
            report["largest_batch_224"] = attempt("224 px: largest batch", largest_batch,
                                                  device, 224, batch, 8192)
        if ray_ok and not args.ray_only and not args.uploads_only:
            report["ray"] = attempt("Ray: TorchTrainer via jobs/train.py", ray_run, device,
                                    tiny, work)
        for size in sizes[2:]:
            speed(size)
        if ray_ok and compile_ok and not args.ray_only and not args.uploads_only:
            report["ray_compiled"] = attempt("Ray: TorchTrainer via jobs/train.py --compile",
                                             ray_run, device, tiny, work, "compile")

    print()
    common.print_table("{:48} {:>7}  {}", ("check", "result", "detail"), rows)

    speed_rows = []
    for size in sorted(report["speed"]):
        r = report["speed"][size]
        plain, eager, comp = (r.get(k, {}) for k in ("plain", "eager", "compiled"))
        speed_rows.append((size, common.num(r["features_images_per_s"], 0),
                           common.num(plain.get("images_per_s"), 0),
                           common.num(eager.get("images_per_s"), 0),
                           common.num(comp.get("images_per_s"), 0),
                           common.num(eager.get("peak_memory_gib"), 2),
                           common.num(eager.get("mfu"), 3), common.num(comp.get("mfu"), 3)))
    print()
    common.print_table("{:>5} {:>15} {:>12} {:>8} {:>9} {:>9} {:>10} {:>10}",
                       ("size", "features img/s", "train plain", "eager", "compiled", "peak GiB",
                        "MFU eager", "MFU comp."), speed_rows)
    if "largest_batch_224" in report:
        print(f"largest per-GPU batch at 224 px: {report['largest_batch_224']}")
    for key in ("ray", "ray_compiled", "ray_sync"):
        r = report.get(key)
        if isinstance(r, dict) and "training_s" in r:
            print(f"{key}: {r['phase1']['epochs']} + {r['phase2']['epochs']} epochs at 32 px: "
                  f"{r['training_s']:.1f} s training ({r['phase2']['seconds']:.1f} s "
                  f"phase 2), {r['wall_s']:.0f} s wall\n  {r['timeline_line']}")
    r = report.get("uploads")
    if isinstance(r, dict) and "images_per_s_writing" in r:
        print(f"phase-2 steps at 32 px: {r['images_per_s']:.0f} img/s alone, "
              f"{r['images_per_s_writing']:.0f} img/s with a checkpoint written alongside "
              f"({r['checkpoints_written']} written)")
    r = report.get("ray_sweep")
    if isinstance(r, dict) and "trials" in r:
        print(f"ray_sweep: {len(r['trials'])} trials on one device, {r['wall_s']:.0f} s wall; "
              f"best {r['best']}\n  sweep: {r['timeline_line']}")
        for t in r["trials"]:
            print(f"  {t['trial']}: {t['line']}")
    save()
    print(f"wrote {args.out}; {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
