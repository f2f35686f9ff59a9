"""`cifar-ray` console script; the jobs/ scripts call the same subcommands.

    cifar-ray prepare-data --source folder --source-uri ../shared/data/cifar10-train-jpeg.tar.gz
    cifar-ray train --smoke
    cifar-ray tune --smoke
    cifar-ray inspect results/smoke-sweep --plots reports/
    cifar-ray inspect results/smoke --html reports/smoke.html     # a run, or a sweep
    cifar-ray evaluate results/smoke/checkpoint-p2-e000 --split test
    cifar-ray export results/smoke weights/smoke-backbone.pt     # then --weights/--weights-sha256
    cifar-ray predict results/smoke/checkpoint-p2-e000 photos/ --top-k 3

Flags come from the config dataclasses (config.py): `cifar-ray train --help` lists them all.
Every subcommand takes --log-level (our own lines; Ray's: --ray-log-level). Errors in
input (ValueError and our storage/data errors) print one line naming the flag, file or URI
and exit with status 2, before any expensive work. Each subcommand imports only what it
needs: `inspect`, `evaluate`, `export` and `predict` (unless --ray) never import Ray.
"""

from __future__ import annotations

import argparse
import json
import sys

from cifar_ray import logs
from cifar_ray.config import LOG_LEVELS, PrepareConfig, SweepConfig, TrainConfig
from cifar_ray.errors import UserError


def _prepare(ns: argparse.Namespace) -> int:
    from cifar_ray import data

    data.prepare(PrepareConfig.from_args(ns))
    return 0


def _train(ns: argparse.Namespace) -> int:
    from cifar_ray import train

    train.fit(TrainConfig.from_args(ns))
    return 0


def _tune(ns: argparse.Namespace) -> int:
    from cifar_ray import tune

    tune.sweep(SweepConfig.from_args(ns))
    return 0


def _inspect(ns: argparse.Namespace) -> int:
    from cifar_ray import results, storage

    exp = storage.normalize(ns.experiment)
    info = results.load(exp)
    print(json.dumps(results.to_json(info), indent=2) if ns.json else results.table(info))
    where = sys.stderr if ns.json else sys.stdout
    if ns.plots:
        for path in results.plots(exp, info, ns.plots):
            print(f"wrote {path}", file=where)
    if ns.html:
        from cifar_ray import report

        print(f"wrote {report.write_html(exp, info, ns.html)}", file=where)
    return 0


def _evaluate(ns: argparse.Namespace) -> int:
    from cifar_ray import storage
    from cifar_ray.checkpoint import load_uri
    from cifar_ray.evaluate import evaluate_checkpoint

    state = load_uri(ns.checkpoint)  # read once: its config says which dataset to score on
    cfg = TrainConfig.from_dict({**state["config"], "use_gpu": ns.use_gpu,
                                 **({"data": ns.data} if ns.data else {})})
    out = evaluate_checkpoint(ns.checkpoint, cfg, ns.split, state)
    print(json.dumps({k: out[k] for k in ("split", "accuracy", "loss", "count", "phase", "epoch")}
                     | {"checkpoint": storage.display(ns.checkpoint)}, indent=2))
    return 0


def _export(ns: argparse.Namespace) -> int:
    from cifar_ray import storage
    from cifar_ray.checkpoint import export_backbone

    out = export_backbone(storage.normalize(ns.source), storage.normalize(ns.out),
                          ns.overwrite)
    print(json.dumps(out, indent=2))
    print(f"use it: --weights {out['weights']} --weights-sha256 {out['sha256']}",
          file=sys.stderr)
    return 0


def _predict(ns: argparse.Namespace) -> int:
    from cifar_ray import predict

    out = predict.predict(ns.checkpoint, ns.images, ns.top_k, ns.use_gpu, ns.data,
                          True if ns.ray else None)
    print(json.dumps(out, indent=2) if ns.json else predict.table(out))
    if out["skipped"]:
        print(f"{len(out['skipped'])} image(s) skipped: they do not decode", file=sys.stderr)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cifar-ray", description=__doc__.split("\n")[0])
    # train and tune get --log-level from TrainConfig (their workers log at that level too).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default="INFO", choices=LOG_LEVELS,
                        help="level of cifar_ray's own log lines (default: INFO)")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, help: str, config: bool = False) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, parents=[] if config else [common])

    prep = add("prepare-data", "write a dataset as Parquet shards")
    PrepareConfig.add_arguments(prep)
    prep.set_defaults(run=_prepare)
    tr = add("train", "two-phase training on Ray Train", config=True)
    TrainConfig.add_arguments(tr)
    tr.set_defaults(run=_train)
    tu = add("tune", "Ray Tune sweep of the phase-2 learning rate", config=True)
    SweepConfig.add_arguments(tu)
    tu.set_defaults(run=_tune)
    ins = add("inspect", "read a sweep or a run from storage: table, JSON, plots, HTML")
    ins.add_argument("experiment", help="experiment or run folder: <storage>/<name> (path or "
                     "s3://)")
    ins.add_argument("--json", action="store_true", help="machine-readable output")
    ins.add_argument("--plots", metavar="DIR", help="write PNG plots into DIR")
    ins.add_argument("--html", metavar="FILE", help="write a self-contained HTML report")
    ins.set_defaults(run=_inspect)
    ev = add("evaluate", "accuracy of a checkpoint on a split")
    ev.add_argument("checkpoint", help="checkpoint folder: path or s3:// URI")
    ev.add_argument("--split", default="test", choices=("train", "val", "test"))
    ev.add_argument("--data", default=None, help="dataset root, if not the one it trained on")
    ev.add_argument("--use-gpu", action="store_true")
    ev.set_defaults(run=_evaluate)
    pr = add("predict", "classes of image files from a checkpoint")
    pr.add_argument("checkpoint", help="checkpoint folder: path or s3:// URI")
    pr.add_argument("images", nargs="+", help="image files, folders, tar archives or s3:// "
                    "prefixes of .jpg/.png (any size: resized as training saw them)")
    pr.add_argument("--top-k", type=int, default=1, help="classes shown per image")
    pr.add_argument("--json", action="store_true", help="machine-readable output")
    pr.add_argument("--use-gpu", action="store_true")
    pr.add_argument("--data", default=None, help="dataset root holding the class names, if "
                    "not the one it trained on")
    pr.add_argument("--ray", action="store_true", help="through Ray Data (default: from "
                    "2,000 images when RAY_ADDRESS is set)")
    pr.set_defaults(run=_predict)
    ex = add("export", "a checkpoint's backbone as a ResNet50 state_dict for --weights")
    ex.add_argument("source", help="checkpoint folder, or a finished run folder (its best "
                    "checkpoint); path or s3:// URI")
    ex.add_argument("out", help="file to write: path or s3:// URI")
    ex.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    ex.set_defaults(run=_export)
    return p


def main(argv: list[str] | None = None) -> int:
    ns = parser().parse_args(argv)
    logs.setup(ns.log_level)
    try:
        return ns.run(ns)
    except (ValueError, UserError) as e:  # bad flags, files, URIs, run names, resources
        print(f"cifar-ray {ns.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
