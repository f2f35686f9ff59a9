"""Read a sweep back from storage (no cluster needed): a table, JSON, and plots.

    python jobs/inspect_results.py s3://bucket/sweeps/lr-sweep --plots reports/
    python jobs/inspect_results.py ./results/smoke-sweep --json

Sources, all under the experiment folder (layout: runs.py): trials/trial-<id>/{config,metrics}
(our own per-run files) and timeline.json, Tune's experiment_state-*.json (trial status),
phase1/ and best.json.
An experiment with errored or unfinished trials is shown with their status rather than
failing. No Ray and no torch here: a table or JSON needs only pyarrow (and boto3 for s3://),
so `inspect` starts in a fraction of a second where importing Ray Train and Tune for file
names took seconds (measured: docs/benchmarks.md); the plots of the best checkpoint load
torch when they are asked for.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from cifar_ray import data, runs, storage, timeline
from cifar_ray.errors import UserError
from cifar_ray.runs import BEST, PHASE1, TRIALS


class NoExperimentError(UserError, ValueError):
    """The URI holds no cifar_ray sweep."""


@dataclass
class Trial:
    trial: str
    lr: float | None
    weight_decay: float | None
    status: str
    epochs_run: int
    max_epochs: int
    stopped_early: bool
    best_val_acc: float | None
    best_epoch: int | None
    wall_s: float
    gpu_hours: float
    is_best: bool = False
    curve: list[dict] = field(default_factory=list, repr=False)
    timeline: dict | None = None  # timeline.json: a trial that ran to its end


def _tune_status(exp: str) -> dict[str, str]:
    """trial id -> Tune status (TERMINATED, ERROR, RUNNING, PENDING...) from the newest state."""
    states = sorted(n for n in storage.list_dir(exp) if n.startswith("experiment_state"))
    if not states:
        return {}
    state = json.loads(storage.read_bytes(storage.join(exp, states[-1])))
    out = {}
    for trial_json, _ in state.get("trial_data", []):
        t = json.loads(trial_json)
        out[t.get("trial_id")] = t.get("status", "UNKNOWN")
    return out


def load(exp: str) -> dict:
    """Everything `inspect` shows, as plain data: of a sweep, or of a single run (then the
    dict has "run" instead of "experiment")."""
    names = storage.list_dir(exp) if storage.exists(exp) else []
    if TRIALS not in names and PHASE1 not in names:
        if runs.CONFIG in names:
            return load_run(exp)
        raise NoExperimentError(f"{storage.display(exp)}: holds no cifar_ray sweep or run "
                                f"(expected {PHASE1}/ and {TRIALS}/ from `cifar-ray tune`, or "
                                f"{runs.CONFIG} from `cifar-ray train`)")
    status = _tune_status(exp)
    trials_uri = storage.join(exp, TRIALS)
    trials = []
    for name, (cfg, all_rows) in runs.read_runs(trials_uri).items():
        rows = [r for r in all_rows if r["phase"] == 2]
        trial_id = name.removeprefix("trial-")
        st = status.get(trial_id, "UNKNOWN")
        max_epochs = cfg.phase2.epochs if cfg else 0
        best = runs.best_epoch(rows)
        wall = sum(r["seconds"] for r in rows)
        gpus = cfg.workers * cfg.gpus_per_worker if cfg and cfg.use_gpu else 0
        trials.append(Trial(
            trial=name, lr=cfg.phase2.lr if cfg else None,
            weight_decay=cfg.phase2.weight_decay if cfg else None, status=st,
            epochs_run=len(rows), max_epochs=max_epochs,
            # ASHA ends a trial as TERMINATED before its last epoch; errors are not "early".
            stopped_early=st == "TERMINATED" and len(rows) < max_epochs,
            best_val_acc=best["val_acc"] if best else None,
            best_epoch=best["epoch"] if best else None,
            wall_s=wall, gpu_hours=wall * gpus / 3600, curve=rows,
            timeline=runs.read_json(storage.join(trials_uri, name, runs.TIMELINE))))
    # Trials Tune knows that never wrote a run folder (pending, or failed at start).
    seen = {t.trial.removeprefix("trial-") for t in trials}
    for trial_id, st in status.items():
        if trial_id not in seen:
            trials.append(Trial(f"trial-{trial_id}", None, None, st, 0, 0, False, None, None,
                                0.0, 0.0))
    scored = [t for t in trials if t.best_val_acc is not None]
    if scored:
        max(scored, key=lambda t: t.best_val_acc).is_best = True
    return {"experiment": storage.display(exp), "trials": trials,
            "phase1": runs.read_metrics(storage.join(exp, PHASE1)),
            "best": runs.read_json(storage.join(exp, BEST))}


def load_run(run: str) -> dict:
    return {"run": storage.display(run), "config": runs.read_config(run).to_dict(),
            "rows": runs.read_metrics(run), "result": runs.read_json(storage.join(run,
                                                                                 runs.RESULT))}


# One run's epoch table: (header, width, cell of a metrics row), for the text and the HTML.
EPOCH_COLUMNS = (("phase", 5, lambda r: str(r["phase"])),
                 ("epoch", 5, lambda r: str(r["epoch"] + 1)),
                 ("train loss", 10, lambda r: f"{r['train_loss']:.4f}"),
                 ("train acc", 9, lambda r: f"{r['train_acc']:.4f}"),
                 ("val loss", 9, lambda r: f"{r['val_loss']:.4f}"),
                 ("val acc", 8, lambda r: f"{r['val_acc']:.4f}"),
                 ("lr end", 9, lambda r: f"{r['lr_end']:.2e}"),
                 ("img/s", 7, lambda r: f"{r['images_per_s']:.0f}"),
                 ("s", 7, lambda r: f"{r['seconds']:.1f}"))


def epoch_cells(row: dict) -> list[str]:
    return [cell(row) for _, _, cell in EPOCH_COLUMNS]


def run_table(info: dict) -> str:
    lines = [f"run {info['run']}", " ".join(f"{h:>{w}}" for h, w, _ in EPOCH_COLUMNS)]
    for r in info["rows"]:
        lines.append(" ".join(f"{c:>{w}}" for c, (_, w, _) in zip(epoch_cells(r),
                                                                   EPOCH_COLUMNS, strict=True)))
    lines.append(runs.describe(info["result"]) if info["result"]
                 else "no result.json yet: the run has not finished")
    if info["result"] and info["result"].get("timeline"):
        lines.append(f"timeline: {timeline.line(info['result']['timeline'])}")
    return "\n".join(lines)


def table(info: dict) -> str:
    if "run" in info:
        return run_table(info)
    head = (f"{'':2}{'trial':22} {'lr':>9} {'status':>11} {'epochs':>7} {'early':>6} "
            f"{'best val':>9} {'wall s':>8} {'GPU-h':>6}")
    lines = [f"experiment {info['experiment']}", head]
    for t in sorted(info["trials"], key=lambda t: (t.lr is None, t.lr or 0)):
        lines.append(
            f"{'*' if t.is_best else ' ':2}{t.trial[:22]:22} "
            f"{(f'{t.lr:.2e}' if t.lr else '-'):>9} {t.status:>11} "
            f"{f'{t.epochs_run}/{t.max_epochs}':>7} {('yes' if t.stopped_early else 'no'):>6} "
            f"{(f'{t.best_val_acc:.4f}' if t.best_val_acc is not None else '-'):>9} "
            f"{t.wall_s:8.1f} {t.gpu_hours:6.3f}")
    if info["best"]:
        b = info["best"]
        lines.append(f"* best: lr {b['lr']:.3g}, val acc {b['best_val_acc']:.4f} at phase-2 "
                     f"epoch {b['best_epoch'] + 1}; {b['evaluated_split']} accuracy "
                     f"{b['evaluated_acc']:.4f}; checkpoint {b['best_checkpoint']}")
        if b.get("timeline"):
            lines.append(f"timeline: {timeline.line(b['timeline'])}")
    else:
        lines.append("no best.json yet: the sweep has not finished")
    return "\n".join(lines)


def to_json(info: dict) -> dict:
    if "run" in info:
        return info
    return {"experiment": info["experiment"], "best": info["best"],
            "phase1": info["phase1"],
            "trials": [{k: v for k, v in asdict(t).items() if k != "curve"}
                       for t in info["trials"]]}


# ---------------------------------------------------------------- plots

FIGSIZE, DPI = (8, 6), 100  # every PNG is 800 x 600 pixels


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _saver(out_dir: str, written: list[str]):
    plt = _pyplot()
    os.makedirs(out_dir, exist_ok=True)

    def save(fig, name):
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=DPI)
        plt.close(fig)
        written.append(path)
    return save


def plots(exp: str, info: dict, out_dir: str, samples: int = 32) -> list[str]:
    """Learning curves, LR vs best val accuracy, and (once best.json exists) the best
    checkpoint's confusion matrix and sample predictions on the test split. For a single
    run: its curves and (once result.json exists) the same for its best checkpoint."""
    import matplotlib.ticker

    if "run" in info:
        return run_plots(exp, info, out_dir, samples)
    plt = _pyplot()
    written: list[str] = []
    save = _saver(out_dir, written)

    p1 = info["phase1"]
    fig, ax = plt.subplots(figsize=FIGSIZE)
    ax.plot([r["global_epoch"] for r in p1], [r["val_acc"] for r in p1], "k-o",
            label="phase 1 (shared)")
    for t in info["trials"]:
        if t.curve:
            ax.plot([len(p1) + r["epoch"] + 1 for r in t.curve], [r["val_acc"] for r in t.curve],
                    "-o", label=f"lr {t.lr:.1e}" + (" (best)" if t.is_best else ""))
    ax.axvline(len(p1) + 0.5, color="grey", ls="--", lw=1)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set(xlabel="epoch (phase 1, then phase 2)", ylabel="val accuracy",
           title="Learning curves")
    ax.legend(fontsize=8)
    save(fig, "learning_curves.png")

    scored = [t for t in info["trials"] if t.best_val_acc is not None]
    fig, ax = plt.subplots(figsize=FIGSIZE)
    ax.scatter([t.lr for t in scored], [t.best_val_acc for t in scored])
    for t in scored:
        if t.is_best:
            ax.scatter([t.lr], [t.best_val_acc], s=200, facecolors="none", edgecolors="r",
                       label="best")
    ax.set_xscale("log")
    ax.set(xlabel="phase-2 learning rate", ylabel="best val accuracy",
           title="Learning rate vs best val accuracy")
    if scored:
        ax.legend()
    save(fig, "lr_vs_val_acc.png")

    if info["best"]:
        # Rebuilt from the experiment URI: best.json shows URIs without their ?query part.
        _evaluation_plots(storage.join(exp, TRIALS, info["best"]["trial"]), info["best"],
                          samples, save)
    return written


def run_plots(run: str, info: dict, out_dir: str, samples: int = 32) -> list[str]:
    """One run's accuracy and loss per epoch through both phases, and its best
    checkpoint's confusion matrix and sample predictions once it has finished."""
    import matplotlib.ticker

    plt = _pyplot()
    written: list[str] = []
    save = _saver(out_dir, written)
    rows = info["rows"]
    fig, (acc, loss) = plt.subplots(2, 1, figsize=FIGSIZE, sharex=True)
    x = [r["global_epoch"] for r in rows]
    for ax, key in ((acc, "acc"), (loss, "loss")):
        ax.plot(x, [r[f"train_{key}"] for r in rows], "-o", label="train")
        ax.plot(x, [r[f"val_{key}"] for r in rows], "-o", label="val")
        p1 = sum(r["phase"] == 1 for r in rows)
        if 0 < p1 < len(rows):
            ax.axvline(p1 + 0.5, color="grey", ls="--", lw=1)
        ax.set(ylabel=key)
        ax.legend(fontsize=8)
    loss.set(xlabel="epoch (phase 1, then phase 2)")
    loss.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    acc.set(title="Learning curves")
    save(fig, "learning_curves.png")
    if info["result"]:
        _evaluation_plots(run, info["result"], samples, save)
    return written


