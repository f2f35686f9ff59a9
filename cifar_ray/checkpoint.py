"""Checkpoints, all of them: names and order, content, bytes, the newest complete one, which
runs may go on from one, and a classifier loaded from one.

    cifar-ray evaluate results/smoke/checkpoint-p2-e000     # load_classifier
    cifar-ray export results/smoke weights/smoke-backbone.pt

A checkpoint is a folder checkpoint-p<phase>-e<epoch>[-s<step>] in a run folder holding one
torch file and its sha256. The digest is written after the state, so a checkpoint whose
upload stopped half way fails verification with a clear error instead of loading garbage,
and is never the one a run resumes from. A phase-1 checkpoint holds what phase 1 changes,
the head, and refers to the frozen backbone by URI and sha256 (head_only); loading joins the
two again (whole). Loading uses `weights_only=True`: tensors, numbers,
strings and containers only, no code runs. torch is imported where bytes are read or written,
so that run folders can be listed without it (`cifar-ray inspect` starts fast anywhere).
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import posixpath
import re
from dataclasses import dataclass

import pyarrow.fs as pafs

from cifar_ray import storage
from cifar_ray.config import TrainConfig
from cifar_ray.errors import UserError

STATE = "state.pt"
DIGEST = "state.pt.sha256"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is incomplete, corrupted, not ours, or not one this run can go on from;
    the message names it."""


# ---------------------------------------------------------------- names and order


def dir_name(phase: int, epoch: int, step: int = 0) -> str:
    """checkpoint-p2-e003 after phase 2's epoch 4 (0-based 3); checkpoint-p2-e003-s00040
    after step 40 of that epoch (taken on a preemption notice)."""
    return f"checkpoint-p{phase}-e{epoch:03d}" + (f"-s{step:05d}" if step else "")


def progress(name: str) -> tuple[int, int, float] | None:
    """How far training had got at a checkpoint, in an order that compares: (phase, epoch,
    steps done in it; inf once it is complete). None for other names."""
    m = re.fullmatch(r"checkpoint-p(\d+)-e(\d+)(?:-s(\d+))?", name)
    if m is None:
        return None
    return int(m[1]), int(m[2]), float(m[3]) if m[3] else math.inf


def newest_complete(run_uri: str) -> str | None:
    """The newest checkpoint of a run whose upload completed (its digest, written last, is
    there). Ray's own latest can be older: a worker's report reaches the controller on its
    next poll, and a node lost in between takes that registration with it, not the files."""
    done = []
    for name in storage.list_dir(run_uri):
        at = progress(name)
        if at and storage.exists(storage.join(run_uri, name, DIGEST)):
            done.append((at, name))
    return storage.join(run_uri, max(done)[1]) if done else None


# ---------------------------------------------------------------- content


@dataclass(frozen=True)
class ResumePoint:
    """Where a checkpoint left training: after epoch `epoch` (0-based) of `phase`; or, taken
    mid-epoch on a preemption notice, after `step` steps of that epoch, with the epoch's
    train sums so far over all ranks (`partial`: loss_sum, correct, count, seconds,
    lr_start, lr_end)."""

    phase: int
    epoch: int
    step: int = 0
    partial: dict | None = None

    @classmethod
    def of(cls, state: dict) -> ResumePoint:
        return cls(state["phase"], state["epoch"], state.get("step") or 0, state.get("partial"))

    def first_epoch(self, phase: int, epochs: int) -> int | None:
        """The epoch a phase of `epochs` goes on at from here, or None when nothing of it is
        left. A mid-epoch checkpoint goes on inside its epoch."""
        if self.phase > phase:
            return None
        first = 0 if self.phase < phase else self.epoch + (0 if self.step else 1)
        return first if first < epochs else None

    def midway(self, phase: int, epoch: int) -> bool:
        """Whether this point lies inside that epoch (steps of it done, not all)."""
        return bool(self.step) and (self.phase, self.epoch) == (phase, epoch)

    def record(self) -> dict:
        """For the metrics row of the first epoch after a restore: where training resumed."""
        return {"phase": self.phase, "epoch": self.epoch, **({"step": self.step}
                                                             if self.step else {})}

    def describe(self) -> str:
        done = (f"step {self.step} of epoch {self.epoch + 1}" if self.step
                else f"epoch {self.epoch + 1}")
        return f"phase {self.phase}, {done} done"


