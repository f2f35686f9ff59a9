"""Does the two-phase recipe transfer? A measured experiment with a backbone the project
pretrains itself (ImageNet weights cannot be had here). Prints a table and writes JSON.

    python jobs/experiments/benchmark_transfer.py --tar ../shared/data/cifar10-train-jpeg.tar.gz

1. Source task: a ResNet50 trained from scratch (`--weights none`, phase 2 only) on five
   CIFAR-10 classes of the real JPEG tar: the four vehicles plus bird, so that the backbone
   has seen one animal (feathers, bodies against sky and grass) and the target is not a
   pure vehicles-to-animals jump; ImageNet, the usual source, holds hundreds of animals.
   Its backbone is exported with `cifar-ray export` (checkpoint.export_backbone).
2. Target task: the other five classes (cat, deer, dog, frog, horse), --target-per-class
   images each, with its own validation split and a held-back test split, through
   `--weights <file> --weights-sha256 <hex>`:
     a. the default two-phase recipe; b. phase 1 only (head on frozen features);
     c. from scratch, for as many epochs as fit in (a)'s training time;
     d. (a) at --image-size 64;
     e. a short ASHA sweep of phase 2's LR (jobs/tune.py's path), from the shared phase 1;
     f. probes of phase 1 alone, in this process (recipe.PhaseLoop, no Ray): the head on
        frozen transferred features and on frozen random ones, for the default 10 epochs
        and for 60 (more steps: the target set gives phase 1 only 13 a epoch).
Every run but (f) goes through train.fit / tune.sweep, what jobs/train.py and jobs/tune.py
call, on a local Ray instance. Runs are named, so an interrupted experiment resumes where
it stopped and finished runs are read back, not rerun.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo, without an install

import common  # noqa: E402  (this folder's shared helpers)

from cifar_ray import checkpoint, data, logs, runs, storage, train, tune  # noqa: E402
from cifar_ray.config import PhaseConfig, PrepareConfig, SweepConfig, TrainConfig  # noqa: E402

SOURCE = ["airplane", "automobile", "ship", "truck", "bird"]
TARGET = ["cat", "deer", "dog", "frog", "horse"]
# From scratch (the source task and run c): all of the network at once, a higher LR than
# phase 2's fine-tuning one, the same regularisation and augmentation.
SCRATCH = PhaseConfig(epochs=1, lr=1e-3, optimizer="adamw", weight_decay=0.05,
                      label_smoothing=0.1, warmup_epochs=1.0, augment=True)
NO_PHASE = PhaseConfig(epochs=0)


def finished_or_fit(cfg: TrainConfig) -> dict:
    """result.json of a finished run, else train it (resuming it if it was interrupted)."""
    done = runs.read_json(storage.join(cfg.run_uri(), runs.RESULT))
    return done if done is not None else train.fit(cfg)


def summary(name: str, cfg: TrainConfig, result: dict) -> dict:
    rows = runs.read_metrics(cfg.run_uri())
    best = {p: max((r["val_acc"] for r in rows if r["phase"] == p), default=None)
            for p in (1, 2)}
    return {"run": name, "weights": "source" if cfg.weights not in ("none",) else "none",
            "image_size": cfg.image_size,
            "epochs": [sum(r["phase"] == p for r in rows) for p in (1, 2)],
            "train_s": round(sum(r["seconds"] for r in rows), 1),
            "wall_s": result["wall_seconds"],
            "best_val_phase1": best[1], "best_val_phase2": best[2],
            "test_acc": result["evaluated_acc"], "test_images": result["evaluated_images"],
            "best": f"phase {result['best_phase']} epoch {result['best_epoch'] + 1}",
            "phase1_val_per_epoch": [round(r["val_acc"], 4) for r in rows if r["phase"] == 1]}


def probes(target: TrainConfig, threads: int) -> dict:
    """(f): phase 1 alone on frozen features, transferred and random, 10 and 60 epochs."""
    import torch

    from cifar_ray.model import build
    from cifar_ray.recipe import PhaseLoop
    from cifar_ray.runtime import Runtime

    torch.set_num_threads(threads)
    splits = common.device_splits(target.dataset_uri())
    out = {}
    for weights in ("source", "random"):
        for epochs in (10, 60):
            cfg = dataclasses.replace(
                target, phase1=dataclasses.replace(target.phase1, epochs=epochs),
                phase2=NO_PHASE, **({} if weights == "source" else
                                    {"weights": "none", "weights_sha256": None}))
            model = build(cfg.weights, cfg.weights_sha256, len(TARGET), cfg.seed)
            rows = PhaseLoop(cfg, model, splits, Runtime(), lambda m, s: None).run()
            out[f"{weights} features, {epochs} epochs"] = {
                "train_acc": rows[-1]["train_acc"],
                "best_val": max(r["val_acc"] for r in rows)}
    return out


def exported(source: TrainConfig, path: str) -> tuple[str, str]:
    """(weights file, sha256): the source run's best backbone, exported once."""
    if not os.path.exists(path):
        out = checkpoint.export_backbone(source.run_uri(), path)
        print(f"exported {out['checkpoint']} -> {out['weights']} ({out['tensors']} tensors, "
              f"{out['bytes'] / 1e6:.0f} MB)")
    with open(path, "rb") as f:
        return path, hashlib.sha256(f.read()).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tar", default="../shared/data/cifar10-train-jpeg.tar.gz",
                    help="the CIFAR-10 JPEG training tar (train/<class>/NNNN.jpg)")
    ap.add_argument("--root", default="results/transfer", help="datasets, runs, weights")
    ap.add_argument("--source-epochs", type=int, default=12)
    ap.add_argument("--source-per-class", type=int, default=None,
                    help="source images per class (default: all 5,000)")
    ap.add_argument("--target-per-class", type=int, default=1000,
                    help="target images per class (before the val and test splits)")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the one training worker")
    ap.add_argument("--skip", nargs="*", default=[], choices=["64", "sweep", "probes"],
                    help="leave out run d (64 px), e (the sweep) or f (the probes)")
    ap.add_argument("--out", default=None, help="JSON path (default <root>/transfer.json)")
    args = ap.parse_args()
    logs.setup("INFO")
    root = os.path.abspath(args.root)
    dsets, store = os.path.join(root, "data"), os.path.join(root, "runs")
    t0 = time.time()

    per, src_per = args.target_per_class, args.source_per_class or 5000
    data.prepare(PrepareConfig(source="folder", source_uri=args.tar, data=dsets,
                               dataset=f"source5-{src_per}", classes=SOURCE,
                               max_per_class=args.source_per_class,
                               val_size=min(1000, src_per // 2)))
    data.prepare(PrepareConfig(source="folder", source_uri=args.tar, data=dsets,
                               dataset=f"target5-{per}", classes=TARGET, max_per_class=per,
                               val_size=per // 2, test_size=per))

    base = TrainConfig(data=dsets, storage=store, workers=1, cpus_per_worker=args.cpus,
                       log_level="INFO")
    source = dataclasses.replace(base, dataset=f"source5-{src_per}", name="source",
                                 weights="none",
                                 phase1=NO_PHASE,
                                 phase2=dataclasses.replace(SCRATCH, epochs=args.source_epochs))
    results = {"source": summary("source", source, finished_or_fit(source))}
    weights, sha = exported(source, os.path.join(root, "source-backbone.pt"))

    target = dataclasses.replace(base, dataset=f"target5-{per}", weights=weights,
                                 weights_sha256=sha)
    a = dataclasses.replace(target, name="two-phase")
    results["a"] = summary("a two-phase", a, finished_or_fit(a))
    b = dataclasses.replace(target, name="phase1-only", phase2=NO_PHASE)
    results["b"] = summary("b phase 1 only", b, finished_or_fit(b))
    # Equal training time: as many full-network epochs as (a)'s phase 2 epochs took to fit in
    # (a)'s whole time (phase 1 on cached features is cheap, so a little over 10).
    p2 = [r["seconds"] for r in runs.read_metrics(a.run_uri()) if r["phase"] == 2]
    scratch_epochs = max(1, round(results["a"]["train_s"] / (sum(p2) / len(p2))))
    c = dataclasses.replace(target, name="scratch", weights="none", weights_sha256=None,
                            phase1=NO_PHASE,
                            phase2=dataclasses.replace(SCRATCH, epochs=scratch_epochs))
    results["c"] = summary("c scratch", c, finished_or_fit(c))
    if "64" not in args.skip:
        d = dataclasses.replace(a, name="two-phase-64", image_size=64)
        results["d"] = summary("d two-phase 64 px", d, finished_or_fit(d))
    if "sweep" not in args.skip:
        sweep = SweepConfig(train=dataclasses.replace(a, name="lr-sweep", cpus_per_worker=1),
                            lrs=[3e-5, 1e-4, 3e-4, 1e-3], scheduler="asha",
                            max_concurrent_trials=args.cpus)
        exp = sweep.train.run_uri()
        best = runs.read_json(storage.join(exp, runs.BEST))
        if best is None:
            best = tune.sweep(dataclasses.replace(sweep, resume=storage.exists(exp)))
        trials = {}
        for tc, rows in runs.read_runs(storage.join(exp, runs.TRIALS)).values():
            if tc is not None:
                p2rows = [r for r in rows if r["phase"] == 2]
                trials[f"{tc.phase2.lr:g}"] = {
                    "epochs": len(p2rows),
                    "best_val": max((r["val_acc"] for r in p2rows), default=None)}
        results["sweep"] = {"best_lr": best["lr"], "test_acc": best["evaluated_acc"],
                            "trials": dict(sorted(trials.items(), key=lambda kv: float(kv[0])))}

    if "probes" not in args.skip:
        results["probes"] = probes(a, args.cpus)

    print()
    common.print_table(
        "{:<22}{:>5}{:>9}{:>9}{:>8}{:>8}{:>8}{:>8}",
        ("run", "img", "epochs", "train s", "wall s", "val p1", "val p2", "test"),
        [(r["run"], r["image_size"], f"{r['epochs'][0]}+{r['epochs'][1]}",
          f"{r['train_s']:.0f}", f"{r['wall_s']:.0f}", common.num(r["best_val_phase1"], 4),
          common.num(r["best_val_phase2"], 4), f"{r['test_acc']:.4f}")
         for r in (results[k] for k in ("source", "a", "b", "c", "d") if k in results)])
    print("phase 1 val acc per epoch (a):", results["a"]["phase1_val_per_epoch"])
    print(f"phase 2 over phase 1 (test): {results['a']['test_acc'] - results['b']['test_acc']:+.4f}"
          f"; transferred over scratch at equal time: "
          f"{results['a']['test_acc'] - results['c']['test_acc']:+.4f}")
    if "sweep" in results:
        s = results["sweep"]
        print(f"sweep: best LR {s['best_lr']:g} (test {s['test_acc']:.4f}); trials "
              + ", ".join(f"{lr}: {t['epochs']} epochs, val {t['best_val']:.4f}"
                          for lr, t in s["trials"].items()))
    for name, p in results.get("probes", {}).items():
        print(f"phase 1 alone, {name}: train acc {p['train_acc']:.4f}, best val "
              f"{p['best_val']:.4f}")
    common.write_json({"machine": f"{common.cpu_name()}, {os.cpu_count()} CPUs",
                       "source_classes": SOURCE, "target_classes": TARGET,
                       "target_per_class": per, "source_backbone_sha256": sha,
                       "total_wall_s": round(time.time() - t0), "results": results},
                      args.out or os.path.join(root, "transfer.json"))


if __name__ == "__main__":
    main()
