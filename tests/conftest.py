"""Shared fixtures: a real S3-protocol server (moto) and a real Ray instance, both on loopback;
the test tiers; `require` for outside resources.

    python -m pytest -q -m fast     # fast tier: no Ray, no S3 server, no browser, no shared data
    python -m pytest -q             # the whole suite
    python -m pytest -q -n 0 -s     # in one process, showing what the tests print

Two processes (pytest-xdist, pyproject.toml's addopts): the tests that start Ray run one after
another in one of them (RAY_GROUP), everything else beside them in the other.

The servers (S3, MLflow) are started by the first test that needs them, shared by the rest
of the session and stopped at its end: nothing outlives the session. One local Ray instance at
a time (two on one machine confuse Train V2): the one of `ray_local` is shared from module to
module (RaySlot), started after the S3 and MLflow environment is set so that its workers
inherit it.

Tiers: every test is marked `fast` here unless it uses a fixture of HEAVY_FIXTURES (directly
or through other fixtures) or carries the `ray` marker. A test that starts Ray, a server or a
browser by itself must carry `ray` or get it through such a fixture: a fast test that leaves
one behind fails (`_fast_tier_guard`), and tests/test_tiers.py checks the classification.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
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
# MLflow's, likewise: in MLflow's own variables, as a user sets them, in the environment of
# the shared Ray instance (its workers log to MLflow) whether or not a test tracks a run.
FAKE_MLFLOW_USER = "cifar-ray-test"
FAKE_MLFLOW_PASSWORD = "-".join(("mlflow", "password", "CANARY", "7d1e"))
# Ray Train's controller polls its workers every 2 s by default, so every run here noticed its
# end (or a failure) a second late on average: tens of runs, tens of seconds. 0.5 s here, for
# every Ray instance and job the tests start (Train passes it on to controller and workers).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


# What makes a test heavy: {fixture: what it starts or needs}. Listed by name, wherever the
# fixture is defined; a test using any of them, even through another fixture, is not fast.
HEAVY_FIXTURES = {
    "s3_server": "the S3-protocol server (moto)",
    "bucket": "a bucket on the S3-protocol server",
    "s3_data": "a dataset on the S3-protocol server",
    "s3_proxy": "a TCP proxy in front of the S3-protocol server",
    "ray_local": "the shared local Ray instance",
    "_shared_ray": "the shared local Ray instance (RaySlot)",
    "two_gpus": "a local Ray instance with logical GPUs (test_gpu_share.py)",
    "nodes": "a Ray cluster of several nodes (test_cluster_faults.py)",
    "head": "a `ray start --head` cluster and its jobs API (test_jobs_api.py)",
    "autoscaling": "a `ray start --head` autoscaling cluster (test_autoscaler.py)",
    "mlflow_server": "an `mlflow server` (test_train_ray.py, test_tune_ray.py)",
    "browser": "Chromium through ChromeDriver (test_report.py)",
    "shared_tar": "the real CIFAR-10 JPEG tar (SHARED_TAR)",
}
# Markers that make a test heavy by themselves (for tests that start Ray in a subprocess).
HEAVY_MARKERS = {"ray": "starts Ray (the `ray` marker)"}
# The fixtures that start Ray. The suite runs in two processes (pytest-xdist, pyproject's
# addopts): every test that starts Ray, by a fixture or its `ray` marker, goes to the one
# group RAY_GROUP, which runs one after another in a single process (one Ray instance at a
# time); everything else runs beside it in the other.
RAY_FIXTURES = {"ray_local", "_shared_ray", "two_gpus", "nodes", "head", "autoscaling"}
RAY_GROUP = "ray"
# Process names a fast test must never leave running (pgrep -f patterns, in effect).
HEAVY_PROCESSES = ("raylet", "gcs_server", "moto", "chromium", "chromedriver", "mlflow")


def heavy_reasons(fixturenames, marker_names) -> list[str]:
    """Why a test with these fixtures (the transitive closure) and markers is not fast;
    empty for a fast test."""
    return ([f"{name}: {HEAVY_FIXTURES[name]}" for name in fixturenames
             if name in HEAVY_FIXTURES] +
            [f"@{m}: {HEAVY_MARKERS[m]}" for m in marker_names if m in HEAVY_MARKERS])


def pytest_configure(config):
    if hasattr(config, "workerinput"):  # one of the two processes of pytest-xdist
        import torch

        # torch sizes its thread pool to the machine's cores in every process: two of them
        # side by side ran the fast tier at 150 s instead of 89 (their threads spinning on
        # each other's cores). Half the cores each.
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))


def _out_of_its_group(item) -> bool:
    """A Ray test that pytest-xdist did not put in RAY_GROUP (its node id carries the group
    once it has one): it would run beside another Ray instance."""
    config = item.config
    return bool(hasattr(config, "workerinput") and config.getvalue("loadgroup")
                and item.get_closest_marker("xdist_group")
                and not item.nodeid.endswith("@" + RAY_GROUP))


@pytest.hookimpl(tryfirst=True)  # before -m selects on the marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        markers = {m.name for m in item.iter_markers()}
        if not heavy_reasons(item.fixturenames, markers):
            item.add_marker(pytest.mark.fast)
        if "ray" in markers or RAY_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.xdist_group(RAY_GROUP))
    # Whole modules in an order of their own (a module's tests keep theirs: its fixtures are
    # set up once), stable within a rank.
    modules: dict[str, list] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::")[0], []).append(item)
    items[:] = [i for m in sorted(modules.values(), key=_module_rank) for i in m]


def _module_rank(module_items: list) -> tuple[int, int]:
    """A module's place in the run: fast tests only first (quick feedback); then the S3
    server, the browser, the shared data; then the modules that start Ray their own way (a
    cluster, a `ray start` head, a job script: each stops the shared instance first); last
    the modules that use the shared local instance (`ray_local`), one after another so that
    it starts as few times as possible: a module with a `fresh_ray` test first, one that
    stops the instance too (a `ray` test without `ray_local`) last."""
    def uses_local(i) -> bool:
        return "ray_local" in i.fixturenames

    def own_ray(i) -> bool:
        return i.get_closest_marker("ray") is not None and not uses_local(i)

    if any(uses_local(i) for i in module_items):
        if any(i.get_closest_marker("fresh_ray") for i in module_items):
            return 3, 0
        return 3, 2 if any(own_ray(i) for i in module_items) else 1
    if any(own_ray(i) for i in module_items):
        return 2, 0
    return (0 if all(i.get_closest_marker("fast") for i in module_items) else 1), 0


def require(resource_ok: bool, what_to_install: str) -> None:
    """A test whose outside resource (a program, a file: not a Python package, which the dev
    install provides) is missing: skipped on a laptop, the reason saying what to install or
    where to put the file; failed with the same message in CI (CIFAR_RAY_CI=1, set by
    .ci/run), so that nothing is skipped silently where it counts.

    Not for the CUDA tests: CI has no GPU by design, so they keep skipping there too
    (`pytest.mark.skipif(not torch.cuda.is_available(), ...)`, marked `gpu`)."""
    if resource_ok:
        return
    if os.environ.get("CIFAR_RAY_CI") == "1":
        pytest.fail(f"missing in CI (CIFAR_RAY_CI=1): {what_to_install}", pytrace=False)
    pytest.skip(what_to_install)


def _heavy_processes() -> dict[int, str]:
    """{pid: command line} of this process's descendants that a fast test must not start."""
    out = {}
    for pid in descendants(os.getpid()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read(300).replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(name in cmd for name in HEAVY_PROCESSES):
            out[pid] = cmd.strip()
    return out


@pytest.fixture(autouse=True)
def _fast_tier_guard(request):
    """A fast test must not start Ray or a server itself: fail it if it leaves a Ray session
    or one of HEAVY_PROCESSES behind (give it the `ray` marker or the fixture instead)."""
    if request.node.get_closest_marker("fast") is None:
        yield
        return
    ray_before = _ray_initialized()
    before = _heavy_processes()
    yield
    started = {p: c for p, c in _heavy_processes().items() if p not in before}
    if not ray_before and _ray_initialized():
        started[0] = "a Ray session in this process"
    if started:
        pytest.fail("a fast test started " + "; ".join(started.values()) +
                    ": mark it `ray` or use the fixture that starts it (HEAVY_FIXTURES)",
                    pytrace=False)


def _ray_initialized() -> bool:
    ray = sys.modules.get("ray")
    return bool(ray is not None and getattr(ray, "is_initialized", lambda: False)())


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
    _FITTING.append(t)
    return t, out


# Runs started by fit_in_thread: one still going when its test ends (a failed assertion mid-
# run) would hold the CPUs the next test needs (ray_local stops it).
_FITTING: list[threading.Thread] = []


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


def cmdline(pid: int) -> list[bytes]:
    """A process's argv ([] once it has ended)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def hosts_train_worker(pid: int) -> bool:
    """Whether a Ray Train worker runs below `pid` (a node's raylet)."""
    return any(b"RayTrainWorker" in b" ".join(cmdline(p)) for p in descendants(pid))


def kill_node(raylet: int) -> None:
    """A node lost as a spot instance is: SIGKILL to its raylet and every process under it,
    by pid."""
    for pid in descendants(raylet) | {raylet}:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def evaluation_tasks() -> list:
    """The Ray tasks of the connected instance that evaluated a checkpoint (a run's final
    evaluation when it does not run in the driver: train.evaluate_on_a_worker)."""
    from ray.util.state import list_tasks

    return list_tasks(filters=[("func_or_class_name", "=", "evaluate_checkpoint")])


def copy_tracked_files(root: Path) -> Path:
    """The repository's tracked files copied under `root`, as a fresh clone has them
    (whatever else this checkout has lying around): what a job's --working-dir ships."""
    repo = Path(__file__).resolve().parents[1]
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=repo, capture_output=True,
                             check=True).stdout.decode().split("\0")
    for name in filter(None, tracked):
        if (repo / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo / name, root / name)
    return root


def alive(pids: set[int]) -> list[int]:
    """Those of `pids` still running (not zombies: a zombie is its parent's to reap)."""
    out = []
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    out.append(p)
        except OSError:
            pass
    return out


def stop_ray_start(proc: subprocess.Popen, log) -> None:
    """End a `ray start --head --block` process and every process it started, and only those
    (never `ray stop`, which stops every Ray instance of the machine's user): SIGTERM to it
    (it stops its daemons), then to whatever outlived it (an autoscaler's nodes do), then
    SIGKILL to what is left after a minute."""
    started = descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()
    for p in alive(started):
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    try:
        wait_until(lambda: not alive(started), 60, "the cluster's processes to exit")
    finally:
        for p in alive(started):
            os.kill(p, signal.SIGKILL)
    assert not alive(started)


def s3_keys(bucket: str, prefix: str = "") -> list[str]:
    """The keys of every object in the bucket (under `prefix`), sorted."""
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                         Prefix=prefix)
    return sorted(o["Key"] for p in pages for o in p.get("Contents", []))


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