def state(model, optim, at: ResumePoint, history: list[dict], cfg: TrainConfig) -> dict:
    """Everything a resume needs: the model's weights, the phase's optimizer and schedule
    (`optim`: engine.Optimization), where training stood, the history so far and the config
    that produced it."""
    out = {"model": model.state_dict(), **optim.state_dict(), "phase": at.phase,
           "epoch": at.epoch, "history": list(history), "config": cfg.to_dict()}
    if at.step:
        out.update(step=at.step, partial=at.partial)
    return out


def snapshot(state: dict) -> dict:
    """A copy of `state` that training no longer changes, with its tensors on the CPU: what
    an upload that overlaps the next epoch writes. Copying is the only part of a checkpoint
    that blocks training (on a GPU, one device-to-host copy of the weights and moments)."""
    import torch

    def copy(x):
        if isinstance(x, torch.Tensor):
            return x.detach().to("cpu", copy=True)
        if isinstance(x, dict):
            return {k: copy(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(copy(v) for v in x)
        return x
    return copy(state)


# ---------------------------------------------------------------- bytes


def write_dir(state: dict, directory: str) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    with open(os.path.join(directory, STATE), "wb") as f:
        f.write(data)
    with open(os.path.join(directory, DIGEST), "w") as f:
        f.write(hashlib.sha256(data).hexdigest())


def verified_load(data: bytes, digest: str | None, where: str) -> dict:
    """A checkpoint's state from its bytes and digest, refused unless the digest matches and
    it holds only tensors and plain data."""
    import torch

    if digest is None:
        raise CheckpointError(f"{where}: {DIGEST} missing; the checkpoint is incomplete")
    if hashlib.sha256(data).hexdigest() != digest.strip():
        raise CheckpointError(f"{where}: sha256 mismatch; the checkpoint is incomplete or "
                              "was modified")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{where}: refused to load ({type(e).__name__}: {e})") from e


def load_dir(directory: str) -> dict:
    digest_path = os.path.join(directory, DIGEST)
    digest = open(digest_path).read() if os.path.exists(digest_path) else None
    state_path = os.path.join(directory, STATE)
    if not os.path.exists(state_path):
        raise CheckpointError(f"{directory}: no {STATE}; not a cifar_ray checkpoint")
    with open(state_path, "rb") as f:
        return whole(verified_load(f.read(), digest, directory), directory)


def load_fs(fs: pafs.FileSystem, path: str, label: str | None = None) -> dict:
    """A checkpoint folder of a pyarrow filesystem (where Ray keeps a run's checkpoints),
    read in a few parallel requests, each retried on connection failures."""
    label = label or path
    digest_path = posixpath.join(path, DIGEST)
    try:
        digest = storage.read_file(fs, digest_path, f"{label}/{DIGEST}").decode()
    except storage.StorageError as e:
        if not isinstance(e.__cause__, FileNotFoundError):
            raise
        digest = None
    try:
        data = storage.read_file(fs, posixpath.join(path, STATE), f"{label}/{STATE}")
    except storage.StorageError as e:
        if not isinstance(e.__cause__, FileNotFoundError):
            raise
        raise CheckpointError(f"{label}: no {STATE}; not a cifar_ray checkpoint") from e
    return whole(verified_load(data, digest, label), label)


def load_uri(uri: str) -> dict:
    """A checkpoint folder on a local path or s3://."""
    fs, path = storage.resolve(uri)
    return load_fs(fs, path, storage.display(uri))


def upload_dir(directory: str, fs: pafs.FileSystem, dest: str, local: bool) -> None:
    """Copy a checkpoint folder written by write_dir to `dest` on `fs`: the state first and
    its digest last, each write retried on connection failures. A checkpoint whose upload
    stopped part way has no digest (or one for other bytes) and is never loaded."""
    for name in (STATE, DIGEST):
        with open(os.path.join(directory, name), "rb") as f:
            storage.write_file(fs, posixpath.join(dest, name), f.read(), local=local,
                               label=posixpath.join(dest, name))


# ---------------------------------------------------------------- phase 1: what changed


def frozen_backbone(cfg: TrainConfig, model_state: dict) -> dict:
    """{"uri", "sha256"} of the frozen backbone that phase-1 checkpoints refer to: the
    --weights file itself when the run was given one; else (imagenet, none) the backbone's
    tensors, written once into the run folder under a name made of their digest, so that
    no file a checkpoint refers to is ever replaced by other bytes."""
    import torch

    if cfg.weights not in ("imagenet", "none"):
        uri = storage.normalize(cfg.weights)
        sha = cfg.weights_sha256 or hashlib.sha256(storage.read_bytes(uri)).hexdigest()
        return {"uri": uri, "sha256": sha.lower()}
    buf = io.BytesIO()
    torch.save({k[len("backbone."):]: v for k, v in model_state.items()
                if k.startswith("backbone.")}, buf)
    data = buf.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    uri = storage.join(cfg.run_uri(), f"backbone-{sha[:16]}.pt")
    if not storage.exists(uri):  # a restarted run finds it there
        storage.write_bytes(uri, data)
    return {"uri": uri, "sha256": sha}


def head_only(state: dict, backbone: dict) -> dict:
    """A phase-1 checkpoint's state as stored: phase 1 changes only the head, so it holds
    the head's weights (with their optimizer and schedule) and refers to the frozen
    backbone (`backbone`: frozen_backbone's) instead of carrying a copy of it."""
    head = {k: v for k, v in state["model"].items() if not k.startswith("backbone.")}
    return {**{k: v for k, v in state.items() if k != "model"}, "head": head,
            "backbone": backbone}


def whole(state: dict, where: str) -> dict:
    """A loaded state with its whole model: a head_only state's head joined again to the
    backbone it refers to, which must be there with the sha256 it was stored with."""
    ref = state.pop("backbone", None)
    if ref is None:
        return state
    import torch

    from cifar_ray.model import backbone_tensors

    uri, sha = storage.display(ref["uri"]), ref["sha256"]
    try:
        data = storage.read_bytes(ref["uri"])
    except storage.StorageError as e:
        raise CheckpointError(f"{where}: its frozen backbone {uri} (sha256 {sha}) cannot be "
                              f"read: {e}") from e
    got = hashlib.sha256(data).hexdigest()
    if got != sha:
        raise CheckpointError(f"{where}: its frozen backbone {uri} has sha256 {got}, but the "
                              f"checkpoint expects {sha}: the file was changed or replaced")
    backbone = backbone_tensors(torch.load(io.BytesIO(data), map_location="cpu",
                                           weights_only=True))
    state["model"] = {**{f"backbone.{k}": v for k, v in backbone.items()},
                      **state.pop("head")}
    return state


# ---------------------------------------------------------------- going on from one

# What each TrainConfig field means to a checkpoint, and so whether a run may go on from a
# checkpoint made with another value of it:
#   how     how to run, not what (resources, storage, logging, retries): may change freely;
#   phase1  what phase 1 computes: a run started from another run's checkpoint
#           (--init-checkpoint, as sweep trials start from their shared phase 1) must share
#           these, and so must a run resumed by name;
#   recipe  the rest of what a run computes: a run resumed by name must share these too.
FIELDS = {
    # The world size is "how": the global batch and the steps per epoch do not depend on it.
    "data": "how", "storage": "how", "workers": "how", "min_workers": "how",
    "resize_check_s": "how", "use_gpu": "how",
    "cpus_per_worker": "how", "gpus_per_worker": "how", "compile": "how",
    "keep_checkpoints": "how", "checkpoint_upload": "how", "max_failures": "how",
    "storage_retry_s": "how", "resource_timeout_s": "how", "mlflow_tracking_uri": "how",
    "mlflow_experiment": "how", "progress_s": "how", "log_level": "how",
    "ray_log_level": "how", "overwrite": "how", "smoke": "how",
    "dataset": "phase1", "weights": "phase1", "weights_sha256": "phase1",
    "image_size": "phase1", "phase1": "phase1", "cache_features": "phase1", "seed": "phase1",
    "name": "recipe", "phase2": "recipe", "init_checkpoint": "recipe",
}
MUST_MATCH = {"resume": ("phase1", "recipe"), "init": ("phase1",)}


def mismatches(stored: dict, cfg: TrainConfig, going_on: str) -> list[str]:
    """The fields on which a stored config (a run's config.json, a checkpoint's) differs
    from cfg, of those that must match for `going_on` from it: "resume" (the same run,
    resumed by name) or "init" (another run's checkpoint, as --init-checkpoint)."""
    ours = cfg.to_dict()
    return sorted(k for k, role in FIELDS.items()
                  if role in MUST_MATCH[going_on] and stored.get(k) != ours[k])


def resume_state(cfg: TrainConfig) -> tuple[dict | None, str | None]:
    """(checkpoint state, where from) that a run starts from: its own newest complete
    checkpoint (Ray restarted it, or it is resumed by name; Ray's own get_checkpoint() may be
    older, see newest_complete), else --init-checkpoint if it fits, else nothing."""
    newest = newest_complete(cfg.run_uri())
    if newest is not None:  # read in place: a few parallel GETs, no local copy
        return load_uri(newest), storage.display(newest)
    if cfg.init_checkpoint:
        loaded = load_uri(cfg.init_checkpoint)
        diff = mismatches(loaded["config"], cfg, "init")
        if diff:
            raise CheckpointError(f"--init-checkpoint {storage.display(cfg.init_checkpoint)}: "
                                  f"trained with different {', '.join(diff)}")
        return loaded, storage.display(cfg.init_checkpoint)
    return None, None


# ---------------------------------------------------------------- a classifier from one


def load_classifier(source: str | dict, device="cpu"):
    """(model, state): the checkpoint's classifier in eval mode on `device`, and the
    checkpoint's state (its config, phase, epoch...). `source` is a checkpoint folder (path
    or s3://), or a state already loaded from one."""
    import torch

    from cifar_ray.model import build

    loaded = load_uri(source) if isinstance(source, str) else source
    num_classes = loaded["model"]["head.4.bias"].shape[0]  # the head's last Linear
    model = build("none", num_classes=num_classes)
    model.load_state_dict(loaded["model"])
    return model.to(torch.device(device)).eval(), loaded


def export_backbone(source: str, out: str, overwrite: bool = False) -> dict:
    """Write the backbone of a checkpoint (or of a finished run's best checkpoint) as a plain
    torchvision ResNet50 state_dict (tensors only, without `fc`), the file any run takes as
    `--weights OUT --weights-sha256 HEX`. Returns {weights, sha256, checkpoint, tensors,
    bytes}.

        cifar-ray export results/src/checkpoint-p2-e009 weights/src-backbone.pt
    """
    import torch

    from cifar_ray import runs  # runs imports this module

    ckpt = source
    if not storage.exists(storage.join(source, STATE)):
        result = runs.read_json(storage.join(source, runs.RESULT))
        if result is None:
            raise CheckpointError(
                f"{storage.display(source)}: neither a checkpoint folder (no {STATE}) nor a "
                f"finished run (no {runs.RESULT}); give a checkpoint-p<phase>-e<epoch> folder "
                "or a run folder whose run has finished")
        ckpt = result["best_checkpoint"]
    if storage.exists(out) and not overwrite:
        raise CheckpointError(f"{storage.display(out)} exists; choose another path or pass "
                              "--overwrite to replace it")
    model = load_uri(ckpt)["model"]
    backbone = {k[len("backbone."):]: v.detach().clone() for k, v in model.items()
                if k.startswith("backbone.")}
    if not backbone:
        raise CheckpointError(f"{storage.display(ckpt)}: its model has no backbone tensors")
    buf = io.BytesIO()
    torch.save(backbone, buf)
    data = buf.getvalue()
    storage.write_bytes(out, data)
    return {"weights": storage.display(out), "sha256": hashlib.sha256(data).hexdigest(),
            "checkpoint": storage.display(ckpt), "tensors": len(backbone), "bytes": len(data)}

