"""One self-contained HTML file for a sweep or a run: no network fetches, readable on a
laptop and on a phone.

    cifar-ray inspect results/smoke-sweep --html reports/smoke-sweep.html
    cifar-ray inspect results/smoke --html reports/smoke.html

The tables are results.py's data as HTML; the figures are results.plots' PNGs inlined as
data: URIs; the CSS is inline and scales both to the screen (the tables scroll sideways on a
narrow one).
"""

from __future__ import annotations

import base64
import html
import os
import tempfile

from cifar_ray import results, storage

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
"""

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
    return info["experiment"], f"<p>{summary}</p><h2>Trials</h2>{table}"


def _run_body(info: dict) -> tuple[str, str]:
    table = _table([h for h, _, _ in results.EPOCH_COLUMNS],
                   [results.epoch_cells(r) for r in info["rows"]])
    res = info["result"]
    summary = html.escape(results.runs.describe(res)) if res else "The run has not finished."
    return info["run"], f"<p>{summary}</p><h2>Epochs</h2>{table}"


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
