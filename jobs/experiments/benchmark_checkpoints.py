"""What checkpoints cost a run: bytes uploaded and stored, wall time against epoch time, and
the time training waited for checkpoints; before and after issue 20, side by side in one run.
Prints a table and writes JSON.

    python jobs/experiments/benchmark_checkpoints.py                    # ~15 min on 2 cores
    python jobs/experiments/benchmark_checkpoints.py --variants async --epochs 1 1  # a look

Each variant is `jobs/train.py` in a fresh process: the default recipe (10 + 10 epochs) on
3,000 real CIFAR-10 images (300 a class; 300 of them carved out for validation), one worker
with both cores, --weights none (nothing is downloaded here; an ImageNet backbone has the
same bytes), data and runs in S3: moto_server on loopback, the runs behind a TCP proxy that
counts every byte sent to it. Variants:
  before  the code before issue 20 (BEFORE, checked out into a temporary git worktree): the
          whole model in every checkpoint, model_final.pt, uploads that block training;
  sync    this checkout with --checkpoint-upload sync: phase-1 checkpoints hold the head,
          nothing written twice, each upload still blocks training;
  async   this checkout as it runs by default: the next epoch trains while the last
          checkpoint uploads.
Reads the run's metrics.jsonl and result.json (its timeline, where there is one) and, while
the run goes on, lists the bucket every second to see each checkpoint's size before Ray
deletes the ones --keep-checkpoints does not keep.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo, without an install

import boto3  # noqa: E402
import common  # noqa: E402  (this folder's shared helpers)

from cifar_ray import data, timeline  # noqa: E402
from cifar_ray.config import PrepareConfig  # noqa: E402

# main just before issue 20's first change (phase-1 checkpoints that hold only the head).
BEFORE = "6337320"
SHARED_TAR = common.REPO.parent / "shared" / "data" / "cifar10-train-jpeg.tar.gz"
MB = 1e6


class CountingProxy:
    """A TCP proxy on loopback that counts the bytes clients send through it (uploads, plus
    requests' headers) and the bytes that come back."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.lock = threading.Lock()
        self.sent = self.received = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
                upstream = socket.create_connection(self.target, timeout=30)
            except OSError:
                return
            for src, dst, up in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pump, args=(src, dst, up), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while chunk := src.recv(1 << 16):
                with self.lock:
                    if up:
                        self.sent += len(chunk)
                    else:
                        self.received += len(chunk)
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):  # the other direction's pump then stops too
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def take(self) -> tuple[int, int]:
        """(sent, received) since the last take."""
        with self.lock:
            out, self.sent, self.received = (self.sent, self.received), 0, 0
        return out

    def close(self) -> None:
        self.server.close()


def objects(bucket: str, prefix: str) -> dict[str, int]:
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                         Prefix=prefix)
    return {o["Key"]: o["Size"] for p in pages for o in p.get("Contents", [])}


def watch(bucket: str, prefix: str, stop: threading.Event) -> dict[str, int]:
    """Every object seen under prefix (key -> largest size seen) until `stop`."""
    seen: dict[str, int] = {}

    def loop() -> None:
        while not stop.wait(1.0):
            for k, v in objects(bucket, prefix).items():
                seen[k] = max(v, seen.get(k, 0))
    t = threading.Thread(target=loop, daemon=True)
    t.start()
    stop.wait()
    t.join()
    seen.update({k: max(v, seen.get(k, 0)) for k, v in objects(bucket, prefix).items()})
    return seen


