"""Validated configuration: one dataclass per job, CLI flags generated from the fields.

    python -m cifar_ray.cli train --help      # every field below, as a flag

Each field carries its help text in `metadata["help"]`; `add_arguments` turns the fields of
a dataclass (nested ones get a prefix: `phase2.lr` -> `--phase2-lr`) into argparse flags and
`from_args` builds the validated config back. `__post_init__` raises `ValueError` naming the
flag and the accepted values, so bad input fails before Ray starts. Configs cross the Ray
boundary as plain dicts (`to_dict` / `from_dict`) and are never mutated after creation:
derived values are methods.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from cifar_ray.storage import join

OPTIMIZERS = ("adamw", "adam", "sgd")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
UPLOAD_MODES = ("async", "sync")
SOURCES = ("torchvision", "archive", "folder", "synthetic")
# Run and dataset names become path components in object storage: keep them portable.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _f(default: Any, help: str, **kw) -> Any:
    """A dataclass field with its help text (shown by --help and used as documentation)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def _flag(name: str, prefix: str = "") -> str:
    return "--" + (prefix + name).replace("_", "-")


def _nested_prefix(f: dataclasses.Field, prefix: str) -> str:
    """Flags of a nested config: `--phase2-lr` for field phase2, or unprefixed when the field
    is marked flatten (a sweep exposes the training job's own flags as they are)."""
    return prefix if f.metadata.get("flatten") else f"{prefix}{f.name}_"


def _check(cond: bool, flag: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{flag}: {msg}")


def _check_name(value: str, flag: str) -> None:
    _check(bool(NAME_RE.match(value)), flag,
           f"{value!r} is not a valid name; use 1-128 characters from A-Z a-z 0-9 . _ - "
           "starting with a letter or digit")


class _Refused(argparse.Action):
    """A flag of a nested config that this command sets itself: given, it is an error that
    says what to use instead (its help), never silently ignored."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.exit(2, f"{parser.prog}: error: {option_string}: {self.help}\n")


class _Config:
    """Shared dict/CLI conversion for the config dataclasses."""

    # Flag destinations (e.g. "phase2_lr") this job sets itself -> what to use instead.
    REFUSED: ClassVar[dict[str, str]] = {}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in d:
                continue
            sub = hints[f.name]
            if dataclasses.is_dataclass(sub):
                kwargs[f.name] = sub.from_dict(d[f.name])
            else:
                kwargs[f.name] = d[f.name]
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
        return cls(**kwargs)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, prefix: str = "",
                      defaults: Any = None, refused: dict[str, str] | None = None) -> None:
        """Add one flag per field (recursing into nested configs with a prefix)."""
        hints = typing.get_type_hints(cls)
        defaults = defaults if defaults is not None else cls()
        refused = cls.REFUSED if refused is None else refused
        for f in dataclasses.fields(cls):
            typ = hints[f.name]
            default = getattr(defaults, f.name)
            if dataclasses.is_dataclass(typ):
                typ.add_arguments(parser, prefix=_nested_prefix(f, prefix), defaults=default,
                                  refused=refused)
                continue
            if f.metadata.get("flag") is False:  # set through another field's flag
                continue
            flag = _flag(f.name, prefix)
            parse = f.metadata.get("parse")  # a flag that sets several fields (str -> dict)
            if parse:
                default = f.metadata["show"](defaults)
            help_ = f.metadata.get("help", "") + f" (default: {default})"
            dest = prefix + f.name
            if dest in refused:  # parsed to the default unless given, which is an error
                parser.add_argument(flag, dest=dest, action=_Refused, default=default,
                                    help=f"not accepted here: {refused[dest]}")
                continue
            if typ is bool:
                parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction,
                                    default=default, help=help_)
                continue
            if parse:  # argparse parses a str default too, so a default gives fields as well
                parser.add_argument(flag, dest=dest, type=parse, default=default, help=help_)
                continue
            args = typing.get_args(typ)
            is_optional = isinstance(typ, types.UnionType) and type(None) in args
            base = next(a for a in args if a is not type(None)) if is_optional else typ
            if typing.get_origin(base) is list:
                (elem,) = typing.get_args(base)
                parser.add_argument(flag, dest=dest, type=elem, nargs="+", default=default,
                                    help=help_)
            else:
                parser.add_argument(flag, dest=dest, type=base, default=default, help=help_,
                                    choices=f.metadata.get("choices"))

    @classmethod
    def from_args(cls, ns: argparse.Namespace, prefix: str = ""):
        """Build (and so validate) a config from parsed flags."""
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for f in dataclasses.fields(cls):
            typ = hints[f.name]
            if dataclasses.is_dataclass(typ):
                kwargs[f.name] = typ.from_args(ns, prefix=_nested_prefix(f, prefix))
            elif f.metadata.get("parse"):
                kwargs.update(getattr(ns, prefix + f.name))
            elif f.metadata.get("flag") is not False:
                kwargs[f.name] = getattr(ns, prefix + f.name)
        return cls(**kwargs)


def parse_workers(text: str) -> dict[str, int | None]:
    """--workers N (a fixed size) or MIN-MAX (elastic): the fields it sets."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", str(text))
    if not m:
        raise argparse.ArgumentTypeError(
            f"{text!r}: use a number of workers (4) or a range MIN-MAX (2-4) for an elastic run")
    low, high = int(m[1]), int(m[2] or m[1])
    if low > high:
        raise argparse.ArgumentTypeError(f"{text!r}: MIN is larger than MAX; write it MIN-MAX")
    return {"workers": high, "min_workers": low if low < high else None}