# The environment a Ray instance hands its workers when it starts (they inherit the
# raylet's): a shared instance started with other values is restarted, so that a test that
# sets, say, other credentials before Ray starts gets workers that have them. MLflow's
# tracking variables only: the driver of a tracked run sets MLFLOW_HTTP_REQUEST_* for itself
# (tracking.py; rank 0 does the same in its own process), which must not cost a restart.
WORKER_ENV_PREFIXES = ("AWS_", "MLFLOW_TRACKING_")


class RaySlot:
    """The one Ray instance this session may have at a time (two on one machine confuse
    Train V2). The local instance of `ray_local` is shared from test to test and module to
    module while the workers' environment stays the same; it is stopped before every test
    that starts Ray its own way (a cluster, a `ray start` head, a job script: tests marked
    `ray` that do not use `ray_local`) and at the end of the session."""

    def __init__(self):
        self.env: dict | None = None  # the running instance's worker environment; None: none
        self.served = 0  # tests that have used the running instance

    def local(self, fresh: bool) -> None:
        import ray

        from cifar_ray import cluster

        env = {k: v for k, v in os.environ.items() if k.startswith(WORKER_ENV_PREFIXES)}
        if self.env is not None and (env != self.env or (fresh and self.served)
                                     or not ray.is_initialized()):
            self.stop()
        if self.env is None:
            cluster.start_local_ray(num_cpus=2, log_to_driver=True)
            self.env, self.served = env, 0
        self.served += 1

    def stop(self) -> None:
        if self.env is not None:
            import ray

            self.env = None
            ray.shutdown()


