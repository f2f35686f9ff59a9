"""The GPU path's correctness checks (cifar_ray/devicecheck.py) and
`jobs/experiments/gpu_check.py`.

    python -m pytest -q tests/test_devicecheck.py            # CPU; the gpu-marked ones skip
    python -m pytest -q -m gpu                               # on a machine with CUDA

Every check runs on CPU in the ordinary suite with the production settings forced (bf16
autocast, channels_last: this CPU runs bf16 too), and again on CUDA where there is one.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cifar_ray import devicecheck, model
from cifar_ray.recipe import BatchTooLargeError, PhaseLoop
from cifar_ray.runtime import DeviceSplits

REPO = Path(__file__).resolve().parents[1]
CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: the same check runs on CPU")])
DEVICES = ["cpu", CUDA]


@pytest.mark.parametrize("device", DEVICES)
def test_one_rank_is_not_ddp_inputs_are_channels_last_and_logits_bf16(device):
    devicecheck.layout_and_precision(torch.device(device))


@pytest.mark.parametrize("device", DEVICES)
def test_two_phases_with_bf16_and_channels_last(device):
    out = devicecheck.two_phases(torch.device(device), n=64, batch=32)
    assert out["phase2_changed"] > 0 and len(out["losses"]) == 4


@pytest.mark.parametrize("device", DEVICES)
def test_cached_features_match_float32_ones(device):
    assert devicecheck.cached_features(torch.device(device), n=32)["relative_error"] < 0.02


@pytest.mark.parametrize("device", DEVICES)
def test_augmentation_on_the_device_is_seeded(device):
    devicecheck.augmentation(torch.device(device), n=32)


@pytest.mark.parametrize("device", DEVICES)
def test_a_checkpoint_from_the_device_predicts_the_same_on_cpu(device):
    assert devicecheck.checkpoint_to_cpu(torch.device(device), n=32)["agreement"] >= 0.98


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device to run out of")
def test_a_batch_that_does_not_fit_names_the_flag_and_the_memory():
    # 262,144 images at 224 px are 157 GiB as float input: more than any single GPU holds.
    device = torch.device("cuda")
    n = 2**18
    splits = DeviceSplits(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8,
                                        device=device),
                          torch.randint(0, 10, (n,), device=device),
                          torch.zeros(0, 3, 32, 32, dtype=torch.uint8, device=device),
                          torch.zeros(0, dtype=torch.long, device=device))
    cfg = devicecheck.small_config(batch=n, image_size=224)
    cfg = dataclasses.replace(cfg, phase1=dataclasses.replace(cfg.phase1, epochs=0))
    m = model.build("none").to(device)
    with pytest.raises(BatchTooLargeError, match=r"--phase2-batch-size 262144: .* GiB"):
        PhaseLoop(cfg, m, splits, devicecheck.production_runtime(device),
                  report=lambda metrics, state: None).run()


def test_a_failed_expectation_names_itself():
    with pytest.raises(devicecheck.CheckFailed, match="phase 2 did not change"):
        devicecheck.expect(False, "phase 2 did not change the backbone")


@pytest.mark.ray
def test_gpu_check_script_runs_on_cpu_in_tiny_mode(tmp_path):
    """The one-command GPU check, as CI can run it: PYTHONPATH=. from a plain checkout, on
    CPU, including its TorchTrainer run through jobs/train.py (a Ray instance of its own)."""
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, "jobs/experiments/gpu_check.py", "--device", "cpu",
                           "--tiny", "--out", str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=900,
                          env={"PYTHONPATH": ".", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["checks"]) == set(devicecheck.CHECKS)
    assert not any("error" in v for v in report["checks"].values()), report["checks"]
    row = report["speed"]["32"]
    assert row["features_images_per_s"] > 0 and row["eager"]["images_per_s"] > 0
    assert 0 <= report["ray"]["evaluated_acc"] <= 1
    assert "0 failed" in done.stdout
