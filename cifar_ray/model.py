"""ResNet50 backbone + the small classification head; weights; freezing per phase.

    python -c "from cifar_ray.model import build; print(build('none'))"

The head mirrors the original Keras recipe: GlobalAvgPool -> Dense 128 ReLU -> Dense 64 ReLU
-> 10 logits (cross-entropy on logits, so no softmax layer).
"""

from __future__ import annotations

import hashlib
import io
import os

import torch
import torchvision
from torch import nn

from cifar_ray import storage
from cifar_ray.errors import UserError

FEATURES = 2048  # ResNet50's pooled feature width


class WeightsError(UserError, ValueError):
    """Backbone weights cannot be had or do not match; the message names the source."""


class Classifier(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        backbone = torchvision.models.resnet50(weights=None)
        backbone.fc = nn.Identity()  # keep conv stages + global average pool (2048-d)
        self.backbone = backbone
        self.head = nn.Sequential(
            nn.Linear(FEATURES, 128), nn.ReLU(inplace=True),
            nn.Linear(128, 64), nn.ReLU(inplace=True),
            nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _imagenet_state_dict() -> dict[str, torch.Tensor]:
    from filelock import FileLock

    weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V2
    hub = torch.hub.get_dir()
    os.makedirs(hub, exist_ok=True)
    # Workers on one node share the hub cache: download once, the rest read the file.
    with FileLock(os.path.join(hub, "cifar_ray_imagenet.lock")):
        try:
            return weights.get_state_dict(progress=False)
        except Exception as e:  # URLError, HTTPError, socket timeouts: no internet
            raise WeightsError(
                f"could not download ImageNet weights ({weights.url}): {e}. Without internet, "
                "pass --weights <path or s3:// URI of a ResNet50 state_dict> (optionally with "
                "--weights-sha256), or --weights none") from e


def load_state_dict(uri: str, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """A state_dict from a path/URI, checked against sha256, loaded without unpickling code."""
    try:
        data = storage.read_bytes(uri)
    except storage.StorageError as e:
        raise WeightsError(f"--weights {storage.display(uri)}: {e}") from e
    if sha256 is not None:
        got = hashlib.sha256(data).hexdigest()
        if got != sha256.lower():
            raise WeightsError(f"--weights {storage.display(uri)}: sha256 is {got}, but "
                               f"--weights-sha256 expects {sha256.lower()}")
    try:
        # weights_only: a tampered file with a pickle payload is refused, not executed.
        sd = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"--weights {storage.display(uri)}: not a loadable state_dict "
                           f"({type(e).__name__}: {e})") from e
    if not isinstance(sd, dict):
        raise WeightsError(f"--weights {storage.display(uri)}: holds a {type(sd).__name__}, "
                           "expected a state_dict")
    return sd


def backbone_tensors(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The backbone's tensors (keys as in Classifier.backbone) of a torchvision ResNet50
    state_dict (its 1000-class `fc` dropped) or of one with a `backbone.` prefix."""
    if any(k.startswith("backbone.") for k in sd):
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    return {k: v for k, v in sd.items() if not k.startswith("fc.")}


def load_backbone(model: Classifier, weights: str, sha256: str | None = None) -> None:
    """Fill the backbone from `imagenet`, `none` (keep random init) or a path/URI.

    Accepts a full torchvision ResNet50 state_dict (its 1000-class `fc` is dropped) or one
    with a `backbone.` prefix (e.g. saved from this Classifier)."""
    if weights == "none":
        return
    sd = _imagenet_state_dict() if weights == "imagenet" else load_state_dict(weights, sha256)
    sd = backbone_tensors(sd)
    try:
        model.backbone.load_state_dict(sd, strict=True)
    except RuntimeError as e:  # missing/unexpected keys or shape mismatches
        raise WeightsError(f"--weights {storage.display(weights)}: not a ResNet50 state_dict "
                           f"({str(e).splitlines()[0]} ...)") from e


def build(weights: str = "none", sha256: str | None = None, num_classes: int = 10,
          seed: int = 0) -> Classifier:
    torch.manual_seed(seed)  # same head init on every rank, before DDP's broadcast
    model = Classifier(num_classes)
    load_backbone(model, weights, sha256)
    return model


def set_phase(model: Classifier, phase: int) -> None:
    """Phase 1 trains the head only; phase 2 trains everything."""
    model.backbone.requires_grad_(phase == 2)
    model.head.requires_grad_(True)


def train_mode(model: Classifier, phase: int) -> None:
    """model.train(), except that in phase 1 the frozen backbone stays in eval mode so its
    BatchNorm running statistics do not move (Keras does the same for a frozen base)."""
    model.train()
    if phase == 1:
        model.backbone.eval()
