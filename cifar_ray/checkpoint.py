"""Checkpoint files: one torch file plus its sha256, loaded with `weights_only=True`.

    cifar-ray evaluate results/smoke/checkpoint-p2-e000     # loads one through load_uri

The digest file is written after the state file, so a checkpoint whose upload stopped half
way fails verification with a clear error instead of loading garbage.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath

import pyarrow.fs as pafs
import torch

from cifar_ray import storage
from cifar_ray.errors import UserError

STATE = "state.pt"
DIGEST = "state.pt.sha256"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is incomplete, corrupted or not ours; the message names it."""


def write_dir(state: dict, directory: str) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    with open(os.path.join(directory, STATE), "wb") as f:
        f.write(data)
    with open(os.path.join(directory, DIGEST), "w") as f:
        f.write(hashlib.sha256(data).hexdigest())


def _load(data: bytes, digest: str | None, where: str) -> dict:
    if digest is None:
        raise CheckpointError(f"{where}: {DIGEST} missing; the checkpoint is incomplete")
    if hashlib.sha256(data).hexdigest() != digest.strip():
        raise CheckpointError(f"{where}: sha256 mismatch; the checkpoint is incomplete or "
                              "was modified")
    try:
        # weights_only: tensors, numbers, strings and containers only; no code runs.
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
        return _load(f.read(), digest, directory)


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
    return _load(data, digest, label)


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


def export_backbone(source: str, out: str, overwrite: bool = False) -> dict:
    """Write the backbone of a checkpoint (or of a finished run's best checkpoint) as a plain
    torchvision ResNet50 state_dict (tensors only, without `fc`), the file any run takes as
    `--weights OUT --weights-sha256 HEX`. Returns {weights, sha256, checkpoint, tensors,
    bytes}.

        cifar-ray export results/src/checkpoint-p2-e009 weights/src-backbone.pt
    """
    from cifar_ray import runs  # runs imports nothing of ours but storage

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