RAY_SLOT = RaySlot()


@pytest.hookimpl(tryfirst=True)  # before any fixture of the test is set up
def pytest_runtest_setup(item):
    if _out_of_its_group(item):
        pytest.fail(f"pytest-xdist left the Ray tests out of their group: pytest "
                    f"{pytest.__version__} with this pytest-xdist does not group tests "
                    "(pytest-xdist#1386). Install the versions pyproject.toml's dev extra "
                    "asks for, or run in one process: -n 0", pytrace=False)
    if item.get_closest_marker("ray") and "ray_local" not in item.fixturenames:
        RAY_SLOT.stop()


@pytest.fixture(scope="session")
def _shared_ray(s3_server):
    """RAY_SLOT, stopped at the end of the session before the S3 server is. MLflow's fake
    credentials are set for as long: every run on the shared instance has them, so that the
    runs that track to MLflow (test_train_ray.py, test_tune_ray.py) can check that they go
    nowhere, and no instance is restarted for them."""
    creds = {"MLFLOW_TRACKING_USERNAME": FAKE_MLFLOW_USER,
             "MLFLOW_TRACKING_PASSWORD": FAKE_MLFLOW_PASSWORD}
    old = {k: os.environ.get(k) for k in creds}
    os.environ.update(creds)
    try:
        yield RAY_SLOT
    finally:
        RAY_SLOT.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """`mlflow server` (sqlite backend) on 127.0.0.1 for the rest of the session: {"uri",
    "db"}. It does not ask for credentials; the fake ones are in the environment
    (_shared_ray), so that the tests can check they go nowhere."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "mlflow"), "server", "--host",
         "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError("mlflow server exited:\n" + (root / "server.log").read_text())
        try:
            with urllib.request.urlopen(uri + "/health", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        wait_until(healthy, 300, "mlflow server to answer /health")
        yield {"uri": uri, "db": root / "mlflow.db"}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        log.close()


@pytest.fixture
def ray_local(_shared_ray, request):
    """The real local Ray instance, started as the jobs start theirs (loopback, token auth as
    Ray sets it; 2 CPUs whatever the machine has) after the S3 environment is set, and shared
    by every test that uses it (RaySlot). A test marked `fresh_ray` gets one that no test has
    used yet: the first of its module, it takes the instance as started."""
    import ray

    _shared_ray.local(fresh=request.node.get_closest_marker("fresh_ray") is not None)
    yield ray
    if any(t.is_alive() for t in _FITTING):  # the test ended with its run still going
        _shared_ray.stop()  # its driver gone, Ray ends the run; the next test gets a fresh one
    _FITTING.clear()


@pytest.fixture(scope="session")
def shared_tar() -> Path:
    """The real CIFAR-10 JPEG tar (16 MB): ../shared/data, or where CIFAR_RAY_SHARED_TAR says."""
    require(SHARED_TAR.is_file(),
            f"the real CIFAR-10 JPEG tar is not at {SHARED_TAR}: set "
            "CIFAR_RAY_SHARED_TAR=/path/to/cifar10-train-jpeg.tar.gz")
    return SHARED_TAR


def shared_tar_slice(tar_path: Path, per_class: int) -> list[tuple[str, bytes]]:
    """The first `per_class` JPEGs of each class from the real CIFAR-10 tar (the `shared_tar`
    fixture's path)."""
    out, seen = [], {}
    with tarfile.open(tar_path, "r|gz") as tar:
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
