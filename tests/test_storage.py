"""Storage on a real S3-protocol server (moto on loopback) and on local paths."""

import json

import pytest

from cifar_ray import data, storage
from cifar_ray.config import PrepareConfig


def test_s3_round_trip_and_listing(bucket):
    uri = f"s3://{bucket}/a/b"
    storage.write_bytes(storage.join(uri, "x.json"), b'{"ok": 1}')
    assert storage.exists(storage.join(uri, "x.json"))
    assert json.loads(storage.read_bytes(storage.join(uri, "x.json"))) == {"ok": 1}
    assert storage.list_dir(uri) == ["x.json"]
    storage.check_writable(uri)
    assert storage.list_dir(uri) == ["x.json"]  # the write probe is cleaned up


def test_endpoint_override_in_the_uri_is_kept_when_joining(s3_server, bucket):
    uri = f"s3://{bucket}/p?endpoint_override={s3_server}"
    joined = storage.join(uri, "run", "f.txt")
    assert joined == f"s3://{bucket}/p/run/f.txt?endpoint_override={s3_server}"
    storage.write_bytes(joined, b"hi")
    assert storage.read_bytes(f"s3://{bucket}/p/run/f.txt") == b"hi"
    assert storage.display(joined) == f"s3://{bucket}/p/run/f.txt"


def test_missing_bucket_is_named(s3_server):
    with pytest.raises(storage.StorageError, match=r"s3://no-such-bucket-here/runs"):
        storage.check_writable("s3://no-such-bucket-here/runs")


def test_unwritable_local_storage_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(storage.StorageError, match=str(blocker)):
        storage.check_writable(str(blocker / "runs"))


def test_unsupported_scheme_is_named():
    with pytest.raises(ValueError, match="ftp://host/x: unsupported URI scheme"):
        storage.resolve("ftp://host/x")


def test_dataset_prepared_on_s3_reads_back(bucket):
    cfg = PrepareConfig(source="synthetic", data=f"s3://{bucket}/datasets", dataset="syn",
                        val_size=20, synthetic_size=100, shard_size=30)
    data.prepare(cfg)
    root = f"s3://{bucket}/datasets/syn"
    assert storage.list_dir(root) == ["manifest.json", "test", "train", "val"]
    tr = data.load_split(root, "train", rank=1, world=2, equal=True)
    assert tr.images.shape == (40, 32, 32, 3)


def test_unreachable_endpoint_is_named(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")  # nothing listens there
    with pytest.raises(storage.StorageError,
                       match=r"^s3://some-bucket/runs: writing a probe file failed"):
        storage.check_writable("s3://some-bucket/runs")


def test_rays_view_of_s3_copies_many_files_at_once(bucket, tmp_path):
    """Ray syncs Tune's experiment folder with pyarrow's copy_files, which writes through our
    filesystem from pyarrow's IO threads, 8 of them here: 20 files at once once deadlocked
    it, every thread waiting for an upload queued behind itself."""
    import threading

    import pyarrow.fs as pafs

    for i in range(20):
        (tmp_path / f"f{i:02d}.json").write_bytes(b"x" * (1000 + i))
    path, fs = storage.for_ray(f"s3://{bucket}/exp", 30)
    done = threading.Event()

    def copy():
        pafs.copy_files(str(tmp_path), f"{path}/state", destination_filesystem=fs)
        done.set()

    threading.Thread(target=copy, daemon=True).start()
    assert done.wait(120), "copy_files through the filesystem Ray gets did not finish"
    assert storage.list_dir(f"s3://{bucket}/exp/state") == [f"f{i:02d}.json" for i in range(20)]
