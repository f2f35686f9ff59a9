"""Tracking beside a run's metrics.jsonl: TensorBoard scalars on any storage, and MLflow.

    tensorboard --logdir results/r50/tb                 # one run
    tensorboard --logdir results/lr-sweep/trials        # a sweep's trials side by side
    cifar-ray train ... --mlflow-tracking-uri http://127.0.0.1:5000

Rank 0 writes a TensorBoard event file (tensorboardX, which ray[tune] already brings) to a
local temporary folder and, after every epoch, copies it whole to <run>/tb/: a few kB of
scalars, so a plain object write works on S3 as on a local disk. A restarted worker starts
another event file in the same folder; TensorBoard reads them together. No torch, no Ray.

MLflow (optional: pip install -e ".[mlflow]"): one MLflow run per cifar_ray run, found again
by its tag `cifar_ray.run` when the run resumes, in the experiment --mlflow-experiment (a
sweep's name for its phase 1 and trials). Rank 0 logs the resolved config as params
(flattened: phase2.lr) and each epoch's metrics; the driver adds the best checkpoint and its
test accuracy at the end. Credentials come from MLflow's own environment variables
(MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN) and are never written anywhere. A tracking server
that stops answering mid-run costs a warning per epoch, not the run.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request
import uuid

from cifar_ray import storage

log = logging.getLogger(__name__)

TB = "tb"

# metrics.jsonl key -> TensorBoard tag; the global tags are stepped by global epoch (one line
# through both phases), the per-phase ones (phase1/..., phase2/...) by the phase's epoch.
SCALARS = {"train_loss": "loss/train", "val_loss": "loss/val", "train_acc": "accuracy/train",
           "val_acc": "accuracy/val", "lr_start": "lr/start", "lr_end": "lr/end",
           "images_per_s": "images_per_s", "seconds": "epoch_seconds"}


class TensorBoard:
    """One run's event file, written by rank 0, synchronously: each epoch's events are in
    the file before it is copied (tensorboardX's SummaryWriter queues them to a thread)."""

    def __init__(self, run_uri: str):
        from tensorboardX.event_file_writer import EventsWriter

        self.run_uri = run_uri
        self.local = tempfile.mkdtemp(prefix="cifar-ray-tb-")
        # events.out.tfevents.<time>.<host>.<random>: a restarted worker's file, even in the
        # same second on the same host, is another file.
        self.events = EventsWriter(os.path.join(self.local, "events"),
                                   filename_suffix="." + uuid.uuid4().hex[:8])

    def _scalar(self, tag: str, value: float, step: int) -> None:
        from tensorboardX.proto import event_pb2, summary_pb2

        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(
            tag=tag, simple_value=float(value))])
        self.events.write_event(event_pb2.Event(wall_time=time.time(), step=step,
                                                summary=summary))

    def epoch(self, m: dict) -> None:
        """Log one metrics.jsonl row and copy the event file to <run>/tb/."""
        for key, tag in SCALARS.items():
            if m.get(key) is not None:
                self._scalar(tag, m[key], m["global_epoch"])
                self._scalar(f"phase{m['phase']}/{tag}", m[key], m["epoch"] + 1)
        self._scalar("phase", m["phase"], m["global_epoch"])
        self.events.flush()
        for name in os.listdir(self.local):
            with open(os.path.join(self.local, name), "rb") as f:
                storage.write_bytes(storage.join(self.run_uri, TB, name), f.read())

    def close(self) -> None:
        self.events.close()
        shutil.rmtree(self.local, ignore_errors=True)


# ---------------------------------------------------------------- MLflow

RUN_TAG = "cifar_ray.run"


def check_mlflow(uri: str) -> None:
    """Before Ray starts: mlflow is installed and an http(s) tracking server answers."""
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise ValueError(f"--mlflow-tracking-uri {uri}: mlflow is not installed; "
                         "pip install -e '.[mlflow]'") from None
    if not uri.startswith(("http://", "https://")):
        return  # file:, sqlite: and the like: mlflow opens them itself
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10) as r:
            if r.status == 200:
                return
            why = f"HTTP {r.status}"
    except (urllib.error.URLError, OSError) as e:
        why = str(getattr(e, "reason", e))
    raise ValueError(f"--mlflow-tracking-uri {uri}: no MLflow tracking server answers there "
                     f"({why}); start one (mlflow server) or drop the flag")


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)
    return out


class MLflow:
    """The MLflow run of one cifar_ray run (created, or found again by its tag)."""

    def __init__(self, uri: str, experiment: str, run_uri: str, name: str,
                 params: dict | None = None):
        # MLflow retries a failed request 7 times with backoff (minutes) by default: a server
        # gone mid-run would hold every epoch that long. The user's own settings win.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self.client = MlflowClient(uri)
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
        where = storage.display(run_uri)
        found = self.client.search_runs([exp_id], f"tags.`{RUN_TAG}` = '{where}'",
                                        max_results=1)
        if found:
            self.run_id = found[0].info.run_id
        else:
            self.run_id = self.client.create_run(exp_id, run_name=name,
                                                 tags={RUN_TAG: where}).info.run_id
            if params:
                items = [Param(k, v[:6000]) for k, v in flatten(params).items()]
                for i in range(0, len(items), 100):  # MLflow takes 100 params a batch
                    self.client.log_batch(self.run_id, params=items[i:i + 100])

    def epoch(self, m: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        keys = ["phase", *SCALARS]
        try:
            self.client.log_batch(self.run_id, metrics=[
                Metric(k, float(m[k]), now, m["global_epoch"]) for k in keys
                if m.get(k) is not None])
        except Exception as e:  # tracking must not end the training
            log.warning(f"MLflow: epoch {m['global_epoch']} not logged ({e})")

    def end(self) -> None:
        """Training is over (rank 0, after the last epoch)."""
        try:
            self.client.set_terminated(self.run_id)
        except Exception as e:
            log.warning(f"MLflow: run not marked finished ({e})")

    def result(self, summary: dict) -> None:
        """The best checkpoint and its score on the evaluation split (the driver, at the
        end): result.json's keys."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.set_tag(self.run_id, "best_checkpoint", summary["best_checkpoint"])
        self.client.log_batch(self.run_id, metrics=[
            Metric(f"{summary['evaluated_split']}_acc", summary["evaluated_acc"], now, 0),
            Metric("best_val_acc", summary["best_val_acc"], now, 0)])


def mlflow_run(cfg, params: bool = False) -> MLflow | None:
    """cfg's MLflow run, or None without --mlflow-tracking-uri or when the server cannot be
    reached now (a warning: tracking does not end a run)."""
    if not cfg.mlflow_tracking_uri:
        return None
    try:
        return MLflow(cfg.mlflow_tracking_uri, cfg.mlflow_experiment, cfg.run_uri(), cfg.name,
                      cfg.to_dict() if params else None)
    except Exception as e:
        log.warning(f"MLflow at {cfg.mlflow_tracking_uri}: not tracking this run ({e})")
        return None
