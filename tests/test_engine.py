"""Plain-PyTorch pieces on CPU tensors: augmentation, preprocessing, schedules, evaluation."""

import math

import pytest
import torch

from cifar_ray import engine
from cifar_ray.config import PhaseConfig


def _batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)


def test_augment_shape_dtype_range_and_determinism():
    x = _batch()
    a = engine.augment(x, torch.Generator().manual_seed(1))
    b = engine.augment(x, torch.Generator().manual_seed(1))
    c = engine.augment(x, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and a.dtype == torch.uint8
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_augment_is_a_padded_crop_or_its_mirror():
    """Every output image equals some 4-px shifted window of the zero-padded input, maybe
    flipped: the augmentation moves pixels, it never invents them."""
    x = _batch(8)
    out = engine.augment(x, torch.Generator().manual_seed(3))
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(len(x)):
        windows = [padded[i, :, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(-1)) for w in windows)


def test_augment_flips_about_half():
    x = torch.zeros(2000, 3, 32, 32, dtype=torch.uint8)
    x[..., :16] = 255  # left half white: a flip moves the white to the right
    out = engine.augment(x, torch.Generator().manual_seed(0), pad=0)
    flipped = (out[:, 0, 16, 0] == 0).float().mean().item()
    assert 0.4 < flipped < 0.6


def test_preprocess_normalises_and_upsamples():
    x = torch.full((2, 3, 32, 32), 255, dtype=torch.uint8)
    y = engine.preprocess(x)
    assert y.dtype == torch.float32
    expected = (1 - torch.tensor(engine.MEAN)) / torch.tensor(engine.STD)
    assert torch.allclose(y[0, :, 0, 0], expected)
    up = engine.preprocess(x, image_size=64, channels_last=True)
    assert up.shape == (2, 3, 64, 64)
    assert up.is_contiguous(memory_format=torch.channels_last)


def test_warmup_then_cosine_schedule():
    pc = PhaseConfig(epochs=4, lr=1.0, warmup_epochs=1.0)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = engine.make_optimizer(pc, [p])
    sched = engine.make_scheduler(opt, pc, steps_per_epoch=10)
    lrs = []
    for _ in range(40):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == 0.1 and lrs[9] == 1.0  # linear warmup over 10 steps
    assert math.isclose(lrs[10], 1.0) and lrs[-1] < 0.01
    assert all(a >= b for a, b in zip(lrs[10:-1], lrs[11:], strict=True))  # monotone decay


def test_optimizers_only_take_trainable_params():
    a = torch.nn.Parameter(torch.zeros(1))
    b = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
    for name in ("adamw", "adam", "sgd"):
        opt = engine.make_optimizer(PhaseConfig(optimizer=name), [a, b])
        assert opt.param_groups[0]["params"] == [a]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")])])
def test_adam_is_fused_on_cuda_only_and_steps_the_same(device):
    """Fused Adam(W) on CUDA (one kernel for all tensors); on CPU the default. Either way
    one step moves the weights as the reference update does."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, device=device))
    ref = torch.nn.Parameter(w.detach().clone())
    opt = engine.make_optimizer(PhaseConfig(optimizer="adamw", lr=0.1, weight_decay=0.05), [w])
    plain = torch.optim.AdamW([ref], lr=0.1, weight_decay=0.05, foreach=False)
    assert bool(opt.defaults.get("fused")) == (device == "cuda")
    for p, o in ((w, opt), (ref, plain)):
        p.grad = torch.linspace(-1, 1, 64, device=device)
        o.step()
    torch.testing.assert_close(w, ref)


def test_train_one_epoch_learns_and_evaluate_counts():
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = (x[:, 0] > 0).long()
    model = torch.nn.Linear(8, 2)
    pc = PhaseConfig(epochs=5, lr=0.1)
    opt = engine.make_optimizer(pc, model.parameters())
    sched = engine.make_scheduler(opt, pc, 256 // 32)
    optim = engine.Optimization(opt, sched, torch.nn.CrossEntropyLoss())
    before = engine.evaluate(model, engine.batches(x, y, 64))
    for epoch in range(5):
        stats = engine.train_one_epoch(
            model, engine.batches(x, y, 32, gen=torch.Generator().manual_seed(epoch)), optim)
        assert stats["count"] == 256
    after = engine.evaluate(model, engine.batches(x, y, 64), return_predictions=True)
    assert after["count"] == 256 and len(after["predictions"]) == 256
    assert after["correct"] / 256 > 0.9 > before["correct"] / 256
    assert after["loss_sum"] < before["loss_sum"]


def test_bf16_autocast_path_runs_on_cpu():
    """The CUDA path uses bf16 autocast; the same code path runs here on CPU tensors."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 4))
    x, y = torch.randn(64, 8), torch.randint(0, 4, (64,))
    pc = PhaseConfig(epochs=1, lr=0.01)
    optim = engine.Optimization.for_phase(pc, model.parameters(), 4, amp_dtype=torch.bfloat16)
    stats = engine.train_one_epoch(model, engine.batches(x, y, 16, gen=torch.Generator()), optim)
    assert math.isfinite(stats["loss_sum"]) and stats["count"] == 64