def run_variant(variant: str, repo: Path, bucket: str, proxy: CountingProxy, args) -> dict:
    name = f"bench-{variant}"
    storage = f"s3://{bucket}/runs?endpoint_override={proxy.endpoint}"
    cmd = [sys.executable, str(repo / "jobs" / "train.py"), "--data", f"s3://{bucket}/data",
           "--dataset", "bench", "--storage", storage, "--name", name, "--workers", "1",
           "--cpus-per-worker", str(args.cpus), "--weights", "none",
           "--phase1-epochs", str(args.epochs[0]), "--phase2-epochs", str(args.epochs[1])]
    if variant != "before":
        cmd += ["--checkpoint-upload", variant]
    # PYTHONPATH: the driver and Ray's workers (which inherit it) import this variant's code.
    env = {**os.environ, "PYTHONPATH": str(repo)}
    proxy.take()
    stop = threading.Event()
    seen: dict[str, int] = {}
    watcher = threading.Thread(target=lambda: seen.update(watch(bucket, f"runs/{name}/", stop)))
    watcher.start()
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    stop.set()
    watcher.join()
    sent, _ = proxy.take()
    if done.returncode != 0:
        sys.exit(f"{variant}: jobs/train.py exited {done.returncode}:\n{done.stderr[-3000:]}")
    s3 = boto3.client("s3")

    def read(key: str) -> bytes:
        return s3.get_object(Bucket=bucket, Key=f"runs/{name}/{key}")["Body"].read()
    rows = [json.loads(x) for x in read("metrics.jsonl").decode().splitlines()]
    result = json.loads(read("result.json"))
    stored = objects(bucket, f"runs/{name}/")
    p1 = [v for k, v in seen.items() if "checkpoint-p1-" in k and k.endswith("/state.pt")]
    epochs = sum(r["seconds"] for r in rows)
    p2 = [r for r in rows if r["phase"] == 2]
    blocked = [r["checkpoint_seconds"] for r in rows if "checkpoint_seconds" in r]
    p2_blocked = [r["checkpoint_seconds"] for r in p2 if "checkpoint_seconds" in r]
    tl = result.get("timeline")
    return {
        "variant": variant, "code": BEFORE if variant == "before" else "this checkout",
        "epochs": len(rows), "uploaded_mb": sent / MB,
        "stored_mb": sum(stored.values()) / MB, "objects_stored": len(stored),
        "phase1_checkpoint_mb": max(p1) / MB if p1 else None,
        "wall_s": wall, "result_wall_s": result.get("wall_seconds"),
        "epoch_seconds": epochs, "wall_per_epoch_time": wall / epochs,
        "blocked_s_per_epoch": sum(blocked) / len(blocked) if blocked else None,
        # A phase-2 row's checkpoint_seconds is the wait before it (the last report's).
        "phase2_blocked_share": (sum(p2_blocked) / sum(r["seconds"] for r in p2)
                                 if p2_blocked and p2 else None),
        "val_acc_last": rows[-1]["val_acc"], "evaluated_acc": result.get("evaluated_acc"),
        "timeline": tl, "timeline_line": timeline.line(tl) if tl else None,
        "objects": sorted(stored),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", nargs="+", default=["before", "sync", "async"],
                    choices=["before", "sync", "async"])
    ap.add_argument("--per-class", type=int, default=300, help="real images per class")
    ap.add_argument("--epochs", type=int, nargs=2, default=[10, 10],
                    metavar=("PHASE1", "PHASE2"), help="the recipe's default: 10 10")
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 2,
                    help="the one worker's CPUs (default: all)")
    ap.add_argument("--out", default="results/benchmark_checkpoints.json")
    args = ap.parse_args()
    if not SHARED_TAR.exists():
        sys.exit(f"benchmark_checkpoints: needs the real images at {SHARED_TAR}")
    results = {"machine": common.cpu_name(), "cpus": os.cpu_count(), "images": args.per_class
               * 10, "epochs": args.epochs, "before_commit": BEFORE, "variants": []}
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as work, \
            common.moto_server() as endpoint:
        bucket = "bench"
        boto3.client("s3").create_bucket(Bucket=bucket)
        data.prepare(PrepareConfig(source="folder", source_uri=str(SHARED_TAR),
                                   data=f"s3://{bucket}/data", dataset="bench",
                                   val_size=args.per_class, max_per_class=args.per_class))
        before = Path(work, "before")
        if "before" in args.variants:
            subprocess.run(["git", "-C", str(common.REPO), "worktree", "add", "--detach",
                            str(before), BEFORE], check=True, capture_output=True)
        proxy = CountingProxy(int(endpoint.rsplit(":", 1)[1]))
        try:
            for v in args.variants:
                print(f"{v}: running ...", flush=True)
                r = run_variant(v, before if v == "before" else common.REPO, bucket, proxy,
                                args)
                results["variants"].append(r)
                print(f"{v}: {r['wall_s']:.0f} s, {r['uploaded_mb']:.0f} MB uploaded"
                      + (f"\n  {r['timeline_line']}" if r["timeline_line"] else ""),
                      flush=True)
                common.write_json(results, args.out, announce=False)
        finally:
            proxy.close()
            if "before" in args.variants:
                subprocess.run(["git", "-C", str(common.REPO), "worktree", "remove",
                                "--force", str(before)], capture_output=True)
    print()
    common.print_table(
        "{:8} {:>9} {:>9} {:>9} {:>7} {:>9} {:>10} {:>10} {:>9}",
        ("variant", "uploaded", "stored", "p1 ckpt", "wall", "epochs", "wall/epoch",
         "blocked/ep", "p2 block"),
        [(r["variant"], f"{r['uploaded_mb']:.0f} MB", f"{r['stored_mb']:.0f} MB",
          common.num(r["phase1_checkpoint_mb"], 2) + " MB", f"{r['wall_s']:.0f} s",
          f"{r['epoch_seconds']:.0f} s", f"{r['wall_per_epoch_time']:.2f}",
          common.num(r["blocked_s_per_epoch"], 2), common.num(
              r["phase2_blocked_share"] and 100 * r["phase2_blocked_share"], 1) + "%")
         for r in results["variants"]])
    common.write_json(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
