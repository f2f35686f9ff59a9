"""One self-contained HTML file for a sweep or a run: no network fetches, readable on a
laptop and on a phone.

    cifar-ray inspect results/smoke-sweep --html reports/smoke-sweep.html
    cifar-ray inspect results/smoke --html reports/smoke.html

The tables are results.py's data as HTML; where the wall time went (timeline.py), a stacked
bar of plain CSS; the figures are results.plots' PNGs inlined as data: URIs; the CSS is
inline and scales all of it to the screen (the tables scroll sideways on a narrow one).
"""

from __future__ import annotations

import base64
import html
import os
import tempfile

from cifar_ray import results, storage, timeline

CSS = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 960px; padding: 12px;
       color: #222; }
h1 { font-size: 1.4em; word-break: break-all; } h2 { font-size: 1.15em; margin-top: 1.6em; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { padding: 4px 8px; border-bottom: 1px solid #ddd; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
tr.best { background: #eef6ee; font-weight: 600; }
figure { margin: 1em 0; } figure img { width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #666; font-size: 0.9em; }
.timeline { margin: 0.6em 0 1.2em; } .timeline p { margin: 0.2em 0; }
.bar { display: flex; height: 22px; border-radius: 3px; overflow: hidden; background: #eee; }
.bar span { display: block; height: 100%; min-width: 1px; }
.legend { display: flex; flex-wrap: wrap; gap: 2px 14px; padding: 0; margin: 0.4em 0 0;
          list-style: none; font-size: 0.85em; font-variant-numeric: tabular-nums; }
.legend i { display: inline-block; width: 10px; height: 10px; margin-right: 4px;
            border-radius: 2px; }
"""

# One colour per timeline part (the bar's segments and their legend).
COLOURS = {"preflight": "#bab0ac", "ray_start": "#e15759", "worker_start": "#ff9d9a",
           "data_load": "#f28e2b", "model_setup": "#ffbe7d", "feature_cache": "#b6992d",
           "phase1_training": "#59a14f", "phase2_training": "#4e79a7",
           "validation": "#76b7b2", "checkpoints": "#b07aa1",
           "restarts": "#9c755f", "final_evaluation": "#edc948", "shutdown": "#d37295",
           "phase1": "#59a14f", "trials": "#4e79a7", "other": "#cccccc"}

CAPTIONS = {"learning_curves.png": "Learning curves", "lr_vs_val_acc.png":
            "Learning rate against best validation accuracy", "confusion_matrix.png":
            "Confusion matrix of the best checkpoint", "sample_predictions.png":
            "Sample predictions of the best checkpoint"}


def _table(header: list[str], rows: list[list[str]], best: list[bool] | None = None) -> str:
    out = ["<div class='scroll'><table><thead><tr>"
           + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr></thead><tbody>"]
    for i, row in enumerate(rows):
        cls = " class='best'" if best and best[i] else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
    return "".join(out) + "</tbody></table></div>"


def _f(v, fmt: str) -> str:
    return format(v, fmt) if v is not None else "-"


def timeline_bar(tl: dict, title: str) -> str:
    """Where a wall went, as a horizontal stacked bar in the order the parts happen, with a
    legend giving each part's seconds (parts of 0 s left out)."""
    wall = max(tl["wall_seconds"], sum(tl["seconds"].values()), 1e-9)
    parts = [(k, v) for k, v in tl["seconds"].items() if v > 0]
    segments = "".join(
        f"<span style='width:{100 * v / wall:.2f}%;background:{COLOURS.get(k, '#888')}' "
        f"title='{html.escape(timeline.LABELS.get(k, k))}: {v:.1f} s'></span>"
        for k, v in parts)
    legend = "".join(
        f"<li><i style='background:{COLOURS.get(k, '#888')}'></i>"
        f"{html.escape(timeline.LABELS.get(k, k))} {v:.1f} s</li>" for k, v in parts)
    restarts = tl.get("restarts", 0)
    note = f", {restarts} restart{'' if restarts == 1 else 's'}" if restarts else ""
    return (f"<div class='timeline'><p>{html.escape(title)}: wall {tl['wall_seconds']:.1f} s"
            f"{note}</p><div class='bar' role='img' aria-label='"
            f"{html.escape(timeline.line(tl))}'>{segments}</div>"
            f"<ul class='legend'>{legend}</ul></div>")


def _sweep_body(info: dict) -> tuple[str, str]:
    trials = sorted(info["trials"], key=lambda t: (t.lr is None, t.lr or 0))
    table = _table(
        ["trial", "lr", "status", "epochs", "stopped early", "best val acc", "wall s", "GPU-h"],
        [[t.trial, _f(t.lr, ".2e"), t.status, f"{t.epochs_run}/{t.max_epochs}",
          "yes" if t.stopped_early else "no", _f(t.best_val_acc, ".4f"), f"{t.wall_s:.1f}",
          f"{t.gpu_hours:.3f}"] for t in trials], [t.is_best for t in trials])
    b = info["best"]
    summary = (f"Best trial {html.escape(b['trial'])}: lr {b['lr']:.3g}, val accuracy "
               f"{b['best_val_acc']:.4f} at phase-2 epoch {b['best_epoch'] + 1}; "
               f"{html.escape(b['evaluated_split'])} accuracy {b['evaluated_acc']:.4f} on "
               f"{b['evaluated_images']} images.") if b else "The sweep has not finished."
    bars = ([timeline_bar(b["timeline"], "The sweep")] if b and b.get("timeline") else []) + [
        timeline_bar(t.timeline, t.trial) for t in trials if t.timeline]
    where = f"<h2>Where the time went</h2>{''.join(bars)}" if bars else ""
    return info["experiment"], f"<p>{summary}</p><h2>Trials</h2>{table}{where}"


def _run_body(info: dict) -> tuple[str, str]:
    table = _table([h for h, _, _ in results.EPOCH_COLUMNS],
                   [results.epoch_cells(r) for r in info["rows"]])
    res = info["result"]
    summary = html.escape(results.runs.describe(res)) if res else "The run has not finished."
    where = (f"<h2>Where the time went</h2>{timeline_bar(res['timeline'], 'The run')}"
             if res and res.get("timeline") else "")
    return info["run"], f"<p>{summary}</p>{where}<h2>Epochs</h2>{table}"


def write_html(uri: str, info: dict, out_path: str) -> str:
    """Write the report of the sweep or run at `uri` (`info` from results.load)."""
    title, body = _run_body(info) if "run" in info else _sweep_body(info)
    figures = []
    with tempfile.TemporaryDirectory() as d:
        for path in results.plots(uri, info, d):
            with open(path, "rb") as f:
                png = base64.b64encode(f.read()).decode()
            name = os.path.basename(path)
            figures.append(f"<figure><img alt='{html.escape(CAPTIONS.get(name, name))}' "
                           f"src='data:image/png;base64,{png}'><figcaption>"
                           f"{html.escape(CAPTIONS.get(name, name))}</figcaption></figure>")
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>cifar_ray: {html.escape(title)}</title><style>{CSS}</style></head><body>"
            f"<h1>{'Run' if 'run' in info else 'Sweep'} {html.escape(title)}</h1>{body}"
            f"<h2>Figures</h2>{''.join(figures)}</body></html>")
    parent = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(parent, exist_ok=True)
    with open(out_path, "w") as f:
        f.write(page)
    return storage.display(out_path)
