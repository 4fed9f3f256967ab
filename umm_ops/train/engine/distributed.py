"""Process group and device mesh from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

One process needs no torchrun and no process group: :func:`init` returns a :class:`Dist` with world size 1 and
every collective below is then a no-op.  Backends: gloo for CPU tensors, nccl for CUDA ones (``parallel.backend``
may force one).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Dist", "init", "shutdown"]


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None
    mesh: object = None          # a 1-d DeviceMesh ("dp") when world_size > 1
    owns_group: bool = False     # this module created the process group (and destroys it in shutdown)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_mean(self, values: list) -> list:
        """Mean over ranks of a list of floats (one collective for the whole list)."""
        if not self.distributed or not values:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._coll_device())
        dist.all_reduce(t)
        return (t / self.world_size).tolist()

    def all_reduce_sum(self, values: list) -> list:
        if not self.distributed or not values:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._coll_device())
        dist.all_reduce(t)
        return t.tolist()

    def broadcast_object(self, obj, src: int = 0):
        """rank src's `obj` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, device=self._coll_device() if self.backend == "nccl" else None)
        return box[0]

    def all_gather_object(self, obj) -> list:
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def _coll_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"environment variable {name}={v!r} is not an integer (set by torchrun)") from None


def init(device: str = "auto", backend: str = "auto", timeout_s: float = 600.0) -> Dist:
    """Read torchrun's environment, pick the device, start the process group when WORLD_SIZE > 1."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if world < 1 or not (0 <= rank < world):
        raise ValueError(f"torchrun environment: RANK={rank} WORLD_SIZE={world} is not a valid rank / world size")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("job.device = 'cuda' but torch sees no CUDA device (use 'cpu' or 'auto')")
        n = torch.cuda.device_count()
        if local_rank >= n:
            raise ValueError(f"LOCAL_RANK={local_rank} but this node has {n} CUDA device(s): start at most {n} "
                             f"processes per node (torchrun --nproc-per-node {n})")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world == 1:
        return Dist(rank=0, world_size=1, local_rank=0, device=dev, backend=None)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                                **({"device_id": dev} if dev.type == "cuda" else {}))
        owns = True
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(dev.type, (world,), mesh_dim_names=("dp",))
    return Dist(rank=rank, world_size=world, local_rank=local_rank, device=dev, backend=backend, mesh=mesh,
                owns_group=owns)


def shutdown(d: Dist) -> None:
    if d.owns_group and dist.is_initialized():
        dist.destroy_process_group()
