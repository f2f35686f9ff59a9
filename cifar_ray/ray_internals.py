"""Every use of Ray's private APIs, in one place, for the one Ray version they were written for.

    python -c "import cifar_ray.ray_internals"      # warns on a Ray other than RAY_VERSION

Ray's private modules change between releases without notice. cifar_ray reaches into them
for the few things below and nowhere else (tests included). Each is named with what it is
for; on another Ray version, check each against that version's source, update this file and
RAY_VERSION. Importing it on another version warns; a private name that has gone raises
RayInternalsError naming it and this file.

1. single_machine(): Ray's single-machine switch (env var + module constant) that keeps a
   private local instance on 127.0.0.1, and Train's preemption watcher off there.
2. max_resources_from_cluster_config(): what an autoscaler (v2, KubeRay) can grow to.
3. TorchBackend, address_and_port, set_torch_env_vars: Ray Train's torch backend, which
   rendezvous.py subclasses to bind torch's rendezvous store to one address.
4. asha_rungs_with, asha_cutoff, asha_count_stop: the fields of Tune's ASHA that our ASHA
   (tune.py) re-checks.
5. quiet_train_reports(level): Train V2 logs every ray.train.report under a logger named
   after its file, which LoggingConfig's filter (for "ray.train.*") misses.
6. For tests: auth_headers(), dashboard_url(), prepare_autoscaler_config(),
   validate_autoscaler_config(), usage_stats_enabled().
7. run_storage(): where a Train worker's run folder lives (filesystem, path), from the
   StorageContext that TrainContext.get_storage() returns (a DeveloperAPI), for our
   checkpoint upload (train.upload_checkpoint).
8. For the multi-node tests: raylet_pid(node) of a ray.cluster_utils.Cluster node.
9. WorkerGroupStartupTimeoutError: the controller failure of a restart that found no room
   (train.fit_trainer turns it into our ResourceError).
10. keep_secrets_out_of_trial_envs(): Tune copies the driver's AWS credentials into every
   trial actor's runtime_env, which Ray's runtime-env agent writes in clear to its log; and
   for the tests, session_dir(), where those logs are.
11. autoscaler_status(): what the autoscaler has pending, launching and failed to launch
   (autoscaler v2's get_cluster_status, the source of `ray status`; v2 is what `ray up` runs
   since Ray 2.50, and KubeRay), and its dataclasses (ClusterStatus, LaunchRequest,
   NodeInfo) for the tests that build one. For the autoscaling-cluster tests:
   fake_multinode_provider(), the provider section that runs Ray's fake multi-node provider
   (what ray.cluster_utils.AutoscalingCluster uses) from the installed wheel, and
   fake_head_node_id(), the head's id that provider expects.
12. BoundedElasticWait, RestartWaitExceeded: a controller callback on Train's control-loop
   states that bounds an elastic run's wait for room (Train's own waits without limit); for
   its test, controller_state().
"""

from __future__ import annotations

import importlib
import logging
import os
import warnings

import ray

RAY_VERSION = "2.60"


class RayInternalsError(RuntimeError):
    """A private Ray name this project relies on is missing from the installed Ray."""


if not ray.__version__.startswith(RAY_VERSION + "."):
    warnings.warn(f"cifar_ray/ray_internals.py was written for Ray {RAY_VERSION}, and this is "
                  f"Ray {ray.__version__}: check the private names it lists against this "
                  "version's source", stacklevel=2)


