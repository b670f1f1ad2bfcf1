"""Scale-out helpers: which process writes, and how batches are shared between processes without duplicates.

Training runs on Lightning's DDP strategy, so the same ``melanoma train`` command works with one process, with
``--devices N`` (Lightning starts the other processes), under ``torchrun`` and under SLURM. Two things Lightning's
defaults get wrong for us are handled here:

* Lightning's ``DistributedSampler`` pads each epoch to a multiple of the world size by repeating samples, so
  validation metrics would count some images twice. :class:`ShardedBatchSampler` gives every sample to exactly one
  process, and every process the same number of batches (DDP needs that to stay in step).
* Only the global rank-0 process may create or write the run folder, and that has to be known *before* Lightning
  starts the process group (the folder is made before training starts): :func:`is_launch_rank_zero` reads the
  launchers' environment variables.
"""
from __future__ import annotations

import os
from typing import Iterator, Sized

import torch
from torch.utils.data import Sampler

# The variables that launchers set for a process's global rank: torchrun / Lightning, SLURM, LSF (jsrun).
_GLOBAL_RANK_VARIABLES = ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def is_launch_rank_zero() -> bool:
    """True in the process that must write the run folder: global rank 0, or the only process.

    Lightning's own launcher (``--devices N`` without torchrun) sets only LOCAL_RANK and NODE_RANK in the processes it
    starts; the first one of the first node is rank 0.
    """
    for variable in _GLOBAL_RANK_VARIABLES:
        if variable in os.environ:
            return int(os.environ[variable]) == 0
    return int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


def world() -> tuple[int, int]:
    """(rank, world size) of this process in the running process group; (0, 1) outside one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ShardedBatchSampler(Sampler[list[int]]):
    """Batches of ``batch_size`` per process; across processes each sample of an epoch is used exactly once.

    Each epoch draws the whole order from ``sampler`` (every process draws the same order: its generator is seeded
    the same everywhere), cuts it into global batches of ``batch_size * world_size`` and deals each global batch out
    round-robin. Every process therefore gets the same number of batches, each of ``batch_size`` or fewer samples.
    A last global batch too small to give every process a sample is merged into the one before it, so no process
    ever gets an empty batch. With one process this is exactly ``BatchSampler(sampler, batch_size, drop_last=False)``.

    ``rank`` and ``world_size`` default to the running process group, read when iterating (Lightning starts the
    group after the data loaders are built).
    """

    def __init__(self, sampler: Sampler[int] | Sized, batch_size: int, rank: int | None = None,
                 world_size: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        self.sampler, self.batch_size = sampler, batch_size
        self._rank, self._world_size = rank, world_size

    def _world(self) -> tuple[int, int]:
        rank, size = world()
        return (rank if self._rank is None else self._rank), (size if self._world_size is None else self._world_size)

    def _global_batches(self, count: int, world_size: int) -> list[tuple[int, int]]:
        """(start, stop) of each global batch over an epoch of ``count`` samples."""
        if count < world_size:
            raise ValueError(f"{count} samples cannot be shared between {world_size} processes; use fewer devices")
        step = self.batch_size * world_size
        bounds = [(start, min(start + step, count)) for start in range(0, count, step)]
        if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < world_size:
            bounds[-2:] = [(bounds[-2][0], count)]
        return bounds

    def __iter__(self) -> Iterator[list[int]]:
        rank, world_size = self._world()
        order = list(self.sampler)
        if not order:
            return
        for start, stop in self._global_batches(len(order), world_size):
            yield order[start + rank:stop:world_size]

    def __len__(self) -> int:
        count = len(self.sampler)
        return len(self._global_batches(count, self._world()[1])) if count else 0