def show_workers(cfg: TrainConfig) -> str:
    return f"{cfg.min_workers}-{cfg.workers}" if cfg.elastic() else str(cfg.workers)


@dataclass(frozen=True)
class PrepareConfig(_Config):
    """Turn a CIFAR-10 source into Parquet shards under <data>/<dataset>/{train,val,test}/."""

    source: str = _f("torchvision", "where images come from: torchvision (download), archive "
                     "(cifar-10-python.tar.gz), folder ([<split>/]<class>/<file> dir or tar), "
                     "synthetic (generated, for smoke runs)", choices=SOURCES)
    source_uri: str | None = _f(None, "path or URI of the archive or image folder (sources "
                                "archive and folder); the download cache dir for torchvision")
    data: str = _f("./data", "root path or s3:// URI where datasets are written")
    dataset: str = _f("cifar10", "dataset name: the folder under --data")
    val_size: int = _f(5000, "images carved from train into a stratified validation split "
                       "when the source has none")
    shard_size: int = _f(10000, "images per Parquet shard (30 MB of pixels per 10,000)")
    seed: int = _f(0, "seed for the validation split and the shard order")
    max_per_class: int | None = _f(None, "folder source: keep the first N images of each class "
                                   "per split (quick real-data runs and benchmarks)")
    synthetic_size: int = _f(2000, "train+val images of the synthetic source (test gets "
                             "a fifth of that more)")
    classes: list[str] | None = _f(None, "keep only these classes of the source, labelled "
                                   "0, 1, ... in the order given (e.g. a transfer task's)")
    test_size: int = _f(0, "images carved from train into a stratified test split when the "
                        "source has none (0: no test split)")

    def __post_init__(self):
        _check(self.source in SOURCES, "--source", f"{self.source!r}; choose one of {SOURCES}")
        if self.source in ("archive", "folder"):
            _check(bool(self.source_uri), "--source-uri",
                   f"required with --source {self.source} (a path or s3:// URI)")
        _check_name(self.dataset, "--dataset")
        _check(self.val_size >= 0, "--val-size", f"{self.val_size}; must be >= 0")
        _check(self.shard_size > 0, "--shard-size", f"{self.shard_size}; must be > 0")
        _check(self.max_per_class is None or self.max_per_class > 0, "--max-per-class",
               f"{self.max_per_class}; must be > 0")
        _check(self.synthetic_size >= 20, "--synthetic-size",
               f"{self.synthetic_size}; must be >= 20")
        _check(self.classes is None or len(set(self.classes)) == len(self.classes) >= 2,
               "--classes", f"{self.classes}; give two or more distinct class names")
        _check(self.test_size >= 0, "--test-size", f"{self.test_size}; must be >= 0")


