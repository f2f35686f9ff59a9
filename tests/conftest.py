"""Shared fixtures: a real S3-protocol server (moto) and a real Ray instance, both on loopback.

    python -m pytest -q

Both are started by the tests that need them and stopped afterwards: nothing outlives the
session. Ray is started once per module that needs it (two Ray instances on one machine
confuse Train V2), after the S3 environment is set so that workers inherit it.
"""

from __future__ import annotations

import io
import os
import socket
import struct
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

SHARED_TAR = Path(os.environ.get(
    "CIFAR_RAY_SHARED_TAR",
    Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-train-jpeg.tar.gz"))
# Recognisable fake credentials: tests search everything written for them. Assembled at run
# time so that the literal values never appear in this source, which jobs upload with the
# repository as their working directory.
FAKE_KEY_ID = "AKIA" + "FAKEFORTESTS" + "0001"
FAKE_SECRET = "/".join(("fake", "secret", "for", "cifar-ray", "tests", "0000000001"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(cond, timeout: float, what: str, interval: float = 0.5):
    """Poll a condition with a generous bound; the machine is small and shared."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def fit_in_thread(cfg):
    """train.fit(cfg) on a thread, so that a test can inject a fault while it runs: returns
    (thread, out) where out gets "summary" or "error"."""
    from cifar_ray import train

    out = {}

    def target():
        try:
            out["summary"] = train.fit(cfg)
        except BaseException as e:  # the test inspects it
            out["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, out


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (from /proc; Ray's daemons, workers and drivers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _ip(hex_addr: str) -> str:
    raw = bytes.fromhex(hex_addr)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    # /proc/net/tcp6: four 32-bit words, each in host (little-endian) order.
    return socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))


def listeners(pids: set[int]) -> set[tuple[str, int, int, str]]:
    """(ip, port, pid, process title) of every TCP socket in LISTEN state held by `pids`."""
    owner = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    owner[int(link[8:-1])] = pid
        except OSError:  # the process ended meanwhile
            continue
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and int(cols[9]) in owner:  # 0A: LISTEN
                    addr, port = cols[1].split(":")
                    pid = owner[int(cols[9])]
                    try:
                        with open(f"/proc/{pid}/cmdline", "rb") as c:
                            title = c.read(200).replace(b"\0", b" ").decode(errors="replace")
                    except OSError:
                        title = "?"
                    out.add((_ip(addr), int(port, 16), pid, title.strip()))
    return out


@pytest.fixture(scope="session")
def s3_server():
    """moto's standalone server bound to 127.0.0.1 (never 0.0.0.0), fake credentials in the
    environment exactly as a user's AWS chain would provide them."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                             "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": FAKE_KEY_ID,
           "AWS_SECRET_ACCESS_KEY": FAKE_SECRET, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)

    def up():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return False

    try:
        wait_until(up, 60, "moto_server to listen")
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def bucket(s3_server, request):
    """A fresh, validly named bucket per test."""
    import boto3

    name = "cifar-ray-" + request.node.name.lower().replace("_", "-")[:40].strip("-")
    name = "".join(c for c in name if c.isalnum() or c == "-")
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def s3_data(s3_server):
    """A small synthetic dataset in the S3 server, shared by the Ray tests: s3://.../tiny."""
    import boto3

    from cifar_ray import data
    from cifar_ray.config import PrepareConfig

    boto3.client("s3").create_bucket(Bucket="cifar-ray-datasets")
    root = "s3://cifar-ray-datasets/datasets"
    data.prepare(PrepareConfig(source="synthetic", data=root, dataset="tiny", val_size=64,
                               synthetic_size=320))
    return root


@pytest.fixture(scope="module")
def ray_local(s3_server):
    """One real local Ray instance per module, started as the jobs start theirs (loopback,
    token auth as Ray sets it); 2 CPUs whatever the machine has."""
    import ray

    from cifar_ray import cluster

    cluster.start_local_ray(num_cpus=2, log_to_driver=True)
    try:
        yield ray
    finally:
        ray.shutdown()


def shared_tar_slice(per_class: int) -> list[tuple[str, bytes]]:
    """The first `per_class` JPEGs of each class from the real CIFAR-10 tar."""
    if not SHARED_TAR.exists():
        pytest.fail(f"real data missing: {SHARED_TAR} (set CIFAR_RAY_SHARED_TAR)")
    out, seen = [], {}
    with tarfile.open(SHARED_TAR, "r|gz") as tar:
        for m in tar:
            if not (m.isfile() and m.name.endswith(".jpg")):
                continue
            cls = m.name.split("/")[-2]
            if seen.get(cls, 0) < per_class:
                seen[cls] = seen.get(cls, 0) + 1
                out.append((m.name, tar.extractfile(m).read()))
    return out


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


class TcpProxy:
    """A real TCP proxy on loopback in front of a server, for storage outages: `cut()`
    resets every open connection and every new one until `restore()`. `cut_after(n)` lets
    n more bytes through from clients, then cuts (mid-request, mid-upload)."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.lock = threading.Lock()
        self.conns: set[socket.socket] = set()
        self.up = True
        self.budget: int | None = None  # client bytes still let through, None: no limit
        self.accepted = 0
        self.sent = 0  # bytes from clients so far
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @staticmethod
    def _reset(s: socket.socket) -> None:
        try:  # SO_LINGER 0: close with a RST, as a dropped connection looks to the client
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        except OSError:
            pass

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            with self.lock:
                self.accepted += 1
                if not self.up:
                    self._reset(client)
                    continue
                try:
                    upstream = socket.create_connection(self.target, timeout=10)
                except OSError:
                    self._reset(client)
                    continue
                self.conns |= {client, upstream}
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while chunk := src.recv(65536):
                if from_client:
                    with self.lock:
                        self.sent += len(chunk)
                        if self.budget is not None:
                            self.budget -= len(chunk)
                            if self.budget < 0:
                                self._cut_locked()
                                return
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            with self.lock:
                for s in (src, dst):
                    if s in self.conns:
                        self.conns.discard(s)
                        self._reset(s)

    def _cut_locked(self) -> None:
        self.up, self.budget = False, None
        for s in list(self.conns):
            self._reset(s)
        self.conns.clear()

    def cut(self) -> None:
        with self.lock:
            self._cut_locked()

    def cut_after(self, n_bytes: int) -> None:
        with self.lock:
            self.budget = n_bytes

    def restore(self) -> None:
        with self.lock:
            self.up = True

    def close(self) -> None:
        self.closed = True
        self.cut()
        self.server.close()


@pytest.fixture
def s3_proxy(s3_server):
    """A TcpProxy in front of the S3 server; point a URI at it with `?endpoint_override=`."""
    port = int(s3_server.rsplit(":", 1)[1])
    proxy = TcpProxy(port)
    try:
        yield proxy
    finally:
        proxy.close()


def tensorboard_scalars(blob: bytes) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from a TensorBoard event file: TFRecords (length, its CRC, an
    Event protobuf, its CRC) parsed here, independently of the writer."""
    import struct

    from tensorboardX.proto import event_pb2

    out: dict[str, dict[int, float]] = {}
    pos = 0
    while pos < len(blob):
        (length,) = struct.unpack("<Q", blob[pos:pos + 8])
        event = event_pb2.Event.FromString(blob[pos + 12:pos + 12 + length])
        pos += 12 + length + 4
        for v in event.summary.value:
            out.setdefault(v.tag, {})[event.step] = v.simple_value
    return out
