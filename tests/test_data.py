"""Every source round-trips to Parquet with exact pixels and labels; bad input is named."""

import io
import json
import pickle

import numpy as np
import pytest
from conftest import shared_tar_slice, write_tar
from PIL import Image

from cifar_ray import data
from cifar_ray.config import PrepareConfig

CLASSES = [f"c{i}" for i in range(10)]


def _archive(tmp_path, n_per_batch=40, batches=2, labels_override=None):
    """A tiny cifar-10-python.tar.gz in the original format: pickled dicts of CHW planes."""
    rng = np.random.default_rng(0)
    members, expected = [], {"train": [], "test": []}
    for name in [f"data_batch_{i + 1}" for i in range(batches)] + ["test_batch"]:
        raw = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        labels = list(np.arange(n_per_batch) % 10) if labels_override is None else labels_override
        blob = pickle.dumps({b"batch_label": name.encode(), b"labels": [int(x) for x in labels],
                             b"data": raw, b"filenames": [b"x.png"] * n_per_batch}, protocol=2)
        members.append((f"cifar-10-batches-py/{name}", blob))
        split = "test" if name == "test_batch" else "train"
        expected[split].append((raw.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels))
    meta = pickle.dumps({b"label_names": [c.encode() for c in CLASSES]}, protocol=2)
    members.append(("cifar-10-batches-py/batches.meta", meta))
    path = write_tar(tmp_path / "cifar-10-python.tar.gz", members)
    return path, {k: (np.concatenate([a for a, _ in v]), np.concatenate([b for _, b in v]))
                  for k, v in expected.items()}


def _all(root, split, manifest=None):
    return data.load_split(str(root), split, manifest=manifest)


def _sorted_rows(images, labels):
    """Order-free comparison: prepare shuffles rows, so compare as sorted multisets."""
    keys = [img.tobytes() + bytes([lab]) for img, lab in zip(images, labels, strict=True)]
    return sorted(keys)


def test_archive_round_trips_exactly(tmp_path):
    path, expected = _archive(tmp_path)
    cfg = PrepareConfig(source="archive", source_uri=str(path), data=str(tmp_path / "d"),
                        val_size=20, shard_size=16)
    manifest = data.prepare(cfg)
    assert manifest["classes"] == CLASSES
    assert {k: v["count"] for k, v in manifest["splits"].items()} == {
        "train": 60, "val": 20, "test": 40}
    assert manifest["splits"]["val"]["class_counts"] == [2] * 10  # stratified
    root = tmp_path / "d" / "cifar10"
    tr, va, te = (_all(root, s) for s in ("train", "val", "test"))
    assert _sorted_rows(np.concatenate([tr.images, va.images]),
                        np.concatenate([tr.labels, va.labels])) == _sorted_rows(*expected["train"])
    assert _sorted_rows(te.images, te.labels) == _sorted_rows(*expected["test"])
    assert len(manifest["splits"]["train"]["shards"]) == 4  # 60 rows at 16 per shard


def test_rerun_is_a_no_op_and_a_different_rerun_is_refused(tmp_path, caplog):
    path, _ = _archive(tmp_path)
    cfg = PrepareConfig(source="archive", source_uri=str(path), data=str(tmp_path / "d"),
                        val_size=20)
    data.prepare(cfg)
    manifest_file = tmp_path / "d" / "cifar10" / "manifest.json"
    stamp = manifest_file.stat().st_mtime_ns
    with caplog.at_level("INFO", logger="cifar_ray"):
        data.prepare(cfg)
    assert "nothing to do" in caplog.records[-1].getMessage()
    assert manifest_file.stat().st_mtime_ns == stamp
    with pytest.raises(data.DataError, match="refusing to overwrite"):
        data.prepare(PrepareConfig(source="archive", source_uri=str(path),
                                   data=str(tmp_path / "d"), val_size=10))
    assert manifest_file.stat().st_mtime_ns == stamp


