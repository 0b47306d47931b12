"""Multi-process training: process group from ``torchrun``'s environment, DDP or FSDP2 wrapping,
and the few collectives the trainer needs.

Run with ``torchrun --nproc_per_node N -m ssmkit train --config FILE.yaml``. NCCL is used on GPUs,
gloo on CPUs. DDP keeps a full replica per rank and all-reduces gradients; FSDP2 (``fully_shard``
per block, then the root) shards parameters, gradients and optimizer state for models that do
not fit one device.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    """ "auto": this rank's GPU when there is one, else the CPU; "cpu"/"cuda"/"cuda:1" as given."""
    if preference == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if preference == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda was asked for but no CUDA device is available")
        return torch.device(f"cuda:{local_rank}")
    return torch.device(preference)


def init_distributed(device_preference: str = "auto") -> DistInfo:
    """Join the process group ``torchrun`` describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR);
    a single process when WORLD_SIZE is absent or 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_preference, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        logger.info("process group: rank %d of %d, backend %s, device %s", rank, world_size, backend, device)
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def fully_shard_fn():
    """FSDP2's ``fully_shard`` (public since torch 2.6; composable module before)."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


def wrap_model(model: nn.Module, strategy: str, info: DistInfo) -> nn.Module:
    """The module the loop calls: ``model`` itself for one process, DDP, or FSDP2-sharded in place
    (every entry of ``model.layers``, then the root)."""
    if not info.distributed:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [info.device.index] if info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    if strategy == "fsdp":
        fully_shard = fully_shard_fn()
        mesh = None
        try:
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(info.device.type, (info.world_size,))
        except (ImportError, RuntimeError) as err:
            logger.warning("no device mesh (%s); fully_shard uses its default", err)
        kwargs = {"mesh": mesh} if mesh is not None else {}
        for layer in getattr(model, "layers", []):
            fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)
        return model
    raise ValueError(f"distributed must be 'ddp' or 'fsdp', got {strategy!r}")


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper or a ``torch.compile`` wrapper."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum of ``values`` over ranks (the values themselves for one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_gather_object(value: Any) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def broadcast_object(value: Any, src: int = 0) -> Any:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        # Every rank must be done with its collectives before any tears the group down: a rank
        # destroying gloo's group while a peer still talks to it aborts that peer (SIGABRT).
        barrier()
        dist.destroy_process_group()
