"""A stored checkpoint's accuracy on a dataset split: plain PyTorch, runs anywhere.

    cifar-ray evaluate results/smoke/checkpoint-p2-e000 --split test

Used by `cifar-ray evaluate`, by `inspect --plots` (no Ray at all) and, as a Ray task on a
worker's resources, by the end of a run and of a sweep (train.evaluate_remote).
"""

from __future__ import annotations

import torch

from cifar_ray import checkpoint, data, engine
from cifar_ray.config import TrainConfig
from cifar_ray.model import Classifier, build
from cifar_ray.recipe import Runtime, image_transform


@torch.no_grad()
def evaluate_split(model: Classifier, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
                   rt: Runtime, batch_size: int = 512) -> dict:
    """Loss, accuracy and predictions of `model` on one split (no augmentation)."""
    out = engine.evaluate(model, x, y, batch_size=batch_size,
                          transform=image_transform(cfg, rt, augment=False, gen=None),
                          amp_dtype=rt.amp_dtype, return_predictions=True)
    n = max(out["count"], 1)
    return {"loss": out["loss_sum"] / n, "accuracy": out["correct"] / n, "count": out["count"],
            "predictions": out["predictions"]}


def evaluate_checkpoint(ckpt_uri: str, cfg: TrainConfig, split: str = "test",
                        state: dict | None = None) -> dict:
    """Accuracy of a checkpoint on a split of cfg's dataset, with labels and predictions.
    `state`: the checkpoint's contents when the caller has already loaded them."""
    device = torch.device("cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu")
    state = state if state is not None else checkpoint.load_uri(ckpt_uri)
    uri = cfg.dataset_uri()
    manifest = data.read_manifest(uri)
    s = data.load_split(uri, split, manifest=manifest)
    model = build("none", num_classes=len(manifest["classes"]))
    model.load_state_dict(state["model"])
    model.to(device)
    y = torch.from_numpy(s.labels).to(device)
    out = evaluate_split(model, engine.to_tensor(s.images, device), y, cfg,
                         Runtime.for_device(device))
    preds = out.pop("predictions").tolist()
    return {**out, "split": split, "checkpoint": ckpt_uri, "phase": state["phase"],
            "epoch": state["epoch"], "labels": s.labels.tolist(), "predictions": preds,
            "classes": manifest["classes"]}
