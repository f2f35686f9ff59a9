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
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo, without an install

import common  # noqa: E402  (this folder's shared helpers)
import torch  # noqa: E402

from cifar_ray import checkpoint, engine, model, storage  # noqa: E402
from cifar_ray.config import PhaseConfig  # noqa: E402


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
    return checkpoint.verified_load(read(checkpoint.STATE), read(checkpoint.DIGEST).decode(), path)


def ray_download(fs, path: str) -> dict:
    import ray.train

    with ray.train.Checkpoint(path, fs).as_directory() as d:
        return checkpoint.load_dir(d)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="results/benchmark_storage.json")
    args = ap.parse_args()
    with common.moto_server():
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

    med = {k: statistics.median(v) for k, v in times.items()}
    mb = size / 1e6
    print(f"\ncheckpoint: {mb:.0f} MB (ResNet50 + AdamW state), moto_server on loopback, "
          f"{os.cpu_count()} CPUs, {platform.machine()}; parts of "
          f"{storage.PART // 2**20} MiB, {storage.READERS} at a time")
    common.print_table("{:40} {:>9} {:>7} {:>12}", ("method", "median s", "MB/s", "vs parallel"),
                       [(k, f"{med[k]:.2f}", f"{mb / med[k]:.0f}",
                         f"{med[k] / med['parallel']:.1f}x") for k in methods])
    out = {"checkpoint_bytes": size, "endpoint": "moto_server on 127.0.0.1",
           "cpus": os.cpu_count(), "part_bytes": storage.PART, "readers": storage.READERS,
           "seconds": times, "median_s": med}
    common.write_json(out, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
