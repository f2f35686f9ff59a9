"""Where one process trains: its device and place among the ranks, its data on that device,
and how an image batch becomes model input. Plain PyTorch, no Ray.

    python -m pytest -q tests/test_recipe.py      # a Runtime() is one CPU process

train.py builds these for a Ray Train worker; evaluate, predict, devicecheck, the
benchmarks and the tests build the same ones without Ray.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from cifar_ray import engine
from cifar_ray.data import Split


def _identity(module: nn.Module) -> nn.Module:
    return module


def _all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Across the process group when there is one of several ranks; else t as it is."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t


@dataclass
class Runtime:
    """Where and how this process trains. The defaults describe a single CPU process."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    world: int = 1
    wrap: Callable[[nn.Module], nn.Module] = _identity      # DDP when world > 1
    all_reduce: Callable[..., torch.Tensor] = _all_reduce   # (tensor, op) across ranks
    amp_dtype: torch.dtype | None = None                    # bf16 on CUDA
    channels_last: bool = False                             # on CUDA
    # Asked every few steps, by every rank at the same step (a collective): is a node of
    # this run about to be preempted? True once per notice. None: nobody gives notice.
    preempted: Callable[[], bool] | None = None

    @classmethod
    def for_device(cls, device: torch.device, rank: int = 0, world: int = 1) -> Runtime:
        """Production settings: bf16 autocast and channels_last on CUDA, DDP over several
        ranks (with the device's index on CUDA)."""
        cuda = device.type == "cuda"
        if cuda:  # every step of a phase has one input shape: let cuDNN pick its fastest kernels
            torch.backends.cudnn.benchmark = True

        def wrap(module: nn.Module) -> nn.Module:
            if world == 1:
                return module
            return nn.parallel.DistributedDataParallel(
                module, device_ids=[device.index] if cuda else None)

        return cls(device=device, rank=rank, world=world, wrap=wrap,
                   amp_dtype=torch.bfloat16 if cuda else None, channels_last=cuda)

    def reduce(self, values: list[float], op: str = "sum") -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        return self.all_reduce(t, op).tolist()


@dataclass
class DeviceSplits:
    """This rank's images (uint8 [N, 3, 32, 32]) and labels, on the training device."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor

    @classmethod
    def of(cls, train: Split, val: Split, device: torch.device | str = "cpu") -> DeviceSplits:
        """Two splits as stored (uint8 [N, 32, 32, 3] + labels) moved to `device`; on CUDA
        through pinned memory, so the copies run asynchronously."""
        device = torch.device(device)

        def put(x: torch.Tensor) -> torch.Tensor:
            if device.type == "cuda":
                return x.pin_memory().to(device, non_blocking=True)
            return x.to(device)

        return cls(put(engine.to_tensor(train.images)), put(torch.from_numpy(train.labels)),
                   put(engine.to_tensor(val.images)), put(torch.from_numpy(val.labels)))


def image_transform(image_size: int, rt: Runtime, augment: bool = False,
                    gen: torch.Generator | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 image batch -> model input (normalised, resized to `image_size`, channels_last
    where the runtime wants it), with random crops and flips drawn from `gen` when asked."""
    def transform(x: torch.Tensor) -> torch.Tensor:
        if augment:
            x = engine.augment(x, gen)
        return engine.preprocess(x, image_size, rt.channels_last)
    return transform
