"""Config validation and the generated CLI: bad input fails naming the flag, before Ray."""

import subprocess
import sys
from pathlib import Path

import pytest

from cifar_ray.cli import parser
from cifar_ray.config import PhaseConfig, PrepareConfig, SweepConfig, TrainConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kwargs, flag", [
    ({"workers": 0}, "--workers"),
    ({"phase2": PhaseConfig(lr=0.0)}, "--phase2-lr"),
    ({"phase1": PhaseConfig(lr=-1e-3)}, "--phase1-lr"),
    ({"phase1": PhaseConfig(epochs=-1)}, "--phase1-epochs"),
    ({"phase2": PhaseConfig(batch_size=0)}, "--phase2-batch-size"),
    ({"phase2": PhaseConfig(optimizer="lion")}, "--phase2-optimizer"),
    ({"phase2": PhaseConfig(label_smoothing=1.0)}, "--phase2-label-smoothing"),
    ({"phase2": PhaseConfig(epochs=2, warmup_epochs=3)}, "--phase2-warmup-epochs"),
    ({"workers": 3}, "--phase1-batch-size"),
    ({"name": "../escape"}, "--name"),
    ({"image_size": 48}, "--image-size"),
    ({"weights_sha256": "abc", "weights": "w.pt"}, "--weights-sha256"),
    ({"weights_sha256": "a" * 64}, "--weights-sha256"),
])
def test_train_config_errors_name_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=f"^{flag}"):
        TrainConfig(**kwargs)


def test_prepare_config_errors_name_the_flag():
    with pytest.raises(ValueError, match="--source:.*torchvision"):
        PrepareConfig(source="kaggle")
    with pytest.raises(ValueError, match="--source-uri"):
        PrepareConfig(source="archive")


def test_cli_flags_round_trip_to_config():
    ns = parser().parse_args(["train", "--workers", "4", "--phase2-lr", "3e-4", "--use-gpu",
                              "--no-phase2-augment", "--phase1-batch-size", "512"])
    cfg = TrainConfig.from_args(ns)
    assert (cfg.workers, cfg.use_gpu, cfg.phase2.lr, cfg.phase2.augment,
            cfg.phase1.batch_size) == (4, True, 3e-4, False, 512)
    # Untouched flags keep the dataclass defaults, nested ones included.
    assert cfg.phase2.weight_decay == TrainConfig().phase2.weight_decay
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_workers_min_max_is_an_elastic_run_and_bad_ranges_name_the_flag():
    cfg = TrainConfig.from_args(parser().parse_args(["train", "--workers", "2-4"]))
    assert (cfg.min_workers, cfg.workers, cfg.elastic(), cfg.fewest_workers()) == (2, 4, True, 2)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    fixed = TrainConfig.from_args(parser().parse_args(["train", "--workers", "3-3",
                                                       "--phase1-batch-size", "96",
                                                       "--phase2-batch-size", "96"]))
    assert (fixed.workers, fixed.elastic(), fixed.fewest_workers()) == (3, False, 3)
    # A size of the range that does not divide the batch is allowed (each worker takes
    # batch // size); a fixed size must divide it, as before.
    assert TrainConfig(workers=3, min_workers=2).elastic()
    for bad in ("4-2", "two", "2-", "-3"):
        with pytest.raises(SystemExit):
            parser().parse_args(["train", "--workers", bad])
    with pytest.raises(ValueError, match="^--workers: 0-2: MIN"):
        TrainConfig(workers=2, min_workers=0)
    with pytest.raises(ValueError, match="^--phase1-batch-size: 2: fewer images than "
                                         "--workers 1-4"):
        TrainConfig(workers=4, min_workers=1, phase1=PhaseConfig(batch_size=2))
    # A sweep's trials run at a fixed size, and it says why.
    with pytest.raises(ValueError, match="^--workers: 1-2: a sweep's trials run side by side"):
        SweepConfig(train=TrainConfig(workers=2, min_workers=1))
    # --smoke's fixed two workers win over a range.
    assert not TrainConfig(smoke=True, workers=4, min_workers=2).with_smoke().elastic()


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown TrainConfig keys"):
        TrainConfig.from_dict({"workerz": 2})


