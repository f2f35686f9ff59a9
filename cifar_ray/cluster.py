"""The Ray session of a job: join a cluster or start a private local instance, check that the
workers can be placed, and give them the environment they need.

    python jobs/train.py --smoke     # no cluster running: starts a local instance, then stops it

`session(cfg)` is all the jobs use: inside it Ray is connected and the cluster can hold
cfg's workers. A local instance (no RAY_ADDRESS, no `ray start` running) lives for the job
only, with every server on 127.0.0.1 and token authentication on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator

import ray

from cifar_ray import ray_internals
from cifar_ray.config import TrainConfig, show_workers
from cifar_ray.errors import UserError

log = logging.getLogger(__name__)

# Passed to every worker so that each node reaches the same object store endpoint. Keys and
# secrets are deliberately absent: workers get credentials from their own chain (roles).
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")
# Written by `ray up` on the head node, where `ray job submit` runs the job's driver.
AUTOSCALER_CONFIG = "~/ray_bootstrap_config.yaml"


class ResourceError(UserError, RuntimeError):
    """The cluster cannot place the requested workers within the bounded wait."""


# A private local instance serves one job: Ray's metrics export (no Prometheus scrapes it),
# its usage report (nothing may phone home from an air-gapped box) and the idle workers it
# forks ahead of demand (Train and Tune start their actors themselves) are left out: fewer
# idle processes and wakeups beside the training threads (measured: docs/cluster.md).
LEAN_LOCAL_CONFIG = {"enable_metrics_collection": False, "enable_worker_prestart": False,
                     "prestart_worker_first_driver": False}


def worker_env() -> dict:
    """runtime_env for workers: the object store's endpoint and region."""
    return {"env_vars": {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}}


