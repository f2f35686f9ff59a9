"""CIFAR-10 sources -> Parquet shards of decoded pixels; shard reading for workers.

    python jobs/prepare_data.py --source folder \
        --source-uri ../shared/data/cifar10-train-jpeg.tar.gz --data ./data

Layout written: <data>/<dataset>/{train,val,test}/part-NNNNN.parquet (columns `image`:
3072 raw uint8 bytes, HWC 32x32x3; `label`: int16) and <data>/<dataset>/manifest.json, which
is written last and so marks a complete dataset. Pixels are stored decoded because CIFAR-10
is 150 MB decoded: each worker holds its shard in (device) memory and never decodes in the
training loop.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import posixpath
import tarfile
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cifar_ray import storage
from cifar_ray.config import PrepareConfig
from cifar_ray.errors import UserError

log = logging.getLogger(__name__)

SIDE = 32
PIXELS = SIDE * SIDE * 3
SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
IMAGE_EXTS = (".png", ".jpg", ".jpeg")


class DataError(UserError, ValueError):
    """The source or a prepared dataset is unusable; the message names the file or class."""


@dataclass
class Split:
    images: np.ndarray  # uint8 [N, 32, 32, 3]
    labels: np.ndarray  # int64 [N]


# ---------------------------------------------------------------- sources


class _CifarUnpickler(pickle.Unpickler):
    """The CIFAR python archive is pickled numpy arrays. Unpickling arbitrary data runs
    arbitrary code, so only the numpy globals those files need are allowed."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"),
               ("_codecs", "encode")}  # how protocol-2 pickles written by Python 3 hold bytes

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing global {module}.{name} in a CIFAR batch")
        return super().find_class(module, name)


def _unpickle(data: bytes, where: str) -> dict:
    try:
        return _CifarUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:
        raise DataError(f"{where}: not a CIFAR-10 python batch ({e})") from e


def _batch_to_split(d: dict, where: str, num_classes: int) -> Split:
    try:
        raw = np.asarray(d[b"data"], dtype=np.uint8)
        labels = np.asarray(d[b"labels"], dtype=np.int64)
    except KeyError as e:
        raise DataError(f"{where}: missing key {e} in CIFAR batch") from e
    if raw.ndim != 2 or raw.shape[1] != PIXELS or len(raw) != len(labels):
        raise DataError(f"{where}: data has shape {raw.shape}, expected [N, {PIXELS}] with "
                        f"{len(labels)} labels")
    _check_labels(labels, num_classes, where)
    # The archive stores planes (CHW); we store HWC like every image file.
    return Split(raw.reshape(-1, 3, SIDE, SIDE).transpose(0, 2, 3, 1).copy(), labels)


def _check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{where}: label {labels[i]} at index {i} is out of range "
                        f"[0, {num_classes})")


def read_archive(uri: str) -> tuple[dict[str, Split], list[str]]:
    """The original cifar-10-python.tar.gz (data_batch_1..5, test_batch, batches.meta)."""
    members: dict[str, bytes] = {}
    with storage.open_input(uri) as f:
        try:
            with tarfile.open(fileobj=f, mode="r|*") as tar:
                for m in tar:
                    base = posixpath.basename(m.name)
                    if m.isfile() and (base.startswith(("data_batch_", "test_batch"))
                                       or base == "batches.meta"):
                        members[base] = tar.extractfile(m).read()
        except tarfile.TarError as e:
            raise DataError(f"{storage.display(uri)}: not a tar archive ({e})") from e
    where = storage.display(uri)
    if "batches.meta" not in members:
        raise DataError(f"{where}: no batches.meta; expected the CIFAR-10 python archive "
                        "(cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta)")
    classes = [c.decode() for c in _unpickle(members["batches.meta"], f"{where}:batches.meta")
               [b"label_names"]]
    train_names = sorted(n for n in members if n.startswith("data_batch_"))
    if not train_names:
        raise DataError(f"{where}: no data_batch_* files")
    train = [_batch_to_split(_unpickle(members[n], f"{where}:{n}"), f"{where}:{n}", len(classes))
             for n in train_names]
    splits = {"train": Split(np.concatenate([s.images for s in train]),
                             np.concatenate([s.labels for s in train]))}
    if "test_batch" in members:
        splits["test"] = _batch_to_split(_unpickle(members["test_batch"], f"{where}:test_batch"),
                                         f"{where}:test_batch", len(classes))
    return splits, classes


