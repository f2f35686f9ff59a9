"""Ray Train's torch process-group setup, with the rendezvous store bound to one address.

    TorchTrainer(..., torch_config=rendezvous.BoundTorchConfig())    # see train.build_trainer

Ray Train's own setup lets torch create the rank-0 TCPStore, which listens on all interfaces
(torch takes no bind address for it). Here rank 0 binds the listening socket itself, to the
address Ray picked for it (the node IP: 127.0.0.1 on a private one-machine instance), and
hands it to the TCPStore; every rank then joins the process group through that store. The
rest (backend choice, torch's env vars, shutdown) is Ray's, unchanged; the private Ray
names it needs come from ray_internals.py.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import ray
import torch.distributed as dist
from ray.train.torch import TorchConfig

from cifar_ray import ray_internals


def init_process_group(backend: str, world_rank: int, world_size: int, addr: str, port: int,
                       timeout_s: int) -> None:
    """Runs on every worker: rank 0 hosts the store on addr:port only, the others join."""
    timeout = timedelta(seconds=timeout_s)
    if backend == "nccl":  # as Ray does: fail on a stuck collective instead of hanging
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    if world_rank == 0:
        sock = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((addr, port))
        sock.listen(max(world_size, 16))
        store = dist.TCPStore(addr, port, world_size, True, timeout,
                              master_listen_fd=sock.detach(), use_libuv=True)
    else:
        store = dist.TCPStore(addr, port, world_size, False, timeout)
    dist.init_process_group(backend, store=store, rank=world_rank, world_size=world_size,
                            timeout=timeout)


class _BoundBackend(ray_internals.TorchBackend):
    def on_start(self, worker_group, backend_config: TorchConfig) -> None:
        gpus = worker_group.get_resources_per_worker().get("GPU", 0)
        backend = backend_config.backend or ("nccl" if gpus > 0 else "gloo")
        addr, port = worker_group.execute_single(0, ray_internals.address_and_port)
        worker_group.execute(ray_internals.set_torch_env_vars)
        n = len(worker_group)
        ray.get([worker_group.execute_single_async(
            i, init_process_group, backend=backend, world_rank=i, world_size=n, addr=addr,
            port=port, timeout_s=backend_config.timeout_s) for i in range(n)])


class BoundTorchConfig(TorchConfig):
    """TorchConfig whose process-group rendezvous listens on the master address only."""

    @property
    def backend_cls(self):
        return _BoundBackend