@dataclass(frozen=True)
class PhaseConfig(_Config):
    """Hyperparameters of one training phase."""

    epochs: int = _f(10, "epochs in this phase (0 skips it)")
    lr: float = _f(1e-3, "peak learning rate (per global batch)")
    optimizer: str = _f("adamw", "optimizer", choices=OPTIMIZERS)
    weight_decay: float = _f(0.0, "decoupled weight decay (adamw) or L2 (adam, sgd)")
    momentum: float = _f(0.9, "SGD momentum (sgd only)")
    label_smoothing: float = _f(0.0, "cross-entropy label smoothing in [0, 1)")
    batch_size: int = _f(256, "global batch size, split evenly across workers")
    warmup_epochs: float = _f(0.0, "linear warmup before cosine decay, in epochs")
    augment: bool = _f(False, "random crop (4 px padding) + horizontal flip on the device")

    def validate(self, p: str) -> None:
        """Raise ValueError naming the flag (`p` is the flag prefix, e.g. 'phase2-')."""
        _check(self.epochs >= 0, f"--{p}epochs", f"{self.epochs}; must be >= 0")
        _check(self.lr > 0, f"--{p}lr", f"{self.lr}; must be > 0")
        _check(self.optimizer in OPTIMIZERS, f"--{p}optimizer",
               f"{self.optimizer!r}; choose one of {OPTIMIZERS}")
        _check(self.weight_decay >= 0, f"--{p}weight-decay", f"{self.weight_decay}; must be >= 0")
        _check(0 <= self.momentum < 1, f"--{p}momentum", f"{self.momentum}; must be in [0, 1)")
        _check(0 <= self.label_smoothing < 1, f"--{p}label-smoothing",
               f"{self.label_smoothing}; must be in [0, 1)")
        _check(self.batch_size > 0, f"--{p}batch-size", f"{self.batch_size}; must be > 0")
        _check(0 <= self.warmup_epochs <= max(self.epochs, 0), f"--{p}warmup-epochs",
               f"{self.warmup_epochs}; must be in [0, {self.epochs}] (the phase's epochs)")


# Phase 1 trains a freshly initialised head on a frozen backbone: a high LR is safe.
# Phase 2 moves pretrained weights: a low LR with warmup keeps them from being wrecked.
PHASE1 = PhaseConfig(epochs=10, lr=1e-3, optimizer="adamw", weight_decay=1e-4, augment=False)
PHASE2 = PhaseConfig(epochs=10, lr=1e-4, optimizer="adamw", weight_decay=0.05,
                     label_smoothing=0.1, warmup_epochs=1.0, augment=True)


