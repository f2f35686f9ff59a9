"""Several trials per GPU (--gpus-per-worker 0.25), on a local Ray instance started with
logical GPUs (Ray only counts them: nothing here touches a device).

    python -m pytest -q tests/test_gpu_share.py
"""

from __future__ import annotations

import pytest

from cifar_ray import cluster, tune
from cifar_ray.config import SweepConfig, TrainConfig

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def two_gpus():
    """4 CPUs and 2 logical GPUs."""
    import ray

    cluster.start_local_ray(num_cpus=4, num_gpus=2)
    try:
        yield ray
    finally:
        ray.shutdown()


def _sweep(gpus: float, cpus: int = 1) -> SweepConfig:
    return SweepConfig(train=TrainConfig(workers=1, use_gpu=True, gpus_per_worker=gpus,
                                         cpus_per_worker=cpus, weights="none"))


def test_trials_at_once_follow_from_the_gpu_fraction_and_the_cpus(two_gpus):
    assert tune.concurrency(_sweep(1.0)) == 2  # one trial per GPU
    assert tune.concurrency(_sweep(0.5)) == 4
    assert tune.concurrency(_sweep(0.25)) == 4  # 8 would fit the GPUs; 4 CPUs hold 4
    assert tune.concurrency(_sweep(0.1)) == 4
    assert tune.concurrency(_sweep(0.25, cpus=2)) == 2
    assert cluster.fits({"GPU": 1.0, "CPU": 100.0}, {"GPU": 0.1, "CPU": 1.0}) == 10
    # A fraction fits where whole GPUs would not: the start-up check agrees with Ray.
    cluster.wait_for_resources(_sweep(0.25).train)
    with pytest.raises(cluster.ResourceError, match="GPU: need 4, cluster has 2"):
        cluster.wait_for_resources(TrainConfig(workers=4, use_gpu=True, weights="none"))


def test_fractions_are_refused_for_runs_of_several_workers_and_without_gpus():
    with pytest.raises(ValueError, match=r"--gpus-per-worker: 0.25 with --workers 2: .*NCCL "
                                         r"cannot share a device between ranks"):
        TrainConfig(workers=2, use_gpu=True, gpus_per_worker=0.25)
    with pytest.raises(ValueError, match="--gpus-per-worker: only applies with --use-gpu"):
        TrainConfig(workers=1, gpus_per_worker=0.5)
    with pytest.raises(ValueError, match=r"--gpus-per-worker.*must be in \(0, 1\]"):
        TrainConfig(workers=1, use_gpu=True, gpus_per_worker=2)