def read_torchvision(cache_dir: str | None) -> tuple[dict[str, Split], list[str]]:
    """torchvision's CIFAR-10 download, once per node: a file lock serialises processes that
    share the cache dir, and the later ones find the verified archive already there."""
    import torchvision
    from filelock import FileLock

    root = os.path.abspath(cache_dir or os.path.expanduser("~/.cache/cifar_ray/torchvision"))
    os.makedirs(root, exist_ok=True)
    with FileLock(os.path.join(root, ".download.lock")):
        try:
            sets = {split: torchvision.datasets.CIFAR10(root, train=(split == "train"),
                                                        download=True)
                    for split in ("train", "test")}
        except Exception as e:  # URLError, RuntimeError (bad checksum), socket errors
            raise DataError(
                f"torchvision CIFAR-10 download into {root} failed ({e}). Without internet, "
                "use --source archive --source-uri <cifar-10-python.tar.gz path or s3:// URI> "
                "or --source folder --source-uri <image folder or tar>") from e
    classes = list(sets["train"].classes)
    return {k: Split(np.asarray(d.data, np.uint8), np.asarray(d.targets, np.int64))
            for k, d in sets.items()}, classes


def decode(data: bytes, where: str) -> np.ndarray:
    """An image file's bytes as uint8 [32, 32, 3] RGB (any other size resized, as CIFAR's
    own were made); a DataError naming `where` if it does not decode."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            if im.size != (SIDE, SIDE):  # CIFAR-shaped input expected; resize anything else
                im = im.resize((SIDE, SIDE), Image.BICUBIC)
            return np.asarray(im, dtype=np.uint8)
    except UnidentifiedImageError as e:  # PIL's own text names a BytesIO object, not the file
        raise DataError(f"{where}: cannot decode image (not a JPEG or PNG image)") from e
    except (OSError, ValueError) as e:  # a truncated or corrupt file of a known format
        raise DataError(f"{where}: cannot decode image ({e})") from e


def iter_images(uri: str):
    """Yield (relative path, bytes) of image files in a folder or a tar(.gz) of one."""
    fs, path = storage.resolve(uri)
    info = fs.get_file_info(path)
    if info.type == storage.pafs.FileType.NotFound:
        raise DataError(f"{storage.display(uri)}: no such folder or archive")
    if info.type == storage.pafs.FileType.Directory:
        sel = storage.pafs.FileSelector(path, recursive=True)
        for fi in sorted(fs.get_file_info(sel), key=lambda i: i.path):
            if fi.type == storage.pafs.FileType.File and fi.path.lower().endswith(IMAGE_EXTS):
                with fs.open_input_stream(fi.path) as f:
                    yield posixpath.relpath(fi.path, path), f.read()
        return
    with fs.open_input_stream(path) as f:
        try:
            with tarfile.open(fileobj=f, mode="r|*") as tar:
                for m in tar:
                    if m.isfile() and m.name.lower().endswith(IMAGE_EXTS):
                        yield posixpath.normpath(m.name), tar.extractfile(m).read()
        except tarfile.TarError as e:
            raise DataError(f"{storage.display(uri)}: not a folder or tar archive ({e})") from e


def read_folder(uri: str, max_per_class: int | None = None, only: list[str] | None = None
                ) -> tuple[dict[str, Split], list[str]]:
    """`[<split>/]<class>/<file>.{png,jpg}` in a folder or tar; classes sorted by name.
    With `max_per_class`, only the first N files of each (split, class) are decoded; with
    `only`, only those classes' files."""
    items: list[tuple[str, str, np.ndarray]] = []  # (split, class, pixels)
    taken: dict[tuple[str, str], int] = {}
    where = storage.display(uri)
    for rel, data in iter_images(uri):
        parts = rel.split("/")
        if len(parts) >= 3 and parts[-3] in SPLITS:
            split, cls = parts[-3], parts[-2]
        elif len(parts) >= 2:
            split, cls = "train", parts[-2]
        else:
            raise DataError(f"{where}/{rel}: expected [<split>/]<class>/<file>")
        if only is not None and cls not in only:
            continue
        taken[split, cls] = taken.get((split, cls), 0) + 1
        if max_per_class is not None and taken[split, cls] > max_per_class:
            continue
        items.append((split, cls, decode(data, f"{where}/{rel}")))
    if not items:
        raise DataError(f"{where}: no .png/.jpg images found; expected [<split>/]<class>/<file>")
    classes = sorted({c for _, c, _ in items})
    index = {c: i for i, c in enumerate(classes)}
    splits = {}
    for split in SPLITS:
        rows = [(index[c], px) for s, c, px in items if s == split]
        if rows:
            splits[split] = Split(np.stack([px for _, px in rows]),
                                  np.array([y for y, _ in rows], np.int64))
    return splits, classes