@dataclass(frozen=True)
class TrainConfig(_Config):
    """The two-phase training job: data in, checkpoints/metrics/weights out."""

    data: str = _f("./data", "root path or s3:// URI holding prepared datasets")
    dataset: str = _f("cifar10", "dataset name under --data (made by prepare-data)")
    storage: str = _f("./results", "root path or s3:// URI for runs: <storage>/<name>/")
    name: str = _f("r50", "run name; re-running a name resumes it from its latest checkpoint")
    workers: int = _f(2, "data-parallel Ray Train workers: N, or MIN-MAX for an elastic run "
                      "that starts once MIN fit, goes on with the survivors when a node is "
                      "lost and grows back toward MAX as nodes join (docs/cluster.md)",
                      parse=parse_workers, show=show_workers)
    min_workers: int | None = _f(None, "an elastic run's fewest workers (--workers MIN-MAX); "
                                 "None: a fixed size", flag=False)
    resize_check_s: float = _f(60.0, "elastic runs: seconds between checks for room to grow "
                               "(growing restarts the workers from the newest checkpoint)")
    use_gpu: bool = _f(False, "one GPU per worker (nccl, bf16 autocast, channels_last)")
    cpus_per_worker: int = _f(1, "CPUs reserved per worker (also its torch threads on CPU)")
    gpus_per_worker: float = _f(1.0, "GPUs reserved per worker with --use-gpu; a fraction "
                                "(0.25) packs several one-worker sweep trials on one GPU")
    weights: str = _f("imagenet", "backbone weights: imagenet (torchvision IMAGENET1K_V2), "
                      "none, or a path/URI of a ResNet50 state_dict")
    weights_sha256: str | None = _f(None, "expected sha256 of the --weights file")
    image_size: int = _f(32, "input side in pixels; >32 upsamples on the device")
    phase1: PhaseConfig = _f(PHASE1, "phase 1: frozen backbone, head only")
    phase2: PhaseConfig = _f(PHASE2, "phase 2: everything trainable, low LR")
    cache_features: bool = _f(True, "phase 1: compute frozen-backbone features once and train "
                              "the head on them (needs --no-phase1-augment)")
    compile: bool = _f(False, "torch.compile the module each phase trains (compiled again at "
                       "the phase boundary; CUDA graphs on GPUs); needs a C++ compiler on "
                       "CPU, triton on GPU")
    init_checkpoint: str | None = _f(None, "start from this checkpoint (path/URI) when the run "
                                     "has none of its own; sweeps pass their shared phase 1")
    keep_checkpoints: int = _f(2, "checkpoints kept (best by val accuracy)")
    checkpoint_upload: str = _f("async", "async: the next epoch trains while the last "
                                "checkpoint uploads (one upload at a time); sync: training "
                                "waits for each upload", choices=UPLOAD_MODES)
    max_failures: int = _f(3, "worker-group restarts from the latest checkpoint before "
                           "failing (a lost node, storage down past --storage-retry-s); Ray "
                           "counts notified spot preemptions apart, without limit")
    storage_retry_s: float = _f(120.0, "seconds each storage read or write keeps retrying "
                                "dropped connections before the attempt fails")
    resource_timeout_s: float = _f(900.0, "seconds to wait for an autoscaler to bring the "
                                   "requested workers (a cold GPU node takes minutes: "
                                   "docs/cluster.md) before failing; a cluster nothing can "
                                   "grow fails at once")
    mlflow_tracking_uri: str | None = _f(None, "also track the run in MLflow there (pip "
                                         "install -e '.[mlflow]'); credentials from MLflow's "
                                         "own environment variables")
    mlflow_experiment: str = _f("cifar_ray", "MLflow experiment of the run (a sweep uses its "
                                "--name)")
    progress_s: float | None = _f(None, "seconds between progress lines inside an epoch "
                                  "(step, images/s, epoch ETA); default 30 when stdout is a "
                                  "terminal, else none (0)")
    log_level: str = _f("INFO", "level of cifar_ray's own log lines, on the driver and on "
                        "rank 0 of every run (the other ranks only warn)", choices=LOG_LEVELS)
    ray_log_level: str = _f("WARNING", "level of Ray Train's own console logs (INFO shows "
                            "every report and checkpoint)", choices=LOG_LEVELS)
    overwrite: bool = _f(False, "replace a finished run of the same name instead of refusing")
    seed: int = _f(0, "seed for initialisation, shuffling and augmentation")
    smoke: bool = _f(False, "synthetic data, --weights none, 1+1 epochs, 2 CPU workers")

    def __post_init__(self):
        _check_name(self.dataset, "--dataset")
        _check_name(self.name, "--name")
        _check(self.workers >= 1, "--workers", f"{self.workers}; must be >= 1")
        _check(self.min_workers is None or 1 <= self.min_workers <= self.workers, "--workers",
               f"{show_workers(self)}: MIN must be in [1, MAX]")
        _check(self.resize_check_s > 0, "--resize-check-s",
               f"{self.resize_check_s}; must be > 0")
        _check(self.cpus_per_worker >= 1, "--cpus-per-worker",
               f"{self.cpus_per_worker}; must be >= 1")
        _check(0 < self.gpus_per_worker <= 1, "--gpus-per-worker",
               f"{self.gpus_per_worker}; must be in (0, 1]: a worker trains on one GPU")
        _check(self.gpus_per_worker == 1 or self.use_gpu, "--gpus-per-worker",
               "only applies with --use-gpu")
        _check(self.gpus_per_worker == 1 or self.workers == 1, "--gpus-per-worker",
               f"{self.gpus_per_worker:g} with --workers {self.workers}: the ranks of one run "
               "could land on the same GPU, and NCCL cannot share a device between ranks; use "
               "--workers 1 (then several trials of a sweep share a GPU) or "
               "--gpus-per-worker 1")
        _check(self.weights == "imagenet" or self.weights == "none" or bool(self.weights),
               "--weights", "use imagenet, none, or a path/URI")
        if self.weights_sha256 is not None:
            _check(bool(re.fullmatch(r"[0-9a-fA-F]{64}", self.weights_sha256)),
                   "--weights-sha256", "must be 64 hex digits")
            _check(self.weights not in ("imagenet", "none"), "--weights-sha256",
                   "only applies when --weights is a path or URI")
        _check(self.image_size >= 32 and self.image_size % 32 == 0, "--image-size",
               f"{self.image_size}; must be a multiple of 32 (32, 64, 128, 224...)")
        for i, phase in ((1, self.phase1), (2, self.phase2)):
            phase.validate(f"phase{i}-")
            # An elastic run takes batch // workers per worker at each size it runs at: a
            # size that does not divide the batch trains a global batch up to size-1 images
            # smaller (recipe.PhaseLoop.start_phase logs it). A fixed size must divide it.
            _check(phase.batch_size % self.workers == 0 or self.elastic(),
                   f"--phase{i}-batch-size",
                   f"{phase.batch_size} is not divisible by --workers {self.workers}; "
                   f"use a multiple of {self.workers}")
            _check(phase.batch_size >= self.workers, f"--phase{i}-batch-size",
                   f"{phase.batch_size}: fewer images than --workers {show_workers(self)} "
                   "(at least one per worker)")
        _check(self.phase1.epochs + self.phase2.epochs > 0, "--phase1-epochs/--phase2-epochs",
               "at least one phase needs epochs > 0")
        _check(self.keep_checkpoints >= 1, "--keep-checkpoints",
               f"{self.keep_checkpoints}; must be >= 1")
        _check(self.checkpoint_upload in UPLOAD_MODES, "--checkpoint-upload",
               f"{self.checkpoint_upload!r}; choose one of {UPLOAD_MODES}")
        _check(self.max_failures >= -1, "--max-failures",
               f"{self.max_failures}; must be >= 0 (or -1 for unlimited)")
        for flag, level in (("--log-level", self.log_level),
                            ("--ray-log-level", self.ray_log_level)):
            _check(level in LOG_LEVELS, flag, f"{level!r}; choose one of {LOG_LEVELS}")
        _check(self.progress_s is None or self.progress_s >= 0, "--progress-s",
               f"{self.progress_s}; must be >= 0 (0: no progress lines)")
        _check(self.resource_timeout_s >= 0, "--resource-timeout-s",
               f"{self.resource_timeout_s}; must be >= 0")

    def phase(self, i: int) -> PhaseConfig:
        return self.phase1 if i == 1 else self.phase2

    def elastic(self) -> bool:
        return self.min_workers is not None and self.min_workers < self.workers

    def fewest_workers(self) -> int:
        """The size a run can start (and go on) at: MIN of an elastic run, else --workers."""
        return self.min_workers if self.elastic() else self.workers

    def caches_features(self) -> bool:
        """Phase-1 features are a pure function of the image only without augmentation."""
        return self.cache_features and not self.phase1.augment

    def with_smoke(self) -> TrainConfig:
        """The --smoke settings: small, CPU-only, no downloads: the whole path in minutes."""
        if not self.smoke:
            return self
        small = dict(epochs=1, batch_size=64)
        return dataclasses.replace(
            self, dataset="synthetic", weights="none", weights_sha256=None,
            workers=2, min_workers=None, use_gpu=False, cpus_per_worker=1,
            name=self.name if self.name != TrainConfig.name else "smoke",
            phase1=dataclasses.replace(self.phase1, **small),
            phase2=dataclasses.replace(self.phase2, warmup_epochs=0.0, **small))

    def run_uri(self) -> str:
        return join(self.storage, self.name)

    def dataset_uri(self) -> str:
        return join(self.data, self.dataset)


