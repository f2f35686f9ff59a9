"""TensorBoard scalars beside a run's metrics.jsonl, on any storage.

    tensorboard --logdir results/r50/tb                 # one run
    tensorboard --logdir results/lr-sweep/trials        # a sweep's trials side by side

Rank 0 writes a TensorBoard event file (tensorboardX, which ray[tune] already brings) to a
local temporary folder and, after every epoch, copies it whole to <run>/tb/: a few kB of
scalars, so a plain object write works on S3 as on a local disk. A restarted worker starts
another event file in the same folder; TensorBoard reads them together. No torch, no Ray.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid

from cifar_ray import storage

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
