"""Who this process is in a (possibly) data-parallel job, behind a few calls.

The launcher (train.launcher, through torchrun) sets RANK/WORLD_SIZE/LOCAL_RANK and the
rendezvous variables; the rest of the trainer only asks `is_main`, calls `reduce`, and trains
the module `wrap` returns.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Rank:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1   # ranks on this host (they share its CPUs and memory)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over all processes (identity when alone)."""
        if self.world_size == 1:
            return tensor
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor


    def broadcast(self, obj):
        """Rank 0's `obj` (picklable) on every rank; alone, `obj`."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def start(self, device: torch.device) -> None:
        """Join the process group: NCCL between GPUs, gloo on CPU. Alone: nothing to join."""
        if self.world_size == 1:
            return
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # A rank that waits longer than this for the others fails with a timeout instead of hanging.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=self.rank,
                                world_size=self.world_size, timeout=timedelta(minutes=30))

    def stop(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """The module the training loop calls: DDP averages gradients across ranks after backward
        (and broadcasts BatchNorm buffers from rank 0). Its parameters are the model's own."""
        if self.world_size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def from_environment(environ=os.environ) -> Rank:
    return Rank(int(environ.get("RANK", 0)), int(environ.get("WORLD_SIZE", 1)), int(environ.get("LOCAL_RANK", 0)),
                int(environ.get("LOCAL_WORLD_SIZE", 1)))


def setup_logging(rank: Rank) -> None:
    """Only rank 0 logs (metric lines appear once); other ranks report warnings and errors."""
    logging.basicConfig(level=logging.INFO if rank.is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout, force=True)