SCHEDULERS = ("asha", "fifo")
DEFAULT_LRS = (3e-5, 1e-4, 3e-4, 1e-3)  # half-decades around the phase-2 default 1e-4


@dataclass(frozen=True)
class SweepConfig(_Config):
    """A Ray Tune sweep of the phase-2 learning rate: phase 1 once, one TorchTrainer per trial.

    The training flags (--data, --storage, --name, --workers, --phase2-epochs, ...) are the
    train job's own; --name names the experiment and --workers counts workers per trial."""

    REFUSED: ClassVar[dict[str, str]] = {
        "phase2_lr": "a sweep sets each trial's phase-2 LR; give the LRs to try with --lrs "
                     "(or --lr-range)"}

    train: TrainConfig = _f(TrainConfig(name="lr-sweep"), "the training job every trial runs",
                            flatten=True)
    lrs: list[float] | None = _f(None, "explicit grid of phase-2 learning rates (default "
                                "without --lr-range: 3e-5 1e-4 3e-4 1e-3)")
    lr_range: list[float] | None = _f(None, "LOW HIGH: sample --samples phase-2 LRs "
                                      "log-uniformly instead of a grid")
    samples: int = _f(4, "how many LRs to sample from --lr-range")
    weight_decays: list[float] | None = _f(None, "also sweep phase-2 weight decay (a grid "
                                           "crossed with the LRs)")
    scheduler: str = _f("asha", "asha (early stopping on val accuracy) or fifo (full grid)",
                        choices=SCHEDULERS)
    grace_period: int = _f(1, "ASHA: phase-2 epochs every trial runs before it may be stopped")
    reduction_factor: int = _f(2, "ASHA: keep 1/reduction_factor of trials at each rung")
    max_concurrent_trials: int | None = _f(None, "trials at once (default: as many as the "
                                           "cluster's CPUs/GPUs fit)")
    share_phase1: bool = _f(True, "run phase 1 once and start every trial's phase 2 from it; "
                            "--no-share-phase1 runs both phases in every trial (a baseline)")
    resume: bool = _f(False, "continue the experiment --name after the driver died")

    def __post_init__(self):
        if self.lrs is not None:
            _check(len(self.lrs) > 0, "--lrs", "give at least one learning rate")
            _check(all(lr > 0 for lr in self.lrs), "--lrs", f"{self.lrs}; every LR must be > 0")
            _check(self.lr_range is None, "--lr-range", "use either --lrs or --lr-range")
        if self.lr_range is not None:
            _check(len(self.lr_range) == 2, "--lr-range", "takes two values: LOW HIGH")
            low, high = self.lr_range
            _check(0 < low < high, "--lr-range", f"{low} {high}; need 0 < LOW < HIGH")
            _check(self.samples >= 1, "--samples", f"{self.samples}; must be >= 1")
        if self.weight_decays is not None:
            _check(len(self.weight_decays) > 0 and all(w >= 0 for w in self.weight_decays),
                   "--weight-decays", f"{self.weight_decays}; non-empty, each >= 0")
        _check(self.scheduler in SCHEDULERS, "--scheduler",
               f"{self.scheduler!r}; choose one of {SCHEDULERS}")
        _check(not self.train.elastic(), "--workers",
               f"{show_workers(self.train)}: a sweep's trials run side by side on the same "
               "nodes, so elastic trials would each grow into the room the others wait for "
               "(and every growth restarts a trial from its checkpoint); give trials a fixed "
               "size (--workers N)")
        _check(self.train.phase2.epochs >= 1, "--phase2-epochs",
               "a sweep of the phase-2 LR needs phase-2 epochs >= 1")
        _check(1 <= self.grace_period <= self.train.phase2.epochs, "--grace-period",
               f"{self.grace_period}; must be in [1, {self.train.phase2.epochs}] "
               "(the phase-2 epochs)")
        _check(self.reduction_factor >= 2, "--reduction-factor",
               f"{self.reduction_factor}; must be >= 2")
        _check(self.max_concurrent_trials is None or self.max_concurrent_trials >= 1,
               "--max-concurrent-trials", f"{self.max_concurrent_trials}; must be >= 1")

    def with_smoke(self) -> SweepConfig:
        """--smoke: 3 LRs on synthetic data, CPU, 1 + 2 epochs, one worker per trial."""
        if not self.train.smoke:
            return self
        t = self.train.with_smoke()
        t = dataclasses.replace(
            t, workers=1, name=self.train.name if self.train.name != "lr-sweep" else "smoke-sweep",
            phase2=dataclasses.replace(t.phase2, epochs=2))
        return dataclasses.replace(self, train=t, lrs=self.lrs or [3e-5, 3e-4, 3e-3],
                                   lr_range=None, grace_period=1)