def start_local_ray(lean: bool = True, **kwargs) -> None:
    """A private one-machine Ray instance: every server on loopback, token auth on, and
    (`lean`; False only for the benchmark's comparison with Ray's defaults) without what only
    a long-lived cluster uses: LEAN_LOCAL_CONFIG and Ray's usage report."""
    ray_internals.single_machine()
    # gloo's peer connections, likewise: the loopback interface rather than the host's name.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # Token authentication: Ray 2.60 turns it on for a new local instance unless the user
    # set RAY_AUTH_MODE (setting it here, after `import ray`, would desync Ray's cached
    # config from its daemons). The dashboard runs (on 127.0.0.1) because Train V2 cleans up
    # placement groups through the State API.
    if lean:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        kwargs["_system_config"] = {**LEAN_LOCAL_CONFIG, **kwargs.get("_system_config", {})}
    ray.init(dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1", **kwargs)


def connect() -> bool:
    """Connect to the cluster named by RAY_ADDRESS (as `ray job submit` sets it) or a local
    `ray start` instance; else start a private one. Returns True if we started it. Either
    way no AWS credential travels in a runtime env, which Ray logs in clear (check_secrets)."""
    ray_internals.keep_secrets_out_of_trial_envs()
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS") or "auto"
    try:
        ray.init(address=address, log_to_driver=True)
    except ConnectionError:
        if address != "auto":
            raise
        log.info("no Ray cluster found: starting a local instance")
        start_local_ray(log_to_driver=True)
        return True
    check_secrets(ray.get_runtime_context().runtime_env.get("env_vars") or {})
    remove_orphaned_placement_groups()
    return False


# What a placement group holds or asks for until it is removed.
LIVE_PG_STATES = ("PENDING", "PREPARED", "CREATED", "RESCHEDULING")
ENDED_JOB_STATES = ("SUCCEEDED", "FAILED", "STOPPED")


def orphaned_placement_groups(groups, jobs) -> list:
    """Those of `groups` (the State API's PlacementGroupState) that Ray should have removed:
    not detached, still holding or asking for resources, created by a job that has ended
    (`jobs`: the State API's JobState)."""
    ended = {j.job_id for j in jobs
             if j.job_id and getattr(j.status, "value", j.status) in ENDED_JOB_STATES}
    return [g for g in groups if not g.is_detached and g.state in LIVE_PG_STATES
            and g.creator_job_id in ended]


def remove_orphaned_placement_groups() -> int:
    """Remove the placement groups of jobs that have ended. Ray removes a job's placement
    groups when the job and their creator actor end, but one whose creation reaches Ray in
    the moment between the two (a driver killed while Train or Tune is placing workers:
    seen after a killed sweep driver) is never removed and holds its CPUs and GPUs until
    the cluster stops: the next job waits for room that never comes. Returns how many."""
    from ray.util.placement_group import PlacementGroup
    from ray.util.state import list_jobs, list_placement_groups

    try:
        orphans = orphaned_placement_groups(
            list_placement_groups(limit=10_000, detail=True, raise_on_missing_output=False),
            list_jobs(limit=10_000, raise_on_missing_output=False))
    except Exception as e:  # no dashboard (State API) on this cluster: nothing to clean
        log.debug(f"placement groups not checked: {e}")
        return 0
    for g in orphans:
        ray.util.remove_placement_group(
            PlacementGroup(ray.PlacementGroupID(bytes.fromhex(g.placement_group_id))))
        held = ", ".join(f"{k} {v:g}" for b in g.bundles
                         for k, v in b["unit_resources"].items())
        log.warning(f"removed placement group {g.placement_group_id} ({held}) of job "
                    f"{g.creator_job_id}, which has ended: Ray had left it holding them")
    return len(orphans)


def check_secrets(job_env: dict) -> None:
    """A job submitted with AWS keys in its runtime env (`--runtime-env-json` env_vars) has
    already had them written in clear to the runtime-env agent's log on the head node; stop
    before every worker node's log gets them too."""
    leaked = [k for k in ray_internals.AWS_SECRETS if k in job_env]
    if leaked:
        raise UserError(
            f"{', '.join(leaked)} came in this job's runtime env, which Ray writes in clear "
            "to runtime_env_agent.log on every node it reaches: give the nodes an instance "
            "profile (cluster.yaml's IamInstanceProfile) or a credentials file "
            "(~/.aws/credentials through file_mounts), and submit without them")


def needed_resources(cfg: TrainConfig) -> dict[str, float]:
    """What the run needs to start: its workers' resources (an elastic run's fewest)."""
    n = cfg.fewest_workers()
    need = {"CPU": float(n * cfg.cpus_per_worker)}
    if cfg.use_gpu:
        need["GPU"] = n * cfg.gpus_per_worker
    return need


def fits(have: dict[str, float], need: dict[str, float]) -> int:
    """How many times `need` fits in `have`, in Ray's own 1e-4 units (1 // 0.1 is 9 in
    floating point; Ray fits 10 such tasks on a GPU)."""
    return min(round(have.get(k, 0) * 10_000) // round(v * 10_000) for k, v in need.items())


def shortfall(cfg: TrainConfig) -> dict[str, tuple[float, float]]:
    """{resource: (needed, what the cluster has now)} for each one the workers lack."""
    have = ray.cluster_resources()
    return {k: (v, have.get(k, 0.0)) for k, v in needed_resources(cfg).items()
            if have.get(k, 0.0) < v}


def describe_shortfall(short: dict[str, tuple[float, float]]) -> str:
    return ", ".join(f"{k}: need {v:g}, cluster has {h:g}" for k, (v, h) in short.items())


def autoscaler_max_resources(config: dict) -> dict[str, float]:
    """The most of each resource an autoscaler config can bring up: the head's resources plus
    every worker type's times its max_workers (capped by the cluster's max_workers)."""
    cap = config.get("max_workers", 0)
    total: dict[str, float] = {}
    for name, node_type in config.get("available_node_types", {}).items():
        count = 1 if name == config.get("head_node_type") else min(
            node_type.get("max_workers", cap), cap)
        for k, v in node_type.get("resources", {}).items():
            total[k] = total.get(k, 0.0) + float(v) * count
    return total


def max_cluster_resources() -> dict[str, float] | None:
    """What the connected cluster can grow to, or None when nothing can add nodes to it (a
    local instance, a fixed `ray start` cluster): then what it has now is all it will have."""
    reported = ray_internals.max_resources_from_cluster_config()  # autoscaler v2, KubeRay
    if reported:
        return {k: float(v) for k, v in reported.items()}
    path = os.path.expanduser(AUTOSCALER_CONFIG)  # the classic autoscaler of `ray up`
    if os.path.exists(path):
        import yaml

        with open(path) as f:
            return autoscaler_max_resources(yaml.safe_load(f))
    return None


# A wait for the autoscaler polls every POLL_S and says what it waits for whenever that
# changes, and at least every PROGRESS_EVERY_S (a cold GPU node takes minutes: docs/cluster.md).
POLL_S = 2.0
PROGRESS_EVERY_S = 30.0


def worker_bundle(cfg: TrainConfig) -> dict[str, float]:
    """One worker's resources, as Train's placement group asks for them."""
    return {"CPU": float(cfg.cpus_per_worker),
            **({"GPU": float(cfg.gpus_per_worker)} if cfg.use_gpu else {})}


def autoscaler_activity(status, now: float | None = None,
                        first_seen: dict[str, float] | None = None) -> str:
    """What the autoscaler is launching (requested from the cloud) and what is starting (an
    instance that has not joined Ray yet), by node type and count, from a ClusterStatus
    (ray_internals.autoscaler_status). With `now` (wall-clock s), for how long: a launch
    from its request time, a starting node from `first_seen` (instance id -> when this job
    first saw it pending)."""
    def since(ts: float | None) -> str:
        return "" if now is None or ts is None else f" for {max(now - ts, 0):.0f} s"

    parts = []
    launching: dict[str, list] = {}
    for r in status.pending_launches:
        n, ts = launching.get(r.ray_node_type_name, (0, r.request_ts_s))
        launching[r.ray_node_type_name] = [n + r.count, min(ts, r.request_ts_s)]
    for kind, (n, ts) in sorted(launching.items()):
        parts.append(f"launching {n} {kind}{since(ts)}")
    starting: dict[str, list] = {}
    for node in status.pending_nodes:
        ts = None if now is None else (first_seen or {}).get(node.instance_id, now)
        n, oldest = starting.get(node.ray_node_type_name, (0, ts))
        starting[node.ray_node_type_name] = [n + 1, None if ts is None else min(oldest, ts)]
    for kind, (n, ts) in sorted(starting.items()):
        parts.append(f"{n} {kind} starting{since(ts)}")
    return "; ".join(parts) or "nothing pending"


# Autoscaler v2 tries a node type that failed to launch again within seconds, and again,
# without end: a job stops waiting once the type has failed this often during its wait.
LAUNCH_TRIES = 3


def launch_failure(status, since: float):
    """The newest launch the autoscaler reports failed at or after `since` (wall-clock s),
    once nothing else can still bring the nodes: no node starting, no launch of another node
    type pending, and no retry of the failed types either, unless they have failed
    LAUNCH_TRIES times already; else None."""
    failed = [r for r in status.failed_launches if (r.failed_ts_s or r.request_ts_s) >= since]
    if not failed or status.pending_nodes:
        return None
    kinds = {r.ray_node_type_name for r in failed}
    if any(r.ray_node_type_name not in kinds for r in status.pending_launches):
        return None
    if status.pending_launches and sum(r.count for r in failed) < LAUNCH_TRIES:
        return None
    return max(failed, key=lambda r: r.failed_ts_s or r.request_ts_s)


def launch_failure_message(cfg: TrainConfig, failed, short_text: str) -> str:
    """One line: the node type, the autoscaler's own error, and what to change."""
    lines = [ln.strip() for ln in (failed.details or "").splitlines() if ln.strip()]
    # A traceback's last line is the error. Ray 2.60's autoscaler v2 often records none: it
    # logs the cloud's error (capacity, quota) only in its own log on the head.
    error = lines[-1] if lines else ("its status gives no reason; the cloud's error is in "
                                     "/tmp/ray/session_latest/logs/monitor.log on the head")
    if len(error) > 300:
        error = error[:297] + "..."
    kind = failed.ray_node_type_name
    instance = (f" ({failed.instance_type_name})"
                if failed.instance_type_name and failed.instance_type_name != kind else "")
    return (f"--workers {show_workers(cfg)} cannot be placed ({short_text}): the autoscaler could "
            f"not launch {failed.count} {kind} node(s){instance}: {error}. Give {kind} another "
            "instance type or availability zone (cluster.yaml), raise the cloud quota for it, "
            "or ask for fewer workers (--workers).")


def this_machine_only() -> bool:
    """Whether the connected cluster is this process's machine alone: one live node, ours,
    and nothing that can add others."""
    nodes = [n for n in ray.nodes() if n["Alive"]]
    return (len(nodes) == 1 and nodes[0]["NodeID"] == ray.get_runtime_context().get_node_id()
            and not can_grow())


def can_grow() -> bool:
    """Whether anything can add nodes to the connected cluster (an autoscaler)."""
    return max_cluster_resources() is not None or autoscaler_reports(_autoscaler_status())


def autoscaler_reports(status) -> bool:
    """Whether an autoscaler (v2) has reported its state to this cluster's GCS."""
    version = getattr(getattr(status, "stats", None), "autoscaler_version", None)
    return version not in (None, "", "0")


def _autoscaler_status():
    """The autoscaler's ClusterStatus, or None when it cannot be read (the wait then says
    only what is missing)."""
    try:
        return ray_internals.autoscaler_status()
    except Exception as e:  # a status line is not worth stopping a job for
        log.debug(f"autoscaler status unavailable: {e}")
        return None


def wait_for_resources(cfg: TrainConfig) -> None:
    """Ray Train would wait forever for workers the cluster cannot place. Fail at once when
    the cluster can never hold them (no autoscaler, or beyond its largest size) or when the
    autoscaler reports it cannot launch them; otherwise ask the autoscaler for them and wait
    --resource-timeout-s, saying what is pending, then fail saying what is missing."""
    from ray.autoscaler.sdk import request_resources

    need = needed_resources(cfg)
    start, start_wall = time.monotonic(), time.time()
    deadline = start + cfg.resource_timeout_s
    requested = False
    said, said_at = None, float("-inf")
    first_seen: dict[str, float] = {}
    try:
        while True:
            short = shortfall(cfg)
            if not short:
                if requested:
                    log.info(f"the cluster has room for --workers {show_workers(cfg)} after "
                             f"{time.monotonic() - start:.0f} s")
                return
            text = describe_shortfall(short)
            hint = (" (--use-gpu on a machine without GPUs? drop --use-gpu to train on CPU)"
                    if "GPU" in short else "")
            status = _autoscaler_status()
            ceiling = max_cluster_resources()
            if ceiling is None and not autoscaler_reports(status):
                raise ResourceError(f"--workers {show_workers(cfg)} cannot be placed: {text}, and "
                                    f"no autoscaler can add nodes to this cluster{hint}.")
            # An autoscaler whose config this node cannot read: its largest size is unknown,
            # so only a failed launch or the timeout ends the wait.
            ceiling = ceiling if ceiling is not None else {k: v for k, v in need.items()}
            beyond = {k: ceiling.get(k, 0.0) for k in short if ceiling.get(k, 0.0) < need[k]}
            if beyond:
                most = ", ".join(f"{k}: {v:g}" for k, v in beyond.items())
                raise ResourceError(f"--workers {show_workers(cfg)} cannot be placed: {text}; even "
                                    f"at its largest the autoscaler gives {most}{hint}.")
            if not requested:
                # The autoscaler launches nodes for demand it sees; Train's placement group
                # comes only after this wait, so ask for the workers' bundles now (Ray's
                # public request_resources; cleared when the wait ends, below): all of an
                # elastic run's (it starts once the fewest fit, and grows into the rest).
                request_resources(bundles=[worker_bundle(cfg)] * cfg.workers)
                requested = True
            activity = state = "autoscaler status unavailable"
            if status is not None:
                failed = launch_failure(status, since=start_wall - 1)
                if failed is not None:
                    raise ResourceError(launch_failure_message(cfg, failed, text))
                for node in status.pending_nodes:
                    first_seen.setdefault(node.instance_id, time.time())
                activity = autoscaler_activity(status, time.time(), first_seen)
                state = autoscaler_activity(status)
            waited = time.monotonic() - start
            if time.monotonic() >= deadline:
                raise ResourceError(f"--workers {show_workers(cfg)} cannot be placed: "
                                    f"{text}{hint}. Waited {cfg.resource_timeout_s:g} s for the "
                                    f"autoscaler (--resource-timeout-s); it reports: {activity}.")
            if (text, state) != said or time.monotonic() - said_at >= PROGRESS_EVERY_S:
                log.info(f"waiting for the autoscaler ({waited:.0f} s of "
                         f"{cfg.resource_timeout_s:g} s, --resource-timeout-s): {text}; "
                         f"autoscaler: {activity}")
                said, said_at = (text, state), time.monotonic()
            time.sleep(POLL_S)
    finally:
        if requested:
            # Train's placement group (or nothing, if the job stops) is the demand from here:
            # a request left in place would keep its nodes up after the job. Train places
            # its workers within seconds, well inside any idle timeout.
            try:
                request_resources(bundles=[])
            except Exception as e:  # never hide why the wait ended
                log.warning(f"could not withdraw the request to the autoscaler: {e}")


@contextlib.contextmanager
def session(cfg: TrainConfig) -> Iterator[None]:
    """Ray connected, and room for cfg's workers (one trial's, in a sweep); a local instance
    started here is shut down on the way out, whatever happens inside."""
    started_here = connect()
    try:
        wait_for_resources(cfg)
        yield
    finally:
        if started_here:
            ray.shutdown()
