"""Who this process is in a (possibly) data-parallel job, behind a few calls.

Single process today; the data-parallel launcher (torchrun) sets RANK/WORLD_SIZE/LOCAL_RANK
and the rest of the trainer only asks `is_main` and calls `reduce`.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Rank:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

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


def from_environment(environ=os.environ) -> Rank:
    return Rank(int(environ.get("RANK", 0)), int(environ.get("WORLD_SIZE", 1)), int(environ.get("LOCAL_RANK", 0)))


def setup_logging(rank: Rank) -> None:
    """Only rank 0 logs (metric lines appear once); other ranks report warnings and errors."""
    logging.basicConfig(level=logging.INFO if rank.is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout, force=True)
