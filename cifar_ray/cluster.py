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
from cifar_ray.config import TrainConfig
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
    return False


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
    need = {"CPU": float(cfg.workers * cfg.cpus_per_worker)}
    if cfg.use_gpu:
        need["GPU"] = cfg.workers * cfg.gpus_per_worker
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


def wait_for_resources(cfg: TrainConfig) -> None:
    """Ray Train would wait forever for workers the cluster cannot place. Fail at once when
    the cluster can never hold them (no autoscaler, or beyond its largest size); otherwise
    wait --resource-timeout-s for the autoscaler to add nodes, then fail saying what is
    missing."""
    need = needed_resources(cfg)
    deadline = time.monotonic() + cfg.resource_timeout_s
    said = False
    while True:
        short = shortfall(cfg)
        if not short:
            return
        text = describe_shortfall(short)
        hint = (" (--use-gpu on a machine without GPUs? drop --use-gpu to train on CPU)"
                if "GPU" in short else "")
        ceiling = max_cluster_resources()
        if ceiling is None:
            raise ResourceError(f"--workers {cfg.workers} cannot be placed: {text}, and no "
                                f"autoscaler can add nodes to this cluster{hint}.")
        beyond = {k: ceiling.get(k, 0.0) for k in short if ceiling.get(k, 0.0) < need[k]}
        if beyond:
            most = ", ".join(f"{k}: {v:g}" for k, v in beyond.items())
            raise ResourceError(f"--workers {cfg.workers} cannot be placed: {text}; even at "
                                f"its largest the autoscaler gives {most}{hint}.")
        if time.monotonic() >= deadline:
            raise ResourceError(f"--workers {cfg.workers} cannot be placed: {text}{hint}. "
                                f"Waited {cfg.resource_timeout_s:g} s for the autoscaler "
                                "(--resource-timeout-s).")
        if not said:
            log.info(f"waiting up to {cfg.resource_timeout_s:g} s for the autoscaler to add "
                     f"nodes ({text})")
            said = True
        time.sleep(2)


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
