"""Storage outages, for real: a TCP proxy on loopback between us and the S3-protocol server
resets every connection for a while, or cuts one upload part way.

    python -m pytest -q tests/test_storage_faults.py

No Ray here: these are the storage and checkpoint primitives every job uses; the Ray-level
outage (a run that keeps training through one) is in test_train_ray.py. pyarrow's S3 client
retries for about 6 s by itself (three attempts with backoff), so an outage here lasts until
our own retry has logged (that is, longer than pyarrow's), well within our retry window.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import require, wait_until

from cifar_ray import checkpoint, storage


def _uri(bucket: str, proxy, key: str) -> str:
    return f"s3://{bucket}/{key}?endpoint_override={proxy.endpoint}"


@pytest.fixture
def retry_s():
    """Sets the retry window (--storage-retry-s) for the rest of one test."""
    with contextlib.ExitStack() as stack:
        yield lambda seconds: stack.enter_context(storage.retries(seconds))


def _on_thread(got: dict, name: str, fn) -> threading.Thread:
    """fn() on a thread of its own, started, with a 120-s retry window (the window is per
    thread): its result goes into got[name]."""
    def target():
        with storage.retries(120):
            got[name] = fn()

    t = threading.Thread(target=target)
    t.start()
    return t


def test_writes_and_reads_ride_out_an_outage(bucket, s3_proxy, caplog):
    """A write, a read and a listing side by side, each on a thread of its own, while every
    connection is reset: storage stays cut until the write and the read have both given up
    on the S3 client's own retries and logged ours; then each lands."""
    uri = _uri(bucket, s3_proxy, "runs/a/metrics.jsonl")
    result = _uri(bucket, s3_proxy, "runs/a/result.json")
    storage.write_bytes(uri, b"epoch 1")
    got = {}
    s3_proxy.cut()
    try:
        threads = [_on_thread(got, "write", lambda: storage.write_bytes(result, b"{}")),
                   _on_thread(got, "read", lambda: storage.read_bytes(uri)),
                   _on_thread(got, "list",
                              lambda: storage.list_dir(_uri(bucket, s3_proxy, "runs/a")))]
        wait_until(lambda: "write failed" in caplog.text and "read failed" in caplog.text,
                   120, "a write and a read retrying through the outage")
    finally:
        s3_proxy.restore()
    for t in threads:
        t.join(timeout=120)
    assert got["read"] == b"epoch 1" and "metrics.jsonl" in got["list"]
    assert storage.read_bytes(result) == b"{}"


def test_a_long_outage_fails_naming_the_uri_and_the_flag(bucket, s3_proxy, retry_s):
    retry_s(2)
    s3_proxy.cut()
    with pytest.raises(storage.StorageError,
                       match=rf"s3://{bucket}/runs/b/result.json: write failed.*"
                             r"gave up after 1 try in \d+ s: --storage-retry-s 2\)"):
        storage.write_bytes(_uri(bucket, s3_proxy, "runs/b/result.json"), b"{}")


def test_a_missing_file_is_an_answer_not_an_outage(bucket, s3_proxy, retry_s):
    retry_s(600)  # were this retried, the test would hang for ten minutes
    with pytest.raises(storage.StorageError, match="nothing-here.json: no such file"):
        storage.read_bytes(_uri(bucket, s3_proxy, "nothing-here.json"))


@pytest.mark.parametrize("size", [5 * 2**20 + 123, 2**20, 17])
def test_objects_come_back_whole_from_parallel_ranged_reads(bucket, monkeypatch, size):
    monkeypatch.setattr(storage, "PART", 2**20)  # 1 MiB parts: 6 side by side for 5 MiB
    blob = os.urandom(size)
    uri = f"s3://{bucket}/big.bin"
    storage.write_bytes(uri, blob)
    assert storage.read_bytes(uri) == blob


def _checkpoint_dir(tmp_path) -> tuple[dict, str]:
    state = {"model": {"w": torch.randn(300_000)}, "phase": 2, "epoch": 0}
    d = tmp_path / "ckpt"
    d.mkdir()
    checkpoint.write_dir(state, str(d))
    return state, str(d)


