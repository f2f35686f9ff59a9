"""ASHA with a shared phase 1 against a plain FIFO grid, side by side on a real CIFAR-10 subset.

    python jobs/experiments/benchmark_tune.py --source-uri ../shared/data/cifar10-train-jpeg.tar.gz

Both sweeps run the same LRs, recipe, seed and concurrency through `jobs/tune.py` (each in its
own process with its own local Ray instance, one after the other):
  grid: --scheduler fifo --no-share-phase1   every trial runs phase 1 and all phase-2 epochs
  asha: --scheduler asha (shared phase 1)    phase 1 once, ASHA stops weak LRs early
Compute is counted from what the sweeps stored: trial-epochs (phase-1 epochs that ran plus
phase-2 epochs per trial) and the summed seconds of those epochs; wall time is the driver's.
Target: ASHA <= 0.35 of the grid's trial-epochs, with its best val accuracy within 1 point.
Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo, without an install

import common  # noqa: E402  (this folder's shared helpers)

from cifar_ray import data, runs, storage  # noqa: E402
from cifar_ray.config import PrepareConfig  # noqa: E402


def compute(exp: str, shared: bool) -> dict:
    """Epochs that actually ran, read back from storage. A shared-phase-1 trial's history
    starts with copies of the phase-1 rows it was restored from: those are not counted."""
    p1 = runs.read_metrics(storage.join(exp, runs.PHASE1))
    trials = storage.join(exp, runs.TRIALS)
    ran = list(p1)
    per_trial = {}
    for name, (_, history) in runs.read_runs(trials).items():
        rows = [r for r in history if r["phase"] == 2 or not shared]
        ran += rows
        per_trial[name] = sum(r["phase"] == 2 for r in rows)
    return {"trial_epochs": len(ran), "phase1_epochs": sum(r["phase"] == 1 for r in ran),
            "phase2_epochs": sum(r["phase"] == 2 for r in ran),
            "epoch_seconds": sum(r["seconds"] for r in ran), "phase2_epochs_per_trial": per_trial}


def run_sweep(name: str, flags: list[str], extra: list[str], exp: str, shared: bool,
              env: dict) -> dict:
    cmd = [*common.job("tune"), "--name", name, *flags, *extra]
    print("$", " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=common.REPO, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"{name} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    best = runs.read_json(storage.join(exp, runs.BEST))
    return {"wall_s": wall, **compute(exp, shared), "best_lr": best["lr"],
            "best_val_acc": best["best_val_acc"], "evaluated_acc": best["evaluated_acc"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source-uri", default=str(common.REPO.parent / "shared" / "data" /
                                                "cifar10-train-jpeg.tar.gz"))
    ap.add_argument("--per-class", type=int, default=200,
                    help="real images per class (val takes --val-size of them)")
    ap.add_argument("--val-size", type=int, default=1000)
    ap.add_argument("--lrs", type=float, nargs="+",
                    default=[1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2])
    ap.add_argument("--phase1-epochs", type=int, default=3)
    ap.add_argument("--phase2-epochs", type=int, default=8)
    # Small batches: ~30 steps per epoch on 1,000 images, so an LR shows its effect within
    # the first epoch (the rung where ASHA first decides) instead of after several.
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--reduction-factor", type=int, default=4)
    ap.add_argument("--concurrent", type=int, default=None,
                    help="trials at once, 1 worker each (default: all of them)")
    ap.add_argument("--work", default=None, help="folder for data and sweeps (default: temp)")
    ap.add_argument("--out", default="results/benchmark_tune.json")
    args = ap.parse_args()

    concurrent = args.concurrent or len(args.lrs)
    # As on a cluster with a GPU per trial, every trial runs at once: the local instance
    # gets one logical CPU per trial (Ray's own override), and the trials' single-threaded
    # workers share the physical cores. Both sweeps run the same way.
    env = {**os.environ, "RAY_OVERRIDE_RESOURCES": json.dumps({"CPU": concurrent})}
    work = args.work or tempfile.mkdtemp(prefix="cifar-ray-bench-tune-")
    data.prepare(PrepareConfig(source="folder", source_uri=args.source_uri, data=work,
                               dataset="bench", val_size=args.val_size,
                               max_per_class=args.per_class))
    sweeps = os.path.join(work, "sweeps")
    flags = ["--data", work, "--dataset", "bench", "--storage", sweeps, "--weights", "none",
             "--workers", "1", "--cpus-per-worker", "1",
             "--max-concurrent-trials", str(concurrent),
             "--phase1-epochs", str(args.phase1_epochs),
             "--phase2-epochs", str(args.phase2_epochs),
             "--phase1-batch-size", str(args.batch_size),
             "--phase2-batch-size", str(args.batch_size), "--phase2-warmup-epochs", "0.5",
             "--lrs", *map(str, args.lrs)]
    grid = run_sweep("grid", flags, ["--scheduler", "fifo", "--no-share-phase1"],
                     os.path.join(sweeps, "grid"), shared=False, env=env)
    asha = run_sweep("asha", flags, ["--scheduler", "asha", "--grace-period", "1",
                                     "--reduction-factor", str(args.reduction_factor)],
                     os.path.join(sweeps, "asha"), shared=True, env=env)
    ratio = asha["trial_epochs"] / grid["trial_epochs"]
    gap = (grid["best_val_acc"] - asha["best_val_acc"]) * 100
    results = {"train_images": args.per_class * 10 - args.val_size, "val_images": args.val_size,
               "lrs": args.lrs, "phase1_epochs": args.phase1_epochs,
               "phase2_epochs": args.phase2_epochs, "batch_size": args.batch_size,
               "reduction_factor": args.reduction_factor,
               "concurrent_trials": concurrent, "cpus": os.cpu_count(),
               "grid": grid, "asha": asha,
               "trial_epochs_ratio": ratio,
               "epoch_seconds_ratio": asha["epoch_seconds"] / grid["epoch_seconds"],
               "wall_ratio": asha["wall_s"] / grid["wall_s"],
               "best_val_acc_gap_points": gap,
               "target": "trial_epochs_ratio <= 0.35 and gap <= 1 point"}

    print(f"\n{results['train_images']} train / {args.val_size} val real images, "
          f"{len(args.lrs)} LRs, {args.phase1_epochs} + {args.phase2_epochs} epochs, "
          f"{concurrent} trials at once, {os.cpu_count()} CPUs, --weights none")
    sweeps_run = (("FIFO grid, phase 1 per trial", grid), ("ASHA, shared phase 1", asha))
    rows = [(label, r["trial_epochs"], f"{r['epoch_seconds']:.0f}", f"{r['wall_s']:.0f}",
             f"{r['best_lr']:.0e}", f"{r['best_val_acc']:.4f}") for label, r in sweeps_run]
    rows.append(("ASHA / grid", f"{ratio:.3f}", f"{results['epoch_seconds_ratio']:.3f}",
                 f"{results['wall_ratio']:.3f}", "",
                 f"{-gap:+8.1f}pt   (target <= 0.35, >= -1 pt)"))
    common.print_table("{:28} {:>12} {:>8} {:>8} {:>8} {:>9}",
                       ("sweep", "trial-epochs", "epoch s", "wall s", "best lr", "best val"), rows)
    common.write_json(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