def synthetic(n: int, seed: int, num_classes: int = 10) -> Split:
    """CIFAR-shaped images whose class shows in colour and stripe frequency, plus noise, so a
    smoke run can learn something without any download."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % num_classes)
    palette = np.random.default_rng(1234).integers(40, 216, size=(num_classes, 3))
    yy, xx = np.mgrid[0:SIDE, 0:SIDE]
    freq = 1 + np.arange(num_classes) % 5
    angle = np.arange(num_classes) * np.pi / num_classes
    stripes = np.sin(freq[:, None, None] * 2 * np.pi / SIDE
                     * (np.cos(angle)[:, None, None] * xx + np.sin(angle)[:, None, None] * yy))
    img = palette[labels][:, None, None, :] + 40 * stripes[labels][..., None]
    img = img + rng.normal(0, 25, size=img.shape)
    return Split(np.clip(img, 0, 255).astype(np.uint8), labels.astype(np.int64))


def read_synthetic(cfg: PrepareConfig) -> tuple[dict[str, Split], list[str]]:
    return ({"train": synthetic(cfg.synthetic_size, cfg.seed),
             "test": synthetic(max(cfg.synthetic_size // 5, 10), cfg.seed + 1)},
            [f"class{i}" for i in range(10)])


# ---------------------------------------------------------------- splitting and writing


def select_classes(splits: dict[str, Split], classes: list[str], wanted: list[str]
                   ) -> tuple[dict[str, Split], list[str]]:
    """Only the `wanted` classes' images, relabelled 0, 1, ... in that order."""
    missing = [c for c in wanted if c not in classes]
    if missing:
        raise DataError(f"--classes: {missing} not among the source's classes {classes}")
    new = np.full(len(classes), -1, np.int64)
    new[[classes.index(c) for c in wanted]] = np.arange(len(wanted))
    out = {}
    for name, s in splits.items():
        keep = new[s.labels] >= 0
        out[name] = Split(s.images[keep], new[s.labels[keep]])
    return out, list(wanted)


def stratified_split(s: Split, val_size: int, seed: int, num_classes: int,
                     flag: str = "--val-size") -> tuple[Split, Split]:
    """Carve `val_size` images from train, each class in proportion to its share."""
    if not 0 < val_size < len(s.labels):
        raise DataError(f"{flag} {val_size}: must be in (0, {len(s.labels)}) for a train "
                        f"split of {len(s.labels)} images")
    rng = np.random.default_rng(seed)
    counts = np.bincount(s.labels, minlength=num_classes)
    # Largest-remainder allocation: per-class shares that sum exactly to val_size.
    exact = counts * val_size / counts.sum()
    take = np.floor(exact).astype(int)
    take[np.argsort(-(exact - take))[: val_size - take.sum()]] += 1
    val_idx = np.concatenate([rng.permutation(np.flatnonzero(s.labels == c))[:take[c]]
                              for c in range(num_classes)])
    mask = np.zeros(len(s.labels), bool)
    mask[val_idx] = True
    return (Split(s.images[~mask], s.labels[~mask]), Split(s.images[mask], s.labels[mask]))