def _private(module: str, name: str):
    """`module.name` from Ray's private API, or an error that says what to update."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise RayInternalsError(
            f"Ray {ray.__version__} has no {module}.{name} ({e}); cifar_ray/ray_internals.py "
            f"was written for Ray {RAY_VERSION}: update it for this version") from e


# 3. Ray Train's torch backend (subclassed at import time by rendezvous.py).
TorchBackend = _private("ray.train.torch.config", "_TorchBackend")
address_and_port = _private("ray.train._internal.utils", "get_address_and_port")
set_torch_env_vars = _private("ray.train.torch.config", "_set_torch_distributed_env_vars")

# 1. Train's preemption watcher switch (on unless "0"; Train passes it on to its workers).
PREEMPTION_WATCHER_ENV = _private("ray.train.v2._internal.constants",
                                  "ENABLE_PREEMPTION_WATCHER_ENV_VAR")

# 9. What ray.train.ControllerError.controller_failure is when a worker group found no room.
WorkerGroupStartupTimeoutError = _private("ray.train.v2._internal.exceptions",
                                          "WorkerGroupStartupTimeoutError")


def single_machine() -> None:
    """For a Ray instance we start on this machine alone, before it starts. Ray binds its
    servers to the node's IP, and on Linux swaps 127.0.0.1 for the machine's routable address
    unless told the instance is single-machine: the switch it uses on macOS/Windows. The env
    var is for the daemons and workers, the constant for this process (read when `ray` was
    imported). No node of a one-machine instance is ever preempted, so Train's preemption
    watcher (an actor per run, whose creation logs a spurious core-worker ERROR: Ray issue
    53727) is off unless the user set it."""
    os.environ[_private("ray._private.ray_constants", "ENABLE_RAY_CLUSTERS_ENV_VAR")] = "0"
    importlib.import_module("ray._private.ray_constants").ENABLE_RAY_CLUSTER = False
    os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")


def max_resources_from_cluster_config() -> dict | None:
    """Resources an autoscaler reports it can grow the cluster to (None without one)."""
    state = _private("ray._private.state", "state")
    return state.get_max_resources_from_cluster_config()


def quiet_train_reports(level: str) -> None:
    """Apply Ray Train's log level (LoggingConfig) to the logger of its report lines too."""
    logger = _private("ray.train.v2._internal.execution.context", "logger")
    logger.setLevel(logging.getLevelName(level))


def asha_rungs_with(scheduler, trial_id: str) -> list[dict]:
    """The rungs (trial id -> recorded score) where `trial_id` has a score."""
    bracket = scheduler._trial_info.get(trial_id)
    return [r for _, r in bracket._rungs if trial_id in r] if bracket else []


def asha_cutoff(scheduler, trial_id: str, rung: dict) -> float | None:
    """The score a trial needs at `rung` to continue, as ASHA computes it now."""
    return scheduler._trial_info[trial_id].cutoff(rung)


def asha_count_stop(scheduler) -> None:
    """Keep ASHA's own count of stopped trials (shown in Tune's status) right."""
    scheduler._num_stopped += 1


def auth_headers() -> dict:
    """The HTTP headers that carry this process's Ray token (empty without token auth)."""
    get = _private("ray._private.authentication.http_token_authentication",
                   "get_auth_headers_if_auth_enabled")
    return get({})


def dashboard_url() -> str:
    """host:port of the connected Ray instance's dashboard (and jobs API)."""
    return _private("ray._private.worker", "get_dashboard_url")()


def usage_stats_enabled() -> bool:
    """Whether Ray would send its usage report from this process's instance."""
    return _private("ray._common.usage.usage_lib", "usage_stats_enabled")()


def prepare_autoscaler_config(config: dict) -> dict:
    """What `ray up` does to a cluster config before it launches anything."""
    return _private("ray.autoscaler._private.util", "prepare_config")(config)


def validate_autoscaler_config(config: dict) -> None:
    """Ray's own jsonschema validation of a prepared cluster config."""
    _private("ray.autoscaler._private.util", "validate_config")(config)


# 7. The run folder of a Train worker, for checkpoint_upload_fn.
def run_storage():
    """(pyarrow filesystem, run folder path on it) of the current Ray Train run."""
    import ray.train

    try:
        where = ray.train.get_context().get_storage()
        return where.storage_filesystem, where.experiment_fs_path
    except AttributeError as e:
        raise RayInternalsError(
            f"Ray {ray.__version__}: TrainContext.get_storage() no longer gives "
            f"storage_filesystem/experiment_fs_path ({e}); update cifar_ray/ray_internals.py"
        ) from e


# 8. Tests: the raylet of one node of a ray.cluster_utils.Cluster (its workers are children).
def raylet_pid(node) -> int:
    try:
        return node.all_processes["raylet"][0].process.pid
    except (AttributeError, KeyError, IndexError) as e:
        raise RayInternalsError(f"Ray {ray.__version__}: a cluster_utils node no longer lists "
                                f"its raylet in all_processes ({e}); update "
                                "cifar_ray/ray_internals.py") from e


# 10. Tune (tune/execution/class_cache.py) copies AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
# AWS_SESSION_TOKEN and AWS_SECURITY_TOKEN from the driver's environment into every trial
# actor's runtime_env; the runtime-env agent logs each runtime env it sets up, values and
# all, in <session>/logs/runtime_env_agent.log (mode 0644).
AWS_SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
               "AWS_SECURITY_TOKEN")