def test_a_checkpoint_cut_after_its_first_object_is_never_loaded(bucket, s3_proxy, retry_s,
                                                                tmp_path, caplog):
    retry_s(0)
    state, d = _checkpoint_dir(tmp_path)
    # Measure what the state object's PUT sends, on a key of the same length...
    fs, path = storage.resolve(_uri(bucket, s3_proxy, "runs/c/checkpoint-p2-e000"))
    with open(os.path.join(d, checkpoint.STATE), "rb") as f:
        blob = f.read()
    before = s3_proxy.sent
    storage.write_file(fs, path.replace("p2-e000", "p2-e999") + "/" + checkpoint.STATE, blob,
                       local=False)
    one_put = s3_proxy.sent - before
    # ...then let exactly that much through: the state arrives, the digest's PUT is cut.
    s3_proxy.cut_after(one_put + 16)
    with pytest.raises(storage.StorageError, match="state.pt.sha256: write failed"):
        checkpoint.upload_dir(d, fs, path, local=False)
    s3_proxy.restore()
    folder = f"s3://{bucket}/runs/c/checkpoint-p2-e000"
    assert storage.list_dir(folder) == [checkpoint.STATE]
    with pytest.raises(checkpoint.CheckpointError, match="incomplete"):
        checkpoint.load_uri(folder)

    # The same upload with retries through an outage (until it has logged a retry of ours)
    # completes and loads.
    caplog.clear()
    s3_proxy.cut()
    thread = _on_thread({}, "upload", lambda: checkpoint.upload_dir(d, fs, path, local=False))
    try:
        wait_until(lambda: "write failed" in caplog.text, 120, "the upload retrying")
    finally:
        s3_proxy.restore()
    thread.join(timeout=120)
    loaded = checkpoint.load_uri(folder)
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])


# A small tmpfs for the run folder, mounted in a mount namespace of its own (unshare -rm:
# root inside, nothing changes for the rest of the machine), where a child Python process
# writes a checkpoint there. Full: 1 MiB for a ~1.2 MB state. Read-only: remounted ro.
LOCAL_FAULT = r"""
import json, os, sys, tempfile
import torch
from cifar_ray import checkpoint, storage
root, mode = sys.argv[1], sys.argv[2]
state = {"model": {"w": torch.randn(300_000)}, "phase": 2, "epoch": 0}
out = {}
with tempfile.TemporaryDirectory() as d:
    checkpoint.write_dir(state, d)
    dest = os.path.join(root, "runs", "r", "checkpoint-p2-e000")
    if mode == "ro":
        os.makedirs(os.path.dirname(dest))
        os.system(f"mount -o remount,ro {root}")
        try:
            storage.check_writable(os.path.join(root, "runs"))
        except storage.StorageError as e:
            out["preflight"] = str(e)
    try:
        checkpoint.upload_dir(d, storage.pafs.LocalFileSystem(), dest, local=True)
    except storage.StorageError as e:
        out["error"] = str(e)
    out["left"] = sorted(os.listdir(dest)) if os.path.isdir(dest) else []
    try:
        checkpoint.load_uri(dest)
    except Exception as e:
        out["load"] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


def _mount_namespaces() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.parametrize("mode", ["full", "ro"])
def test_local_storage_full_or_read_only_is_named_and_leaves_no_checkpoint(tmp_path, mode):
    require(_mount_namespaces(),
            "`unshare -rm true` fails here: it needs util-linux's unshare (apt-get install "
            "util-linux) and unprivileged user namespaces (sysctl "
            "kernel.unprivileged_userns_clone=1; in a container, one allowed to unshare)")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cmd = ["unshare", "-rm", "sh", "-c",
           'mount -t tmpfs -o size=1m tmpfs "$0" && exec "$1" -c "$2" "$0" "$3"',
           str(mnt), sys.executable, LOCAL_FAULT, mode]
    repo = str(Path(__file__).resolve().parents[1])
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=repo,
                          env={**os.environ, "PYTHONPATH": repo})
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    dest = f"{mnt}/runs/r/checkpoint-p2-e000"
    reason = "No space left on device" if mode == "full" else "Read-only file system"
    assert out["error"].startswith(f"{dest}/state.pt: write failed") and reason in out["error"]
    assert out["left"] == []  # no half-written state, no temp file
    assert out["load"].startswith("CheckpointError")
    if mode == "ro":  # and the run would not have started: preflight names the folder
        assert out["preflight"].startswith(f"{mnt}/runs: writing a probe file failed")