def _evaluation_plots(run: str, best: dict, samples: int, save) -> None:
    """Confusion matrix and sample predictions of a run's best checkpoint (result.json's or
    best.json's keys), on the split it was scored on."""
    from cifar_ray.evaluate import evaluate_checkpoint  # torch: only for these two plots

    plt = _pyplot()
    ckpt = storage.join(run, os.path.basename(best["best_checkpoint"]))
    cfg = runs.read_config(run)
    ev = evaluate_checkpoint(ckpt, cfg, best["evaluated_split"])
    classes, y, p = ev["classes"], np.array(ev["labels"]), np.array(ev["predictions"])
    k = len(classes)
    cm = np.zeros((k, k), int)
    np.add.at(cm, (y, p), 1)
    fig, ax = plt.subplots(figsize=FIGSIZE)
    ax.imshow(cm, cmap="Blues")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, cm[i, j], ha="center", va="center", fontsize=7,
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xticks(range(k), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), classes, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true",
           title=f"Confusion matrix, {best['evaluated_split']} split "
                 f"(accuracy {ev['accuracy']:.3f})")
    fig.tight_layout()
    save(fig, "confusion_matrix.png")

    split = data.load_split(cfg.dataset_uri(), best["evaluated_split"])
    n = min(samples, len(y))
    cols = 8
    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, cols, figsize=FIGSIZE)
    for i, ax in enumerate(np.atleast_1d(axes).ravel()):
        ax.axis("off")
        if i < n:
            ax.imshow(split.images[i])
            ok = y[i] == p[i]
            ax.set_title(f"{classes[p[i]]}" + ("" if ok else f"\n({classes[y[i]]})"),
                         fontsize=7, color="green" if ok else "red")
    fig.suptitle("Predictions (red: wrong, true label in brackets)")
    save(fig, "sample_predictions.png")
