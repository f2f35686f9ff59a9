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


def test_export_writes_the_backbone_that_weights_loads_with_its_sha256(tmp_path, capsys):
    """`cifar-ray export` of a run's checkpoint: a plain ResNet50 state_dict (tensors only, no
    head, no optimizer, no `fc`) that --weights loads with the sha256 it printed, and that a
    wrong sha256 gets refused."""
    import json

    import torchvision

    from cifar_ray import model as M
    from cifar_ray import runs

    trained = M.build("none", seed=3)
    with torch.no_grad():
        trained.backbone.conv1.weight.add_(1.0)  # unlike any fresh init
    state = {"model": trained.state_dict(), "optimizer": {"state": {}, "param_groups": []},
             "phase": 2, "epoch": 4, "history": [], "config": {}}
    ckpt = tmp_path / "run" / "checkpoint-p2-e004"
    ckpt.mkdir(parents=True)
    checkpoint.write_dir(state, str(ckpt))
    out = tmp_path / "backbone.pt"
    assert cli(["export", str(ckpt), str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()

    sd = torch.load(out, weights_only=True)
    reference = torchvision.models.resnet50(weights=None).state_dict()
    assert set(sd) == {k for k in reference if not k.startswith("fc.")}
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    loaded = M.build(str(out), printed["sha256"], num_classes=5, seed=9)
    for k, v in trained.backbone.state_dict().items():
        assert torch.equal(loaded.backbone.state_dict()[k], v), k
    with pytest.raises(M.WeightsError, match="sha256 is"):
        M.build(str(out), "0" * 64)

    # A finished run folder exports its best checkpoint; nothing is overwritten silently.
    runs.write_json(str(tmp_path / "run" / runs.RESULT), {"best_checkpoint": str(ckpt)})
    assert cli(["export", str(tmp_path / "run"), str(out)]) == 2
    assert "exists; choose another path or pass --overwrite" in capsys.readouterr().err
    assert cli(["export", str(tmp_path / "run"), str(out), "--overwrite"]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoint"] == str(ckpt)
    assert cli(["export", str(tmp_path), str(tmp_path / "x.pt")]) == 2
    assert "neither a checkpoint folder" in capsys.readouterr().err


def test_every_config_field_has_one_rule_for_going_on_from_a_checkpoint():
    """A new TrainConfig field must say whether it may change on a resume: a field without a
    rule would be neither compared nor knowingly ignored."""
    import dataclasses

    from cifar_ray.config import TrainConfig

    assert set(checkpoint.FIELDS) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(checkpoint.FIELDS.values()) == {"how", "phase1", "recipe"}


def test_a_resume_needs_the_same_recipe_and_an_init_checkpoint_the_same_phase_1():
    from cifar_ray.config import PhaseConfig, TrainConfig

    stored = TrainConfig(weights="none").to_dict()
    other_how = TrainConfig(weights="none", workers=4, storage="s3://b/runs", log_level="DEBUG")
    other_lr = TrainConfig(weights="none", phase2=PhaseConfig(lr=3e-4))
    other_p1 = TrainConfig(weights="none", phase1=PhaseConfig(epochs=3), seed=7)
    assert checkpoint.mismatches(stored, other_how, "resume") == []
    assert checkpoint.mismatches(stored, other_lr, "resume") == ["phase2"]
    assert checkpoint.mismatches(stored, other_lr, "init") == []  # a sweep trial's own LR
    assert checkpoint.mismatches(stored, other_p1, "init") == ["phase1", "seed"]


def test_load_classifier_gives_the_checkpoints_model_in_eval_mode(tmp_path):
    from cifar_ray import model as M

    trained = M.build("none", num_classes=5, seed=4)
    checkpoint.write_dir({"model": trained.state_dict(), "phase": 1, "epoch": 2}, str(tmp_path))
    loaded, state = checkpoint.load_classifier(str(tmp_path))
    assert not loaded.training and state["epoch"] == 2
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), trained.eval()(x))


def test_a_phase_1_checkpoint_holds_the_head_and_finds_its_frozen_backbone(tmp_path):
    """Phase 1 changes only the head: its checkpoint refers to the frozen backbone (written
    once, named by its digest) and loads whole; a changed or missing backbone is refused,
    naming the file and the digest the checkpoint expects."""
    import os

    from cifar_ray import model as M
    from cifar_ray.config import TrainConfig

    cfg = TrainConfig(weights="none", storage=str(tmp_path), name="r")
    trained = M.build("none", seed=5)
    state = {"model": trained.state_dict(), "phase": 1, "epoch": 0, "history": []}
    ref = checkpoint.frozen_backbone(cfg, state["model"])
    assert ref == checkpoint.frozen_backbone(cfg, state["model"])  # the same file, once
    assert len([n for n in os.listdir(tmp_path / "r") if n.startswith("backbone-")]) == 1
    ckpt = tmp_path / "r" / checkpoint.dir_name(1, 0)
    ckpt.mkdir()
    checkpoint.write_dir(checkpoint.head_only(state, ref), str(ckpt))
    assert (ckpt / checkpoint.STATE).stat().st_size < 2 * 2**20 < os.path.getsize(ref["uri"])
    loaded = checkpoint.load_uri(str(ckpt))
    assert set(loaded["model"]) == set(state["model"]) and "head" not in loaded
    assert all(torch.equal(loaded["model"][k], v) for k, v in state["model"].items())

    blob = open(ref["uri"], "rb").read()
    open(ref["uri"], "wb").write(blob[:-1] + bytes([blob[-1] ^ 1]))
    with pytest.raises(checkpoint.CheckpointError,
                       match=f"frozen backbone {ref['uri']} has sha256 .* expects "
                             f"{ref['sha256']}"):
        checkpoint.load_uri(str(ckpt))
    os.remove(ref["uri"])
    with pytest.raises(checkpoint.CheckpointError, match=f"{ref['uri']} .*cannot be read"):
        checkpoint.load_dir(str(ckpt))


def test_a_phase_1_checkpoint_of_a_run_given_weights_refers_to_that_file(tmp_path):
    from cifar_ray import model as M
    from cifar_ray.config import TrainConfig

    weights = tmp_path / "backbone.pt"
    torch.save({k: v for k, v in M.build("none", seed=6).backbone.state_dict().items()},
               weights)
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    cfg = TrainConfig(weights=str(weights), storage=str(tmp_path), name="r")
    trained = M.build(str(weights), sha)
    ref = checkpoint.frozen_backbone(cfg, trained.state_dict())
    assert ref == {"uri": str(weights), "sha256": sha}
    assert not (tmp_path / "r").exists()  # nothing written: the file is already there
    state = checkpoint.head_only({"model": trained.state_dict(), "phase": 1, "epoch": 3}, ref)
    checkpoint.write_dir(state, str(tmp_path))
    model, loaded = checkpoint.load_classifier(str(tmp_path))
    assert loaded["epoch"] == 3
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.state_dict().items())
