"""cluster.yaml: valid for Ray's own autoscaler validator, and safe (no secret, no open port).

    python -m pytest -q tests/test_cluster.py
"""

from __future__ import annotations

import copy
import importlib.metadata
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from cifar_ray import cluster, ray_internals
from cifar_ray.ray_internals import prepare_autoscaler_config, validate_autoscaler_config

REPO = Path(__file__).resolve().parents[1]
TEXT = (REPO / "cluster.yaml").read_text()


def _prepared(raw: dict) -> dict:
    """What `ray up` does before it launches anything (as Ray's own tests validate)."""
    cfg = prepare_autoscaler_config(copy.deepcopy(raw))
    validate_autoscaler_config(cfg)
    return cfg


@pytest.fixture
def raw() -> dict:
    return yaml.safe_load(TEXT)


def test_cluster_yaml_passes_rays_validator_with_the_intended_shape(raw):
    cfg = _prepared(raw)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    workers = {n: t for n, t in types.items() if n != cfg["head_node_type"]}
    gpus = sorted(t["resources"]["GPU"] for t in workers.values())
    assert gpus[0] == 1 and gpus[-1] > 1, "one small and one multi-GPU worker type"
    assert all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in workers.values())
    assert any(t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
               for t in workers.values())
    assert cfg["idle_timeout_minutes"] > 0 and cfg["max_workers"] >= 1
    # Every node reaches S3 through an instance profile.
    assert all("IamInstanceProfile" in t["node_config"] for t in types.values())
    # The image is Ray's 2.60 GPU image, and the nodes get the Ray, torch and torchvision
    # that the tests ran with.
    assert re.fullmatch(r"rayproject/ray:2\.60\.\d+-py\d+-gpu", cfg["docker"]["image"])
    setup = " ".join(cfg["setup_commands"])
    for pkg in ("ray", "torch", "torchvision"):
        assert re.search(rf'"{pkg}(\[[^]]*\])?=={re.escape(importlib.metadata.version(pkg))}"',
                         setup), pkg
    # The autoscaler's largest cluster, as wait_for_resources reads it on a `ray up` head.
    assert cluster.autoscaler_max_resources(cfg) == {"CPU": 128.0, "GPU": 16.0}


def test_cluster_yaml_keeps_the_jobs_api_on_localhost_behind_a_token(raw):
    head_start = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    for cmds in (raw["head_start_ray_commands"], raw["worker_start_ray_commands"]):
        assert "RAY_AUTH_MODE=token" in " ".join(cmds)
    # The token travels from the user's machine, never in the file.
    assert raw["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert ".gitignore" in raw["rsync_filter"]  # no results, data or venvs synced


def test_cluster_yaml_holds_no_secret_and_no_all_interfaces_binding():
    assert "0.0.0.0" not in TEXT
    for pattern in (r"AKIA[0-9A-Z]{16}", r"(?i)aws_secret_access_key", r"(?i)aws_access_key_id",
                    r"(?i)aws_session_token", r"RAY_AUTH_TOKEN\s*=", r"-----BEGIN"):
        assert not re.search(pattern, TEXT), pattern


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["available_node_types"]["gpu_1x"]["resources"].update(GPU=0.5),
     "is not of type 'integer'"),
    (lambda c: c.update(max_wrokers=4), "Additional properties are not allowed"),
    (lambda c: c["available_node_types"]["gpu_4x"].pop("node_config"),
     "'node_config' is a required property"),
])
def test_an_invalid_edit_fails_with_rays_message(raw, edit, message):
    edit(raw)
    with pytest.raises(jsonschema.ValidationError, match=re.escape(message)):
        _prepared(raw)


def test_a_head_node_type_that_does_not_exist_is_refused(raw):
    raw["head_node_type"] = "nope"
    with pytest.raises(ValueError, match="head_node_type"):
        _prepared(raw)


