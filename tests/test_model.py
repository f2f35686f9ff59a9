"""ResNet50 + head: architecture, phase freezing, weights loading (no downloads here)."""

import hashlib
import pickle

import pytest
import torch
import torchvision

from cifar_ray import engine
from cifar_ray import model as M
from cifar_ray.config import PhaseConfig


@pytest.fixture(scope="module")
def base_state():
    return M.build("none", seed=0).state_dict()


def _fresh(base_state):
    m = M.Classifier()
    m.load_state_dict(base_state)
    return m


def test_head_architecture_and_output_shape(base_state):
    m = _fresh(base_state)
    layers = [type(layer).__name__ for layer in m.head]
    assert layers == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert [(layer.in_features, layer.out_features) for layer in m.head if
            isinstance(layer, torch.nn.Linear)] == [(2048, 128), (128, 64), (64, 10)]
    assert isinstance(m.backbone.avgpool, torch.nn.AdaptiveAvgPool2d)  # GlobalAvgPool
    m.eval()
    out = m(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 10) and torch.isfinite(out).all()


def _step(m, phase, steps=2):
    M.set_phase(m, phase)
    M.train_mode(m, phase)
    opt = engine.make_optimizer(PhaseConfig(lr=1e-2), m.parameters())
    for i in range(steps):
        x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(i))
        loss = torch.nn.functional.cross_entropy(m(x), torch.arange(8) % 10)
        opt.zero_grad()
        loss.backward()
        grads = {n for n, p in m.named_parameters() if p.grad is not None}
        opt.step()
    return grads


def test_phase1_step_changes_only_the_head(base_state):
    m = _fresh(base_state)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    grads = _step(m, 1)
    assert grads == {n for n, _ in m.named_parameters() if n.startswith("head.")}
    after = m.state_dict()
    backbone = [k for k in before if k.startswith("backbone.")]
    # Weights AND BatchNorm running statistics are bit-identical (BN kept in eval mode).
    assert any("running_mean" in k for k in backbone)
    assert all(torch.equal(before[k], after[k]) for k in backbone)
    assert not all(torch.equal(before[k], after[k]) for k in before if k.startswith("head."))


def test_phase2_step_changes_the_backbone(base_state):
    m = _fresh(base_state)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    grads = _step(m, 2)
    assert grads == {n for n, _ in m.named_parameters()}
    after = m.state_dict()
    assert not torch.equal(before["backbone.conv1.weight"], after["backbone.conv1.weight"])
    assert not torch.equal(before["backbone.bn1.running_mean"], after["backbone.bn1.running_mean"])


def test_cached_features_give_the_same_head_gradients(base_state):
    """Phase 1 on cached features is the same optimisation problem as on images."""
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(16) % 10
    grads = []
    for cached in (False, True):
        m = _fresh(base_state)
        M.set_phase(m, 1)
        M.train_mode(m, 1)
        if cached:
            feats = engine.extract_features(m.backbone, x, batch_size=5,
                                            transform=engine.preprocess)
            logits = m.head(feats)
        else:
            logits = m(engine.preprocess(x))
        torch.nn.functional.cross_entropy(logits, y).backward()
        grads.append([p.grad.clone() for p in m.head.parameters()])
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_weights_from_a_torchvision_state_dict_with_sha256(tmp_path):
    ref = torchvision.models.resnet50(weights=None)
    path = tmp_path / "r50.pt"
    torch.save(ref.state_dict(), path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    m = M.build(str(path), digest)
    assert torch.equal(m.backbone.conv1.weight, ref.conv1.weight)
    assert torch.equal(m.backbone.layer4[2].bn3.running_var, ref.layer4[2].bn3.running_var)
    with pytest.raises(M.WeightsError, match=r"sha256 is .* but --weights-sha256 expects"):
        M.build(str(path), "0" * 64)


def test_tampered_weights_with_a_pickle_payload_are_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"conv1.weight": Payload()}))
    with pytest.raises(M.WeightsError, match="not a loadable state_dict"):
        M.build(str(path))
    assert not (tmp_path / "pwned").exists()


def test_wrong_state_dict_and_missing_file_are_named(tmp_path):
    path = tmp_path / "r18.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(M.WeightsError, match="not a ResNet50 state_dict"):
        M.build(str(path))
    with pytest.raises(M.WeightsError, match="nope.pt"):
        M.build(str(tmp_path / "nope.pt"))


def test_imagenet_offline_names_the_path_option(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache: a download is attempted
    with pytest.raises(M.WeightsError, match="--weights <path or s3:// URI"):
        M.build("imagenet")
