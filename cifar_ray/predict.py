"""Classes of image files, from a checkpoint.

    cifar-ray predict results/r50/checkpoint-p2-e009 cat.jpg photos/ shots.tar.gz --top-k 3
    cifar-ray predict s3://bucket/runs/r50/checkpoint-p2-e009 s3://bucket/new-images/ --json

Images of any size are resized to 32x32 as the dataset's were (data.decode), then go through
the checkpoint's own preprocessing (its --image-size). Inputs: image files (.jpg/.png), folders
and tar archives of them, local or s3:// prefixes. An image that does not decode is reported
by name and skipped. Small sets run in this process; with --ray (or from RAY_ADDRESS sets of
RAY_MIN images or more) they go through Ray Data: `map_batches` with the model loaded once per
actor, on a GPU with --use-gpu.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from cifar_ray import checkpoint, data, engine, storage
from cifar_ray.config import TrainConfig
from cifar_ray.errors import UserError
from cifar_ray.runtime import Runtime, image_transform

log = logging.getLogger(__name__)

RAY_MIN = 2000  # images from which a run with RAY_ADDRESS set goes through Ray Data


class PredictError(UserError, ValueError):
    """An input that cannot be read at all (not one bad image: those are skipped)."""


def list_images(sources: list[str]) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every image in the sources: files, folders, tars, s3:// prefixes."""
    for src in sources:
        fs, path = storage.resolve(src)
        info = fs.get_file_info(path)
        name = storage.display(src)
        if info.type == storage.pafs.FileType.NotFound:
            raise PredictError(f"{name}: no such file, folder or archive")
        if info.type == storage.pafs.FileType.File and path.lower().endswith(data.IMAGE_EXTS):
            yield name, storage.read_bytes(src)
            continue
        found = False
        for rel, blob in data.iter_images(src):  # a folder, a prefix or a tar of images
            found = True
            yield f"{name.rstrip('/')}/{rel}", blob
        if not found:
            raise PredictError(f"{name}: no .jpg/.png images in it")


