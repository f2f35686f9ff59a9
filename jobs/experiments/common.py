"""What the experiments in this folder share: the machine's name, results JSON and tables,
/proc readers, a moto S3 server on loopback, and the prepared splits as tensors.

    import common    # in a script here, run as `python jobs/experiments/<name>.py`

Run as a script, a file here has this folder as sys.path[0], so `import common` finds this
module with no install. Nothing heavy is imported at the top (torch and cifar_ray only
inside the functions that need them; Ray and boto3 never): gpu_check.py runs with torch
alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # jobs/experiments/common.py -> the repo root


def job(name: str) -> list[str]:
    """The command that runs the entry point jobs/<name>.py with this interpreter (run it with
    cwd=REPO, as `ray job submit --working-dir .` would)."""
    return [sys.executable, str(REPO / "jobs" / f"{name}.py")]


# ---------------------------------------------------------------- the machine


def cpu_name() -> str:
    """The processor as the platform names it, or its architecture where it names none."""
    return platform.processor() or platform.machine()


def device_name(device) -> str:
    """The GPU's name for a CUDA torch.device, else the CPU's (cpu_name)."""
    if device.type != "cuda":
        return cpu_name()
    import torch

    return torch.cuda.get_device_name(device)


# ---------------------------------------------------------------- results: JSON and tables


def write_json(results: dict, out: str, default=None, announce: bool = True) -> None:
    """Write `results` as indented JSON to `out`, creating its folder; print "wrote <out>"
    unless announce is False (a script that rewrites its JSON after every step)."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=2, default=default))
    if announce:
        print(f"wrote {out}")


def print_table(layout: str, titles: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """A header and a line per row, each laid out by `layout`: a str.format template with one
    field per column whose spec gives the width and alignment ("{:54} {:>7}"). Cells come
    formatted as they should read (see num); a cell wider than its column pushes the rest."""
    print(layout.format(*titles))
    for row in rows:
        print(layout.format(*row))


def num(x, digits: int) -> str:
    """x with `digits` decimals, or "-" where there is no number (skipped, failed, none)."""
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) else "-"


# ---------------------------------------------------------------- /proc (Linux)

TICK = os.sysconf("SC_CLK_TCK")  # clock ticks per second: the unit of /proc's CPU times


def stat_fields(pid: int | str) -> list[str]:
    """/proc/PID/stat after the process name: [0] state, [1] ppid, [11] utime, [12] stime."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def pids() -> list[int]:
    """Every process on the machine now (some may have ended by the time they are read)."""
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def all_stats() -> dict[int, list[str]]:
    """stat_fields of every live process on the machine."""
    out = {}
    for pid in pids():
        try:
            out[pid] = stat_fields(pid)
        except OSError:
            continue
    return out


def cpu_by_pid() -> dict[int, float]:
    """CPU seconds so far of every process on the machine (Ray's and everyone else's)."""
    return {pid: (int(st[11]) + int(st[12])) / TICK for pid, st in all_stats().items()}


def descendants(pid: int) -> set[int]:
    """Every live process below `pid`."""
    children: dict[int, list[int]] = {}
    for p, st in all_stats().items():
        children.setdefault(int(st[1]), []).append(p)
    out, todo = set(), list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out.add(p)
        todo += children.get(p, [])
    return out


def thread_switches(pid: int, keys: tuple[str, ...]) -> dict[int, int]:
    """Per thread of the process: the sum of the given context-switch counters so far
    ("\nvoluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                text = f.read()
            out[int(tid)] = sum(int(text.split(k)[1].split()[0]) for k in keys)
        except (OSError, IndexError):
            continue
    return out


def proc_counters(pid: int) -> tuple[float, int] | None:
    """(CPU seconds, context switches) so far of a process, all its threads; None once it
    has ended."""
    try:
        st = stat_fields(pid)
        switches = thread_switches(pid, ("\nvoluntary_ctxt_switches:",
                                         "nonvoluntary_ctxt_switches:"))
        return (int(st[11]) + int(st[12])) / TICK, sum(switches.values())
    except OSError:
        return None


def preemptions(pid: int) -> dict[int, int]:
    """Involuntary context switches so far of each of the process's threads: each one is a
    thread taken off its core for another thread."""
    return thread_switches(pid, ("nonvoluntary_ctxt_switches:",))


def pid_by_cmdline(prefix: bytes) -> int | None:
    """A live process whose command line starts with `prefix` (Ray names its workers'
    processes "ray::<Actor>"), or None."""
    for pid in pids():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().startswith(prefix):
                    return pid
        except OSError:
            continue
    return None


# ---------------------------------------------------------------- S3 on loopback


@contextlib.contextmanager
def moto_server(start_timeout_s: float = 60.0) -> Iterator[str]:
    """moto's standalone S3 server, bound to 127.0.0.1 (its default, 0.0.0.0, would serve
    the network), for the duration of the block. Its endpoint and fake credentials go into
    this process's environment (AWS_ENDPOINT_URL: boto3 and pyarrow both honour it); yields
    the endpoint. Exits naming the script if the server does not answer in time."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + start_timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        sys.exit(f"{Path(sys.argv[0]).stem}: moto_server did not start within "
                 f"{start_timeout_s:.0f} s")
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update({"AWS_ENDPOINT_URL": endpoint,
                       "AWS_ACCESS_KEY_ID": "benchmark", "AWS_SECRET_ACCESS_KEY": "benchmark",
                       "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"})
    try:
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ---------------------------------------------------------------- data


def device_splits(dataset_uri: str, device="cpu"):
    """A prepared dataset's train and val splits as tensors on `device`, as the recipe takes
    them (runtime.DeviceSplits), for running it in this process without Ray."""
    from cifar_ray import data
    from cifar_ray.runtime import DeviceSplits

    return DeviceSplits.of(data.load_split(dataset_uri, "train"),
                           data.load_split(dataset_uri, "val"), device)