def test_smoke_settings():
    cfg = TrainConfig(smoke=True, workers=4).with_smoke()
    assert (cfg.workers, cfg.use_gpu, cfg.weights, cfg.dataset, cfg.name) == (
        2, False, "none", "synthetic", "smoke")
    assert cfg.phase1.epochs == cfg.phase2.epochs == 1


def test_the_smoke_sweep_tries_three_lrs_on_synthetic_data_it_prepares_before_ray(tmp_path):
    """`jobs/tune.py --smoke` (README's quick start): its settings, and the synthetic dataset
    it prepares under --data before Ray starts. (A sweep through the jobs API, with these
    settings spelled out: test_jobs_api.py.)"""
    from cifar_ray import train
    from cifar_ray.config import SweepConfig

    ns = parser().parse_args(["tune", "--smoke", "--data", str(tmp_path / "datasets"),
                              "--storage", str(tmp_path / "sweeps")])
    sweep = SweepConfig.from_args(ns).with_smoke()
    t = sweep.train
    assert sweep.lrs == [3e-5, 3e-4, 3e-3] and sweep.grace_period == 1
    assert (t.workers, t.use_gpu, t.weights, t.dataset, t.name) == (
        1, False, "none", "synthetic", "smoke-sweep")
    assert (t.phase1.epochs, t.phase2.epochs, t.phase1.batch_size, t.phase2.batch_size) == (
        1, 2, 64, 64)
    resolved, manifest = train.preflight(t)
    assert {k: v["count"] for k, v in manifest["splits"].items()} == {
        "train": 1600, "val": 400, "test": 400}
    assert resolved.dataset_uri() == str(tmp_path / "datasets" / "synthetic")


def test_bad_flag_exits_2_with_one_line_before_ray(tmp_path):
    """The job script rejects bad input itself, fast, without starting Ray."""
    out = subprocess.run([sys.executable, str(REPO / "jobs" / "train.py"), "--phase2-lr", "0",
                          "--storage", str(tmp_path)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2
    assert "--phase2-lr: 0.0; must be > 0" in out.stderr
    assert "Traceback" not in out.stderr
    assert not list(tmp_path.iterdir())


def test_tune_refuses_the_flag_the_sweep_sets(capsys):
    from cifar_ray.cli import main

    with pytest.raises(SystemExit) as e:
        main(["tune", "--phase2-lr", "1e-3"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--phase2-lr" in err and "--lrs" in err and "usage" not in err
    # The sweep still gets the recipe's phase-2 defaults when the flag is not given.
    ns = parser().parse_args(["tune", "--lrs", "1e-4", "3e-4"])
    from cifar_ray.config import SweepConfig

    assert SweepConfig.from_args(ns).train.phase2.lr == TrainConfig().phase2.lr


def test_log_level_flag_quiets_our_lines(tmp_path, capsys):
    from cifar_ray.cli import main

    args = ["prepare-data", "--source", "synthetic", "--synthetic-size", "40", "--val-size",
            "10", "--data", str(tmp_path)]
    assert main(args + ["--log-level", "WARNING"]) == 0
    assert capsys.readouterr().err == ""
    assert main(args) == 0  # INFO: says what it did (here: nothing, already prepared)
    assert "already prepared" in capsys.readouterr().err


def test_compile_without_a_compiler_fails_before_ray(tmp_path):
    # PATH holds no compiler at all (the interpreter is called by its full path).
    out = subprocess.run([sys.executable, str(REPO / "jobs" / "train.py"), "--compile",
                          "--storage", str(tmp_path / "runs")], capture_output=True, text=True,
                         timeout=120, env={"PATH": str(tmp_path), "HOME": str(tmp_path)})
    assert out.returncode == 2, out.stderr
    assert "--compile: torch.compile on CPU needs a C++ compiler" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "runs").exists()