def _check_classes(splits: dict[str, Split], classes: list[str]) -> None:
    for name, s in splits.items():
        _check_labels(s.labels, len(classes), f"split {name}")
        counts = np.bincount(s.labels, minlength=len(classes))
        missing = [classes[i] for i in np.flatnonzero(counts == 0)]
        if missing:
            raise DataError(f"split {name}: class {missing[0]!r} has no images "
                            f"(missing: {missing}); every split needs every class")


def _table(s: Split) -> pa.Table:
    flat = np.ascontiguousarray(s.images).reshape(-1)
    images = pa.FixedSizeBinaryArray.from_buffers(pa.binary(PIXELS), len(s.labels),
                                                  [None, pa.py_buffer(flat)])
    return pa.table({"image": images, "label": pa.array(s.labels.astype(np.int16))})


def prepared_with(cfg: PrepareConfig) -> dict:
    """The arguments that determine a dataset's contents (recorded in its manifest); unset
    ones are left out, so a manifest from before an option existed still matches."""
    args = {"source": cfg.source,
            "source_uri": storage.display(cfg.source_uri) if cfg.source_uri else None,
            "val_size": cfg.val_size, "seed": cfg.seed, "shard_size": cfg.shard_size,
            "max_per_class": cfg.max_per_class,
            "synthetic_size": cfg.synthetic_size if cfg.source == "synthetic" else None,
            "classes": cfg.classes, "test_size": cfg.test_size or None}
    return {k: v for k, v in args.items() if v is not None}


def prepare(cfg: PrepareConfig) -> dict:
    """Write the dataset unless an identical one exists; return its manifest."""
    root = storage.join(cfg.data, cfg.dataset)
    manifest_uri = storage.join(root, MANIFEST)
    if storage.exists(manifest_uri):
        manifest = json.loads(storage.read_bytes(manifest_uri))
        stored = {k: v for k, v in manifest.get("prepared_with", {}).items() if v is not None}
        if stored != prepared_with(cfg):
            raise DataError(
                f"{storage.display(root)} already holds a dataset prepared with "
                f"{manifest.get('prepared_with')}; refusing to overwrite it with "
                f"{prepared_with(cfg)}. Use another --dataset name or --data root.")
        log.info(f"dataset {storage.display(root)} already prepared: "
                 f"{ {k: v['count'] for k, v in manifest['splits'].items()} }; nothing to do")
        return manifest
    storage.check_writable(cfg.data)
    log.info(f"reading source {cfg.source} {storage.display(cfg.source_uri or '')}".rstrip())
    if cfg.source == "archive":
        splits, classes = read_archive(cfg.source_uri)
    elif cfg.source == "folder":
        splits, classes = read_folder(cfg.source_uri, cfg.max_per_class, cfg.classes)
    elif cfg.source == "torchvision":
        splits, classes = read_torchvision(cfg.source_uri)
    else:
        splits, classes = read_synthetic(cfg)
    if "train" not in splits:
        raise DataError(f"{cfg.source} source {storage.display(cfg.source_uri or '')}: "
                        "no train split found")
    if cfg.classes:
        splits, classes = select_classes(splits, classes, cfg.classes)
    if "test" not in splits and cfg.test_size > 0:  # before val: both come out of train
        splits["train"], splits["test"] = stratified_split(
            splits["train"], cfg.test_size, cfg.seed + 7, len(classes), "--test-size")
    if "val" not in splits and cfg.val_size > 0:
        splits["train"], splits["val"] = stratified_split(splits["train"], cfg.val_size,
                                                          cfg.seed, len(classes))
    _check_classes(splits, classes)
    rng = np.random.default_rng(cfg.seed + 1)
    manifest = {"format": FORMAT_VERSION, "dataset": cfg.dataset, "classes": classes,
                "image_shape": [SIDE, SIDE, 3], "prepared_with": prepared_with(cfg), "splits": {}}
    for name, s in splits.items():
        # Shuffled once here, so every worker's contiguous slice is a fair sample of classes.
        order = rng.permutation(len(s.labels))
        s = Split(s.images[order], s.labels[order])
        shards = []
        for i, start in enumerate(range(0, len(s.labels), cfg.shard_size)):
            part = Split(s.images[start:start + cfg.shard_size],
                         s.labels[start:start + cfg.shard_size])
            file = f"part-{i:05d}.parquet"
            _write_parquet(_table(part), storage.join(root, name, file))
            shards.append({"file": file, "rows": len(part.labels)})
        manifest["splits"][name] = {
            "count": len(s.labels), "shards": shards,
            "class_counts": np.bincount(s.labels, minlength=len(classes)).tolist()}
        log.info(f"  {name}: {len(s.labels)} images in {len(shards)} shard(s)")
    storage.write_bytes(manifest_uri, json.dumps(manifest, indent=2).encode())
    log.info(f"wrote {storage.display(manifest_uri)}")
    return manifest