def test_archive_label_out_of_range_names_the_batch(tmp_path):
    labels = [0] * 39 + [10]
    path, _ = _archive(tmp_path, labels_override=labels)
    with pytest.raises(data.DataError, match=r"data_batch_1: label 10 at index 39 is out of range"):
        data.prepare(PrepareConfig(source="archive", source_uri=str(path),
                                   data=str(tmp_path / "d"), val_size=10))


def test_archive_with_a_pickle_payload_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    path = write_tar(tmp_path / "evil.tar.gz", [
        ("cifar-10-batches-py/batches.meta", pickle.dumps(Payload(), protocol=2))])
    with pytest.raises(data.DataError, match="refusing global"):
        data.read_archive(str(path))
    assert not (tmp_path / "pwned").exists()


def _png(px):
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, format="PNG")
    return buf.getvalue()


def test_image_folder_with_splits_round_trips_exactly(tmp_path):
    rng = np.random.default_rng(1)
    expected = {}
    for split, n in (("train", 3), ("test", 2)):
        for ci, cls in enumerate(["cat", "dog", "ship"]):
            for i in range(n):
                px = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                f = tmp_path / "imgs" / split / cls / f"{i}.png"
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_bytes(_png(px))
                expected.setdefault(split, []).append((px, ci))
    cfg = PrepareConfig(source="folder", source_uri=str(tmp_path / "imgs"),
                        data=str(tmp_path / "d"), val_size=3)
    manifest = data.prepare(cfg)
    assert manifest["classes"] == ["cat", "dog", "ship"]
    root = tmp_path / "d" / "cifar10"
    tr, va, te = (_all(root, s) for s in ("train", "val", "test"))
    exp_tr = expected["train"]
    assert _sorted_rows(np.concatenate([tr.images, va.images]),
                        np.concatenate([tr.labels, va.labels])) == _sorted_rows(
        np.stack([p for p, _ in exp_tr]), np.array([c for _, c in exp_tr]))
    exp_te = expected["test"]
    assert _sorted_rows(te.images, te.labels) == _sorted_rows(
        np.stack([p for p, _ in exp_te]), np.array([c for _, c in exp_te]))


def test_real_cifar_jpeg_slice_from_the_shared_tar(tmp_path, shared_tar):
    """A few hundred real CIFAR-10 JPEGs, read through the tar path, decode to exactly what
    PIL decodes from the same bytes."""
    members = shared_tar_slice(shared_tar, per_class=30)
    tar = write_tar(tmp_path / "slice.tar.gz", members)
    cfg = PrepareConfig(source="folder", source_uri=str(tar), data=str(tmp_path / "d"),
                        val_size=50)
    manifest = data.prepare(cfg)
    assert manifest["classes"] == ["airplane", "automobile", "bird", "cat", "deer", "dog",
                                   "frog", "horse", "ship", "truck"]
    assert manifest["splits"]["val"]["class_counts"] == [5] * 10
    assert manifest["splits"]["train"]["class_counts"] == [25] * 10
    index = {c: i for i, c in enumerate(manifest["classes"])}
    expected_px = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))
                            for _, b in members])
    expected_y = np.array([index[n.split("/")[-2]] for n, _ in members])
    root = tmp_path / "d" / "cifar10"
    tr, va = _all(root, "train"), _all(root, "val")
    assert _sorted_rows(np.concatenate([tr.images, va.images]),
                        np.concatenate([tr.labels, va.labels])) == _sorted_rows(expected_px,
                                                                                 expected_y)