def keep_secrets_out_of_trial_envs() -> None:
    """Tune copies no AWS credential into a trial's runtime_env: a trial gets them the way
    every other Ray worker does, from its raylet's environment (where cifar_ray started Ray
    itself, the driver's own), or from the node's instance profile or credentials file."""
    _private("ray.tune.execution.class_cache", "ENV_VARS_TO_PROPAGATE").difference_update(
        AWS_SECRETS)


def session_dir() -> str:
    """The connected Ray instance's session folder (its logs are under logs/)."""
    return _private("ray._private.worker", "_global_node").get_session_dir_path()


# 11. The autoscaler's view: ray.autoscaler.v2 is not in Ray's public API (`ray status` reads it).
ClusterStatus = _private("ray.autoscaler.v2.schema", "ClusterStatus")
LaunchRequest = _private("ray.autoscaler.v2.schema", "LaunchRequest")
NodeInfo = _private("ray.autoscaler.v2.schema", "NodeInfo")


def autoscaler_status():
    """The connected cluster's ClusterStatus as autoscaler v2 reports it (pending_launches,
    pending_nodes, failed_launches, ...). Under the classic autoscaler (v1, `ray up` with
    RAY_UP_enable_autoscaler_v2=0) GCS has no autoscaling state, so its lists are empty."""
    get = _private("ray.autoscaler.v2.sdk", "get_cluster_status")
    return get(ray.get_runtime_context().gcs_address)


def fake_multinode_provider(gcs_address: str) -> dict:
    """The autoscaling config's `provider` for Ray's fake multi-node provider (each node a
    raylet on this machine; the head started with RAY_FAKE_CLUSTER=1). Loaded as an
    "external" provider: type "fake_multinode" makes the autoscaler read its defaults from
    fake_multi_node/example.yaml, which Ray's wheel does not ship. Under autoscaler v2 the
    provider is told the GCS address (v2 passes it on only to its read-only provider)."""
    module = "ray.autoscaler._private.fake_multi_node.node_provider"
    _private(module, "FakeMultiNodeProvider")
    return {"type": "external", "module": f"{module}.FakeMultiNodeProvider",
            "gcs_address": gcs_address, "head_node_id": fake_head_node_id(),
            "launch_multiple": True, "use_node_id_as_ip": True,
            "disable_node_updaters": True, "disable_launch_config_check": True}


def fake_head_node_id() -> str:
    """The head node id Ray's fake multi-node provider (RAY_FAKE_CLUSTER) expects."""
    return _private("ray.autoscaler._private.fake_multi_node.node_provider",
                    "FAKE_HEAD_NODE_ID")


# 12. Elastic runs (ScalingConfig(num_workers=(min, max))): after a loss, Train's elastic
# policy waits without limit until MIN workers have room, and its placements are retried
# without limit (train.build_trainer). A controller callback (RunConfig takes Train's internal
# callbacks besides its public ones) bounds the time without a running group: Train calls
# after_controller_state_update on every iteration of its control loop and turns an exception
# raised there into the run's ControllerError (controller_failure: the exception; not one it
# retries), which train.fit_trainer explains.
_ControllerCallback = _private("ray.train.v2._internal.execution.callback",
                               "ControllerCallback")
# A group trains (or finishes training) in these; in the others the run waits for one.
_STATES = "ray.train.v2._internal.execution.controller.state"
_TRAINING = tuple(_private(_STATES, name)
                  for name in ("RunningState", "PreemptingState", "ShuttingDownState"))


class RestartWaitExceeded(RuntimeError):
    """An elastic run went too long without a running worker group (no room for MIN)."""


class BoundedElasticWait(_ControllerCallback):
    """Raise RestartWaitExceeded once the controller has gone `wait_s` without a running
    worker group: starting, waiting for room after a loss, placing a group (a placement that
    times out is retried, see train.build_trainer), resizing."""

    def __init__(self, wait_s: float, clock=None):
        import time

        self.wait_s, self.since, self.clock = wait_s, None, clock or time.monotonic

    def after_controller_state_update(self, previous_state, current_state) -> None:
        if isinstance(current_state, _TRAINING) or current_state.is_terminal():
            self.since = None
            return
        now = self.clock()
        self.since = now if self.since is None else self.since
        if now - self.since > self.wait_s:
            raise RestartWaitExceeded(f"no running worker group for {now - self.since:.0f} s "
                                      f"(at most {self.wait_s:g} s)")


def controller_state(name: str, *args):
    """For tests: Train's controller state `name` (what BoundedElasticWait is given)."""
    return _private(_STATES, name)(*args)