@dataclass
class Model:
    """A checkpoint's classifier, loaded once, and its class names."""

    model: torch.nn.Module
    cfg: TrainConfig
    classes: list[str]
    rt: Runtime

    @classmethod
    def load(cls, ckpt_uri: str, use_gpu: bool = False, data_root: str | None = None) -> Model:
        device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        model, state = checkpoint.load_classifier(ckpt_uri, device)
        cfg = TrainConfig.from_dict({**state["config"], **({"data": data_root} if data_root
                                                           else {})})
        num_classes = model.head[-1].out_features
        try:
            classes = data.read_manifest(cfg.dataset_uri())["classes"]
        except (UserError, OSError):  # the training data is not reachable from here
            classes = [f"class{i}" for i in range(num_classes)]
            log.warning(f"{storage.display(cfg.dataset_uri())}: not readable, so classes are "
                        "shown by index (pass --data to name them)")
        return cls(model, cfg, classes, Runtime.for_device(device))

    @torch.no_grad()
    def probabilities(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Softmax over classes for uint8 images [N, 32, 32, 3]."""
        transform = image_transform(self.cfg.image_size, self.rt)
        x = engine.to_tensor(images, self.rt.device)
        out = []
        for i in range(0, len(x), batch_size):
            with torch.autocast(x.device.type, dtype=self.rt.amp_dtype,
                                enabled=self.rt.amp_dtype is not None):
                logits = self.model(transform(x[i:i + batch_size]))
            out.append(torch.softmax(logits.float(), 1).cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, len(self.classes)), np.float32)

    def rows(self, names: list[str], blobs: list[bytes], top_k: int
             ) -> tuple[list[dict], list[dict]]:
        """(predictions, skipped): the top_k classes of each image that decodes."""
        good, pixels, skipped = [], [], []
        for name, blob in zip(names, blobs, strict=True):
            try:
                pixels.append(data.decode(blob, name))
                good.append(name)
            except data.DataError as e:  # "<name>: cannot decode image (...)"
                skipped.append({"file": name, "error": str(e).removeprefix(f"{name}: ")})
        probs = self.probabilities(np.stack(pixels)) if pixels else np.zeros((0, 0))
        k = min(top_k, len(self.classes))
        rows = []
        for name, p in zip(good, probs, strict=True):
            top = np.argsort(-p)[:k]
            rows.append({"file": name, "predictions": [
                {"class": self.classes[i], "probability": float(p[i])} for i in top]})
        return rows, skipped


class _RayBatches:
    """A Ray Data actor: the model loaded once, then one batch of image bytes at a time."""

    def __init__(self, ckpt_uri: str, use_gpu: bool, data_root: str | None, top_k: int):
        self.model = Model.load(ckpt_uri, use_gpu, data_root)
        self.top_k = top_k

    def __call__(self, batch: dict) -> dict:
        rows, skipped = self.model.rows(list(batch["file"]), list(batch["bytes"]), self.top_k)
        # Columns of one type each: a skipped image has no classes and an error.
        return {"file": [r["file"] for r in rows] + [s["file"] for s in skipped],
                "classes": [[p["class"] for p in r["predictions"]] for r in rows]
                + [[] for _ in skipped],
                "probabilities": [[p["probability"] for p in r["predictions"]] for r in rows]
                + [[] for _ in skipped],
                "error": [""] * len(rows) + [s["error"] for s in skipped]}


def predict(ckpt_uri: str, sources: list[str], top_k: int = 1, use_gpu: bool = False,
            data_root: str | None = None, use_ray: bool | None = None) -> dict:
    """{"predictions": [{file, predictions: [{class, probability}]}], "skipped": [{file,
    error}], "via": "in-process" or "ray data"} for every image in the sources."""
    if top_k < 1:
        raise PredictError(f"--top-k {top_k}: must be >= 1")
    items = list(list_images(sources))
    names, blobs = [n for n, _ in items], [b for _, b in items]
    if use_ray is None:
        use_ray = len(items) >= RAY_MIN and bool(os.environ.get("RAY_ADDRESS"))
    if not use_ray:
        rows, skipped = Model.load(ckpt_uri, use_gpu, data_root).rows(names, blobs, top_k)
        return {"predictions": rows, "skipped": skipped, "via": "in-process"}
    return _predict_ray(ckpt_uri, names, blobs, top_k, use_gpu, data_root)


def _predict_ray(ckpt_uri: str, names: list[str], blobs: list[bytes], top_k: int,
                 use_gpu: bool, data_root: str | None) -> dict:
    import ray

    from cifar_ray import cluster

    started = cluster.connect()
    try:
        ds = ray.data.from_items([{"file": n, "bytes": b} for n, b in zip(names, blobs,
                                                                             strict=True)])
        actors = max(1, min(4, int(ray.cluster_resources().get("GPU" if use_gpu else "CPU", 1))))
        out = ds.map_batches(_RayBatches, fn_constructor_args=(ckpt_uri, use_gpu, data_root,
                                                               top_k),
                             batch_size=256, concurrency=actors,
                             num_gpus=1 if use_gpu else 0, num_cpus=0 if use_gpu else 1,
                             runtime_env=cluster.worker_env()).take_all()
    finally:
        if started:
            ray.shutdown()
    order = {n: i for i, n in enumerate(names)}
    out.sort(key=lambda r: order[r["file"]])
    rows = [{"file": r["file"], "predictions": [
        {"class": c, "probability": float(p)} for c, p in zip(r["classes"], r["probabilities"],
                                                              strict=True)]}
        for r in out if not r["error"]]
    skipped = [{"file": r["file"], "error": r["error"]} for r in out if r["error"]]
    return {"predictions": rows, "skipped": skipped, "via": "ray data"}


def table(result: dict) -> str:
    """The human-readable output: file, then class (probability) for each of the top k."""
    width = max([len(r["file"]) for r in result["predictions"]] + [4])
    lines = [f"{'file':<{width}}  class (probability)"]
    for r in result["predictions"]:
        lines.append(f"{r['file']:<{width}}  " + ", ".join(
            f"{p['class']} ({p['probability']:.3f})" for p in r["predictions"]))
    for s in result["skipped"]:
        lines.append(f"{s['file']:<{width}}  skipped: {s['error']}")
    return "\n".join(lines)