def test_a_private_ray_name_that_has_gone_says_what_to_update():
    with pytest.raises(ray_internals.RayInternalsError,
                       match=r"no ray\._private\.ray_constants\.GONE .*ray_internals\.py was "
                             r"written for Ray 2\.60: update it"):
        ray_internals._private("ray._private.ray_constants", "GONE")


def test_aws_keys_in_a_jobs_runtime_env_are_refused_naming_the_safe_ways():
    cluster.check_secrets({"AWS_REGION": "eu-west-1", "AWS_ENDPOINT_URL": "http://minio:9000"})
    with pytest.raises(cluster.UserError, match=r"^AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY "
                       r"came in this job's runtime env.*runtime_env_agent\.log.*instance "
                       r"profile.*credentials file"):
        cluster.check_secrets({"AWS_ACCESS_KEY_ID": "AKIA...", "AWS_SECRET_ACCESS_KEY": "s",
                               "AWS_REGION": "eu-west-1"})


def test_tune_copies_no_aws_credential_into_a_trials_runtime_env():
    from ray.tune.execution import class_cache

    ray_internals.keep_secrets_out_of_trial_envs()
    assert not set(ray_internals.AWS_SECRETS) & class_cache.ENV_VARS_TO_PROPAGATE


def test_an_elastic_run_stops_waiting_once_it_has_gone_the_wait_without_a_running_group():
    """Train's elastic policy waits for room without limit; our controller callback ends the
    run once `wait_s` has passed without a running group (Train's own states fed to it)."""
    now = [0.0]
    wait = ray_internals.BoundedElasticWait(60, clock=lambda: now[0])
    running = ray_internals.controller_state("RunningState")
    restarting = ray_internals.controller_state("RestartingState", None)
    wait.after_controller_state_update(None, running)
    for t in (100.0, 130.0, 160.0):  # lost its node at 100: waiting, within the minute
        now[0] = t
        wait.after_controller_state_update(running, restarting)
    now[0] = 170.0  # trains again: the clock starts over at the next wait
    wait.after_controller_state_update(restarting, running)
    for t in (200.0, 259.0):
        now[0] = t
        wait.after_controller_state_update(running, restarting)
    now[0] = 261.0
    with pytest.raises(ray_internals.RestartWaitExceeded, match="for 61 s"):
        wait.after_controller_state_update(restarting, restarting)


def test_a_restart_waits_for_a_replacement_only_where_something_can_bring_one():
    from cifar_ray import train
    from cifar_ray.config import TrainConfig

    # An autoscaler: a cold node takes minutes. A fixed cluster: a node restarted by hand
    # rejoins in seconds, one that is gone never comes.
    assert train.restart_wait_s(TrainConfig(), can_grow=True) == 900
    assert train.restart_wait_s(TrainConfig(), can_grow=False) == 120
    assert train.restart_wait_s(TrainConfig(resource_timeout_s=5), can_grow=False) == 10


def test_only_live_placement_groups_of_ended_jobs_count_as_orphaned():
    from ray.util.state.common import JobState, PlacementGroupState

    def pg(pg_id: str, job: str, state: str = "CREATED", detached: bool = False):
        return PlacementGroupState(placement_group_id=pg_id, name="", creator_job_id=job,
                                   state=state, is_detached=detached)

    jobs = [JobState(type="DRIVER", job_id="02000000", status="SUCCEEDED", entrypoint="a"),
            JobState(type="SUBMISSION", job_id="03000000", submission_id="raysubmit_x",
                     status="FAILED", entrypoint="b"),
            JobState(type="DRIVER", job_id="04000000", status="RUNNING", entrypoint="c"),
            JobState(type="SUBMISSION", job_id=None, submission_id="raysubmit_y",
                     status="PENDING", entrypoint="d")]
    groups = [pg("a", "02000000"), pg("b", "03000000", "PENDING"), pg("c", "04000000"),
              pg("d", "02000000", "REMOVED"), pg("e", "02000000", detached=True),
              pg("f", "05000000")]  # a job the State API does not list: left alone
    assert [g.placement_group_id for g in cluster.orphaned_placement_groups(groups, jobs)
            ] == ["a", "b"]