def test_a_class_subset_with_its_own_test_split_from_the_shared_tar(tmp_path, shared_tar):
    """A transfer task's dataset: five real classes of the tar, relabelled 0-4 in the order
    given, with validation and test splits carved from train, stratified and disjoint."""
    members = shared_tar_slice(shared_tar, per_class=20)
    tar = write_tar(tmp_path / "slice.tar.gz", members)
    wanted = ["horse", "cat", "deer", "dog", "frog"]
    cfg = PrepareConfig(source="folder", source_uri=str(tar), data=str(tmp_path / "d"),
                        dataset="animals", classes=wanted, val_size=15, test_size=25)
    manifest = data.prepare(cfg)
    assert manifest["classes"] == wanted
    counts = {k: v["class_counts"] for k, v in manifest["splits"].items()}
    assert counts == {"train": [12] * 5, "val": [3] * 5, "test": [5] * 5}
    root = tmp_path / "d" / "animals"
    splits = [_all(root, s) for s in ("train", "val", "test")]
    index = {c: i for i, c in enumerate(wanted)}
    kept = [(n, b) for n, b in members if n.split("/")[-2] in index]
    expected_px = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))
                            for _, b in kept])
    expected_y = np.array([index[n.split("/")[-2]] for n, _ in kept])
    assert _sorted_rows(np.concatenate([s.images for s in splits]),
                        np.concatenate([s.labels for s in splits])) == _sorted_rows(
        expected_px, expected_y)
    with pytest.raises(data.DataError, match=r"--classes: \['sheep'\] not among"):
        data.prepare(PrepareConfig(source="folder", source_uri=str(tar),
                                   data=str(tmp_path / "d"), dataset="x",
                                   classes=["cat", "sheep"]))
    with pytest.raises(ValueError, match="--classes"):
        PrepareConfig(classes=["cat"])


def test_undecodable_image_is_named(tmp_path):
    f = tmp_path / "imgs" / "cat" / "broken.jpg"
    f.parent.mkdir(parents=True)
    f.write_bytes(b"not a jpeg")
    with pytest.raises(data.DataError, match=r"cat/broken.jpg: cannot decode image"):
        data.read_folder(str(tmp_path / "imgs"))


def test_class_missing_from_a_split_is_named(tmp_path):
    for split, classes in (("train", ["cat", "dog"]), ("test", ["cat"])):
        for cls in classes:
            f = tmp_path / "imgs" / split / cls / "0.png"
            f.parent.mkdir(parents=True)
            f.write_bytes(_png(np.zeros((32, 32, 3), np.uint8)))
    with pytest.raises(data.DataError, match="split test: class 'dog' has no images"):
        data.prepare(PrepareConfig(source="folder", source_uri=str(tmp_path / "imgs"),
                                   data=str(tmp_path / "d"), val_size=0))


def test_torchvision_offline_names_the_other_sources(tmp_path):
    with pytest.raises(data.DataError, match="--source archive .* or --source folder"):
        data.prepare(PrepareConfig(source="torchvision", source_uri=str(tmp_path / "cache"),
                                   data=str(tmp_path / "d")))
    assert not (tmp_path / "d" / "cifar10" / "manifest.json").exists()


def test_missing_dataset_is_named(tmp_path):
    with pytest.raises(data.DataError, match=r"no prepared dataset .*prepare-data"):
        data.read_manifest(str(tmp_path / "nothing"))


def test_worker_slices_are_disjoint_and_cover_the_split(tmp_path):
    cfg = PrepareConfig(source="synthetic", data=str(tmp_path), dataset="syn", val_size=20,
                        synthetic_size=103, shard_size=7)
    data.prepare(cfg)
    root = str(tmp_path / "syn")
    full = data.load_split(root, "train")
    for world in (1, 2, 3):
        parts = [data.load_split(root, "train", r, world) for r in range(world)]
        assert np.array_equal(np.concatenate([p.images for p in parts]), full.images)
        eq = [data.load_split(root, "train", r, world, equal=True) for r in range(world)]
        assert len({len(p.labels) for p in eq}) == 1
        assert len(eq[0].labels) == len(full.labels) // world
    manifest = json.loads((tmp_path / "syn" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["count"] == len(full.labels) == 83
