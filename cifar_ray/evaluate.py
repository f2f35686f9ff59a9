"""A stored checkpoint's accuracy on a dataset split: plain PyTorch, runs anywhere.

    cifar-ray evaluate results/smoke/checkpoint-p2-e000 --split test

Used by `cifar-ray evaluate`, by `inspect --plots` (no Ray at all) and, with a worker's
resources, by the end of a run and of a sweep (train.evaluate_on_a_worker).
"""

from __future__ import annotations

import torch

from cifar_ray import checkpoint, data, engine
from cifar_ray.config import TrainConfig
from cifar_ray.runtime import Runtime, image_transform

EVAL_BATCH = 512


def evaluate_checkpoint(ckpt_uri: str, cfg: TrainConfig, split: str = "test",
                        state: dict | None = None) -> dict:
    """Loss and accuracy of a checkpoint on a split of cfg's dataset (no augmentation), with
    labels and predictions. `state`: the checkpoint's contents when the caller has already
    loaded them."""
    device = torch.device("cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu")
    model, state = checkpoint.load_classifier(state if state is not None else ckpt_uri, device)
    uri = cfg.dataset_uri()
    manifest = data.read_manifest(uri)
    s = data.load_split(uri, split, manifest=manifest)
    rt = Runtime.for_device(device)
    y = torch.from_numpy(s.labels).to(device)
    out = engine.evaluate(model, engine.batches(engine.to_tensor(s.images, device), y,
                                                EVAL_BATCH, image_transform(cfg.image_size, rt)),
                          rt.amp_dtype, return_predictions=True)
    n = max(out["count"], 1)
    return {"loss": out["loss_sum"] / n, "accuracy": out["correct"] / n, "count": out["count"],
            "split": split, "checkpoint": ckpt_uri, "phase": state["phase"],
            "epoch": state["epoch"], "labels": s.labels.tolist(),
            "predictions": out["predictions"].tolist(), "classes": manifest["classes"]}
