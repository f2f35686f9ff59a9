"""MLflow tracking: a tracking URI where no server answers is refused before Ray starts.

    python -m pytest -q tests/test_mlflow.py

What a run and a sweep log to a real `mlflow server` (sqlite, on 127.0.0.1: conftest's
mlflow_server, fake credentials in every process's environment) is checked on the runs the
other Ray tests make anyway: test_train_ray.py (a run: params, the val-accuracy history
against metrics.jsonl, the result, no credential written) and test_tune_ray.py (a sweep: one
experiment, a run per trial).
"""

from __future__ import annotations

import pytest
from conftest import free_port

from cifar_ray import train
from cifar_ray.config import PhaseConfig, TrainConfig

pytestmark = pytest.mark.ray


def test_an_unreachable_tracking_server_fails_before_ray_starts(s3_data, tmp_path):
    import ray

    uri = f"http://127.0.0.1:{free_port()}"
    cfg = TrainConfig(data=s3_data, dataset="tiny", storage=str(tmp_path), name="x",
                      workers=2, weights="none", resource_timeout_s=5, mlflow_tracking_uri=uri,
                      phase1=PhaseConfig(epochs=1, lr=1e-3, batch_size=64),
                      phase2=PhaseConfig(epochs=2, lr=1e-3, optimizer="sgd", batch_size=64))
    with pytest.raises(ValueError, match=rf"--mlflow-tracking-uri {uri}: no MLflow tracking "
                                         r"server answers there"):
        train.fit(cfg)
    assert not ray.is_initialized()
