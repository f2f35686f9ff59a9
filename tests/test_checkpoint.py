"""Checkpoint files: integrity (sha256) and safe loading (weights_only), no Ray needed.

    python -m pytest -q tests/test_checkpoint.py
"""

from __future__ import annotations

import hashlib
import pickle

import pytest
import torch

from cifar_ray import checkpoint
from cifar_ray.cli import main as cli


def _write(directory, blob: bytes) -> None:
    (directory / checkpoint.STATE).write_bytes(blob)
    (directory / checkpoint.DIGEST).write_text(hashlib.sha256(blob).hexdigest())


def test_round_trip_and_an_incomplete_checkpoint_is_refused(tmp_path):
    state = {"phase": 2, "epoch": 3, "model": {"w": torch.ones(2, 2)}}
    checkpoint.write_dir(state, str(tmp_path))
    loaded = checkpoint.load_dir(str(tmp_path))
    assert loaded["epoch"] == 3 and torch.equal(loaded["model"]["w"], torch.ones(2, 2))
    blob = (tmp_path / checkpoint.STATE).read_bytes()
    (tmp_path / checkpoint.STATE).write_bytes(blob[: len(blob) // 2])  # upload cut half way
    with pytest.raises(checkpoint.CheckpointError, match="sha256 mismatch"):
        checkpoint.load_dir(str(tmp_path))
    (tmp_path / checkpoint.DIGEST).unlink()
    with pytest.raises(checkpoint.CheckpointError, match="incomplete"):
        checkpoint.load_dir(str(tmp_path))


def test_a_tampered_checkpoint_with_a_pickle_payload_is_refused_and_never_runs(tmp_path,
                                                                               capsys):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    ckpt = tmp_path / "checkpoint-p2-e000"
    ckpt.mkdir()
    # The attacker also rewrote the digest: integrity passes, weights_only must still refuse.
    buf = tmp_path / "evil.pt"
    torch.save({"model": {}, "config": Payload()}, buf, pickle_module=pickle)
    _write(ckpt, buf.read_bytes())
    with pytest.raises(checkpoint.CheckpointError, match="refused to load"):
        checkpoint.load_dir(str(ckpt))
    with pytest.raises(checkpoint.CheckpointError, match="refused to load"):
        checkpoint.load_uri(str(ckpt))
    # Through the CLI a user would run on a downloaded checkpoint: a one-line error.
    assert cli(["evaluate", str(ckpt)]) == 2
    assert "refused to load" in capsys.readouterr().err
    assert not marker.exists()