def _write_parquet(table: pa.Table, uri: str) -> None:
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    storage.write_bytes(uri, buf.getvalue().to_pybytes())


# ---------------------------------------------------------------- reading


def read_manifest(dataset_uri: str) -> dict:
    uri = storage.join(dataset_uri, MANIFEST)
    if not storage.exists(uri):
        raise DataError(f"{storage.display(dataset_uri)}: no prepared dataset ({MANIFEST} "
                        "missing); run `cifar-ray prepare-data` (or jobs/prepare_data.py) first")
    manifest = json.loads(storage.read_bytes(uri))
    if manifest.get("format") != FORMAT_VERSION:
        raise DataError(f"{storage.display(uri)}: format {manifest.get('format')}, "
                        f"expected {FORMAT_VERSION}; prepare the dataset again")
    return manifest


def shard_range(count: int, rank: int, world: int, equal: bool) -> tuple[int, int]:
    """Rows [start, end) of this rank. `equal` drops up to world-1 rows so every rank runs
    the same number of steps (DDP needs that in training)."""
    if equal:
        per = count // world
        return rank * per, (rank + 1) * per
    return rank * count // world, (rank + 1) * count // world


def load_split(dataset_uri: str, split: str, rank: int = 0, world: int = 1,
               equal: bool = False, manifest: dict | None = None) -> Split:
    """This rank's contiguous slice of a split, reading only the shards that overlap it."""
    manifest = manifest or read_manifest(dataset_uri)
    if split not in manifest["splits"]:
        raise DataError(f"{storage.display(dataset_uri)}: no {split!r} split "
                        f"(has {sorted(manifest['splits'])})")
    meta = manifest["splits"][split]
    start, end = shard_range(meta["count"], rank, world, equal)
    images, labels, offset = [], [], 0
    for shard in meta["shards"]:
        lo, hi = max(start, offset), min(end, offset + shard["rows"])
        if lo < hi:
            t = pq.read_table(storage.open_input(storage.join(dataset_uri, split, shard["file"])))
            t = t.slice(lo - offset, hi - lo)
            col = t.column("image").combine_chunks()
            buf = np.frombuffer(col.buffers()[1], np.uint8)
            images.append(buf[col.offset * PIXELS:(col.offset + len(col)) * PIXELS])
            labels.append(t.column("label").to_numpy().astype(np.int64))
        offset += shard["rows"]
    if not images:
        return Split(np.zeros((0, SIDE, SIDE, 3), np.uint8), np.zeros(0, np.int64))
    return Split(np.concatenate(images).reshape(-1, SIDE, SIDE, 3), np.concatenate(labels))

