"""How long loading a real checkpoint from an S3-protocol server takes, before and after
cifar_ray read checkpoints in a few parallel ranged GETs. Prints a table and writes JSON.

    python jobs/experiments/benchmark_storage.py                 # starts moto_server on 127.0.0.1

The checkpoint is the recipe's: ResNet50 + head weights with AdamW's two moments (about
285 MB), written by checkpoint.write_dir and uploaded by checkpoint.upload_dir. Timed side by
side, taking turns for --rounds rounds:
  - stream: what storage.read_bytes did before (pyarrow input stream .read(): one 256 KB
    ranged GET after another), as `evaluate`, the end-of-run test and sweep trials read;
  - ray download: Ray's Checkpoint.as_directory (pyarrow copy_files to a local folder, then
    read), as a resumed worker read its checkpoint before;
  - parallel: checkpoint.load_fs, what all of them use now (storage.PART-sized ranged GETs,
    storage.READERS at a time).
Each method's time includes verifying the sha256 and torch.load of the state. The stream
read takes minutes, so it runs in the first round only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo, without an install

import torch  # noqa: E402

from cifar_ray import checkpoint, engine, model, storage  # noqa: E402
from cifar_ray.config import PhaseConfig  # noqa: E402


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        sys.exit("benchmark_storage: moto_server did not start within 60 s")
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                       "AWS_ACCESS_KEY_ID": "benchmark", "AWS_SECRET_ACCESS_KEY": "benchmark",
                       "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"})
    return proc, f"http://127.0.0.1:{port}"


def recipe_checkpoint(directory: str) -> int:
    """A phase-2 checkpoint as the recipe writes it: weights plus AdamW state."""
    m = model.build("none")
    opt = engine.make_optimizer(PhaseConfig(lr=1e-4, weight_decay=0.05), m.parameters())
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # creates both moments for every weight
    checkpoint.write_dir({"model": m.state_dict(), "optimizer": opt.state_dict(),
                          "phase": 2, "epoch": 0}, directory)
    return os.path.getsize(os.path.join(directory, checkpoint.STATE))


def stream(fs, path: str) -> dict:
    def read(name: str) -> bytes:
        with fs.open_input_stream(f"{path}/{name}") as f:
            return f.read()
    return checkpoint._load(read(checkpoint.STATE), read(checkpoint.DIGEST).decode(), path)


def ray_download(fs, path: str) -> dict:
    import ray.train

    with ray.train.Checkpoint(path, fs).as_directory() as d:
        return checkpoint.load_dir(d)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="results/benchmark_storage.json")
    args = ap.parse_args()
    proc, endpoint = start_moto()
    try:
        import boto3

        boto3.client("s3").create_bucket(Bucket="bench")
        uri = "s3://bench/runs/r/checkpoint-p2-e000"
        with tempfile.TemporaryDirectory() as d:
            size = recipe_checkpoint(d)
            fs, path = storage.resolve(uri)
            checkpoint.upload_dir(d, fs, path, local=False)
        methods = {"stream": stream, "ray download": ray_download,
                   "parallel": checkpoint.load_fs}
        times: dict[str, list[float]] = {k: [] for k in methods}
        for r in range(args.rounds):
            for name, fn in methods.items():
                if name == "stream" and r > 0:
                    continue  # minutes per read: once is enough to see it
                t0 = time.perf_counter()
                state = fn(fs, path)
                times[name].append(time.perf_counter() - t0)
                assert state["phase"] == 2 and "optimizer" in state
                del state
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"{k} {v[-1]:.1f} s" for k, v in times.items() if len(v) == r + 1), flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    med = {k: statistics.median(v) for k, v in times.items()}
    mb = size / 1e6
    print(f"\ncheckpoint: {mb:.0f} MB (ResNet50 + AdamW state), moto_server on loopback, "
          f"{os.cpu_count()} CPUs, {platform.machine()}; parts of "
          f"{storage.PART // 2**20} MiB, {storage.READERS} at a time")
    print(f"{'method':40} {'median s':>9} {'MB/s':>7} {'vs parallel':>12}")
    for k in methods:
        print(f"{k:40} {med[k]:9.2f} {mb / med[k]:7.0f} {med[k] / med['parallel']:11.1f}x")
    out = {"checkpoint_bytes": size, "endpoint": "moto_server on 127.0.0.1",
           "cpus": os.cpu_count(), "part_bytes": storage.PART, "readers": storage.READERS,
           "seconds": times, "median_s": med}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
