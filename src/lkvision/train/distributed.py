"""Distributed helpers: process-group set-up from torchrun's environment, rank-0 gating, reductions.

``torchrun --nproc_per_node=G [--nnodes=N --node_rank=R --rdzv_endpoint=HOST:PORT] -m lkvision.train ...``
sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; :func:`init_distributed` reads them and
picks nccl on GPU, gloo on CPU. Without those variables everything runs as a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

if dist.is_available():
    # Imported here, before any process group exists, for its side effect: ``torch.distributed.nn.functional``
    # binds ``group=group.WORLD`` as default arguments when it is imported. Imported later (DDP's constructor
    # imports it through torch._dynamo), those defaults hold the default group for the rest of the process:
    # ``destroy_process_group`` cannot free it and gloo's threads are torn down only at interpreter exit, where
    # a rank was aborted, rarely ("terminate called without an active exception").
    import torch.distributed.nn  # noqa: F401

__all__ = ["DistInfo", "init_distributed", "cleanup_distributed", "unwrap_model", "all_reduce_sum",
           "broadcast_object", "barrier"]


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    enabled: bool = False
    owns_group: bool = False  # True when init_distributed created the process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _pick_device(spec: str, local_rank: int) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(spec)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r} requested but CUDA is not available here; use --device cpu")
        if dev.index is None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    return dev


def init_distributed(device: str = "auto", backend: str = "auto") -> DistInfo:
    """Join the process group described by the environment (torchrun) or return a single-process info.

    If a process group is already initialized (e.g. by a test harness), it is used as is.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        return DistInfo(rank, world, local, _pick_device(device, local), world > 1, False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(device=_pick_device(device, 0))
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    kw = {"device_id": dev} if dev.type == "cuda" else {}
    dist.init_process_group(backend=backend, rank=rank, world_size=world, **kw)
    return DistInfo(rank, world, local, dev, True, True)


def cleanup_distributed(info: DistInfo, finished: bool = False) -> None:
    """Tear down the process group ``init_distributed`` created. ``finished``: the run ended normally on this
    rank; then all ranks meet at a barrier first, so no rank tears gloo down while another still talks to it
    (that aborted a rank at exit, rarely). After an error there is no barrier: the other ranks may be gone."""
    if info.owns_group and dist.is_initialized():
        if finished and info.world_size > 1:
            dist.barrier()
        dist.destroy_process_group()


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model under DDP / torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_object(obj, info: DistInfo, src: int = 0):
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
